"""The benchmark's outputs: ``recall.csv``, ``compound_gene.csv``, ``scores.json`` and ``index.html``
(the recall table first)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from rcic.atomic import atomic_write_text
from rcic.reports.html import note, page, section, table, write_page
from rcic.rxrx3.benchmark import PUBLISHED_RECALL, BenchmarkResult, recall_column

REPORT_MARK = ".rcic-report"


def recall_wide(result: BenchmarkResult) -> pd.DataFrame:
    """One row per source, one column per correction (the first threshold pair), then the published figure."""
    column = [c for c in result.recall.columns if c.startswith("recall_")][0]
    wide = result.recall.pivot(index="source", columns="correction", values=column)
    wide = wide[list(dict.fromkeys(result.recall["correction"]))]
    pairs = result.recall.drop_duplicates("source").set_index("source")["query_distribution_size"]
    wide.insert(0, "pairs", pairs)
    if column == recall_column(0.05, 0.95):
        wide["published OpenPhenom"] = [PUBLISHED_RECALL.get(s, (float("nan"),))[0] for s in wide.index]
    return wide.reset_index()


def write_report(out: str | Path, result: BenchmarkResult) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / REPORT_MARK, '{"report": "rxrx3-core benchmark"}\n')
    atomic_write_text(out / "recall.csv", result.recall.to_csv(index=False))
    frames = [t.assign(correction=m) for m, t in result.compound_gene.items()]
    if frames:
        atomic_write_text(out / "compound_gene.csv", pd.concat(frames, ignore_index=True).to_csv(index=False))
    atomic_write_text(out / "scores.json", json.dumps(result.scores, indent=2))
    s = result.scores
    d = s["dataset"]
    chance = ", ".join(f"{k} {v:.2f}" for k, v in s["chance"].items())
    sections = [section(
        "Known-relationship recall",
        f"<p>Share of each source's known gene pairs whose cosine similarity is among the most similar or most "
        f"dissimilar pairs of the whole map ({d['map_entities']} entities, {d['null_pairs']:,} pairs); chance: "
        f"{chance}. Best correction by mean recall: <b>{s['best_correction']}</b>. The last column is Recursion's "
        "published OpenPhenom figure on the real RxRx3-core (PCA-CenterScale), for comparison on that data only.</p>",
        table(recall_wide(result)), "<p>All thresholds:</p>", table(result.recall, "{:.4f}"))]
    for method, frame in result.compound_gene.items():
        cg = s["corrections"][method]["compound_gene"]
        sections.append(section(
            f"Compound-gene ({method})",
            f"<p>{cg['compounds']} compounds, mean ± SD over {cg['seeds']} seeds of the compound-averaged AP and "
            "ROC AUC of |cosine| ranking each compound's active genes (≤ 1 µM) above sampled negatives; "
            "<i>random</i>: the same with uniform random scores. Published OpenPhenom (max over concentrations): "
            "AP 0.266 against 0.219 random, AUC 0.541.</p>", table(frame, "{:.4f}"),
            anchor=f"compound-gene-{method}"))
    sections.append(section("Data", table(pd.DataFrame([d]).T.reset_index().rename(
        columns={"index": "item", 0: "value"}).astype(str)), *[note(n) for n in result.notes]))
    path = out / "index.html"
    write_page(path, page("RxRx3-core benchmark", f"{d['embeddings']} · {d['wells']} wells", sections))
    return path
