"""``map.html``: the phenomic-map benchmarks of each batch correction, with plots a person can read."""

from __future__ import annotations

import html
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from rcic.reports.eda import REPORT_MARK, check_report_folder  # noqa: E402
from rcic.reports.html import figure, note, page, save_figure, section, table, write_page  # noqa: E402

PLOTTED_WELLS = 4000
SHOWN_SIRNAS = 8


def scores_table(scores: dict[str, dict]) -> pd.DataFrame:
    rows = []
    for method, s in scores.items():
        ci = s.get("known_recall_ci")
        rows.append({"correction": method, "replicate mAP": s["replicate_map"],
                     "significant siRNAs": s["replicate_fraction"], "batch leakage": s["batch_leakage"],
                     "leakage without batch effects": s["batch_leakage_expected"], "known recall": s["known_recall"],
                     "recall 95% CI": "" if not ci else f"{ci[0]:.3f}-{ci[1]:.3f}", "probe accuracy": s["probe_acc"]})
    return pd.DataFrame(rows)


PANEL_SCORE_COLUMNS = ("silhouette batch", "iLISI", "kBET", "graph connectivity", "batch", "replicate mAP",
                       "consistency mAP", "Leiden NMI", "Leiden ARI", "silhouette label", "cLISI", "isolated labels",
                       "bio", "overall")


def panel_display(panel: pd.DataFrame) -> pd.DataFrame:
    """The panel as printed: metrics rounded, the rank with its bootstrap interval, NaN as '-'."""
    shown = panel[["correction", *[c for c in PANEL_SCORE_COLUMNS if c in panel.columns]]].copy()
    shown["rank (95% CI)"] = [f"{r} ({lo}-{hi})" if pd.notna(lo) else str(r)
                              for r, lo, hi in zip(panel["rank"], panel["rank 95% low"], panel["rank 95% high"])]
    return shown.astype(object).where(shown.notna(), "-")


def panel_heat_table(panel: pd.DataFrame) -> str:
    """Metrics (columns) by correction (rows), each cell shaded by its value on the metric's [0, 1]
    scale (scib-metrics' scores all lie there): the heat table of scIB and Arevalo et al."""
    columns = [c for c in PANEL_SCORE_COLUMNS if c in panel.columns]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["correction", *columns, "rank (95% CI)"])
    rows = []
    for _, row in panel.sort_values("overall", ascending=False).iterrows():
        cells = [f"<td>{html.escape(str(row['correction']))}</td>"]
        for c in columns:
            value = row[c]
            if pd.isna(value):
                cells.append("<td></td>")
                continue
            shade = float(np.clip(value, 0, 1))
            red, green, blue = (int(255 - shade * (255 - a)) for a in (49, 130, 189))  # white -> blue
            ink = "#fff" if shade > 0.6 else "#1d2330"
            bold = ' style="font-weight:600"' if c in ("batch", "bio", "overall") else ""
            cells.append(f'<td style="background:rgb({red},{green},{blue});color:{ink}"{bold}>{value:.3f}</td>')
        low, high = row.get("rank 95% low"), row.get("rank 95% high")
        rank = f"{row['rank']} ({low}-{high})" if pd.notna(low) else str(row["rank"])
        cells.append(f"<td>{html.escape(rank)}</td>")
        rows.append(f"<tr>{''.join(cells)}</tr>")
    return f'<table class="heat"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _pca2(x: np.ndarray) -> np.ndarray:
    centred = x - x.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[:2].T


def embedding_plot(meta: pd.DataFrame, corrected: dict[str, np.ndarray], path: Path, seed: int = 0) -> None:
    """PCA of the wells, coloured by experiment and by siRNA, for each correction (rows)."""
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.permutation(len(meta))[:PLOTTED_WELLS])
    sub = meta.iloc[pick]
    experiments = sorted(sub["experiment"].unique())
    colour_exp = {e: plt.cm.tab20(i % 20) for i, e in enumerate(experiments)}
    treat = sub[(sub["well_type"] == "treatment") & (sub["label"] != "")]
    common = treat["label"].value_counts().index[:SHOWN_SIRNAS].tolist()
    colour_sirna = {label: plt.cm.tab10(i % 10) for i, label in enumerate(common)}
    fig, axes = plt.subplots(len(corrected), 2, figsize=(11, 4.2 * len(corrected)), squeeze=False)
    for row, (method, z) in enumerate(corrected.items()):
        xy = _pca2(z[pick])
        ax = axes[row, 0]
        ax.scatter(xy[:, 0], xy[:, 1], s=4, c=[colour_exp[e] for e in sub["experiment"]], alpha=0.7)
        ax.set_title(f"{method}: wells by experiment", fontsize=10)
        ax = axes[row, 1]
        chosen = sub["label"].isin(common).to_numpy() & (sub["well_type"] == "treatment").to_numpy()
        ax.scatter(xy[~chosen, 0], xy[~chosen, 1], s=3, c="#cccccc", alpha=0.4)
        ax.scatter(xy[chosen, 0], xy[chosen, 1], s=14, c=[colour_sirna[label] for label in sub["label"][chosen]])
        ax.set_title(f"{method}: the {len(common)} most frequent siRNAs (others grey)", fontsize=10)
        for a in axes[row]:
            a.set_xticks([])
            a.set_yticks([])
    save_figure(fig, path)


def recall_plot(scores: dict[str, dict], path: Path, chance: float) -> bool:
    methods = [m for m, s in scores.items() if s["known_recall"] is not None]
    if not methods:
        return False
    values = [scores[m]["known_recall"] for m in methods]
    low = [v - scores[m]["known_recall_ci"][0] for m, v in zip(methods, values)]
    high = [scores[m]["known_recall_ci"][1] - v for m, v in zip(methods, values)]
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(methods) + 2), 3.5))
    ax.bar(methods, values, yerr=[low, high], capsize=4, color="#4c78a8")
    ax.axhline(chance, color="#e45756", linestyle="--", label=f"chance ({chance:.2f})")
    ax.set(ylabel="recall of known relationships", ylim=(0, 1), title="Known gene relationships recovered")
    ax.legend()
    save_figure(fig, path)
    return True


def write_map_report(out: str | Path, meta: pd.DataFrame, scores: dict[str, dict],
                     corrected: dict[str, np.ndarray], source: str, chance: float = 0.10,
                     panel: pd.DataFrame | None = None, controls: str | None = None) -> Path:
    out = Path(out)
    check_report_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT_MARK).write_text('{"report": "map"}\n')
    sections = [section("Benchmarks", "<p>Each row is one batch correction of the same embeddings. Replicate mAP: "
                                      "a siRNA's wells retrieving its wells in other experiments of the same cell "
                                      "type (higher is better); batch leakage: share of a well's 10 nearest "
                                      "neighbours from its own experiment (lower is better; beside it the share "
                                      "without batch effects); known recall: known gene pairs in the top or bottom "
                                      "5% of gene-gene similarities (chance 0.10); probe: held-out-experiment "
                                      "accuracy of a logistic regression.</p>", table(scores_table(scores)))]
    if panel is not None:
        sections.append(section(
            "Correction panel",
            "<p>Every correction of the same embeddings scored as Arevalo et al. (Nat Commun 2024) score them: "
            "batch removal (silhouette batch, iLISI, kBET, graph connectivity) and biology (replicate mAP against "
            "negative controls, consistency mAP, Leiden NMI/ARI, silhouette label, cLISI, isolated labels), each "
            "within a cell type (scib-metrics, copairs); overall = 0.4 x batch + 0.6 x bio on the raw scores. "
            "Rank by overall, with its 95% interval over bootstrap resamples of the siRNAs. Darker is better.</p>",
            panel_heat_table(panel)))
    embedding_plot(meta, corrected, out / "embeddings.png")
    sections.append(section("Wells before and after correction",
                            figure("embeddings.png", "PCA of the wells, coloured by experiment (left) and by siRNA "
                                                     "(right), one row per correction")))
    if recall_plot(scores, out / "recall.png", chance):
        sections.append(section("Known relationships", figure("recall.png", "Recall of known gene relationships "
                                                                            "with a bootstrap 95% interval")))
    else:
        sections.append(section("Known relationships",
                                note("No gene tables given (--genes FILE --relationships FILE): recall not computed.")))
    counts = meta.groupby("well_type").size().rename("wells").reset_index()
    sections.append(section("Wells", table(counts)))
    path = out / "map.html"
    scored = f"{len(meta)} wells scored"
    if controls:
        scored += f" · control-based corrections on --controls {controls}"
    write_page(path, page("rcic phenomic map", f"{source} · {scored}", sections))
    return path
