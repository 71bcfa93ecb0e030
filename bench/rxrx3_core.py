"""Time and peak memory of `rcic benchmark rxrx3-core` and `rcic map` on a synthetic RxRx3-core of the real shape.

The real download: 222,601 wells x 384 features (OpenPhenom), 180 experiments (176 gene, 4 compound),
735 genes + EMPTY_control, 1,674 compounds at 8 concentrations -> a map of 14,090 entities and a
null of 99,257,005 pairs. This script writes metadata and an embeddings parquet of exactly that
shape (``--scale 1``; genes are real symbols of the relationship sources, so the query pairs are
as many as on the real map), then runs each command in its own process, with 2 threads, and
records wall time and the peak RSS of that process (``getrusage`` of a wrapper's only child).

    python bench/rxrx3_core.py --out /tmp/rxrx3-bench                  # full scale, benchmark + map
    python bench/rxrx3_core.py --out /tmp/rxrx3-bench --scale 0.1      # a tenth of the wells
    python bench/rxrx3_core.py --out /tmp/rxrx3-bench --skip-map       # the benchmark only
    python bench/rxrx3_core.py --out /tmp/rxrx3-bench --skip-benchmark --skip-map --replicate-map
                                                                       # replicate mAP only, full scale

``--replicate-map`` measures the replicate mAP alone, as ``rcic map`` computes it, through the Python
API: ``rcic.rxrx3.mapping.read_rxrx3_embeddings`` then ``rcic.profiles.metrics.replicate_map`` (copairs'
p-values over 1,000 permutations); ``rcic map`` adds the batch leakage (every well's 10 nearest
neighbours: a matmul over all 222,601^2 pairs) and its report. Each measured process gets an empty
copairs null cache (``XDG_CACHE_HOME``), so the null distributions are computed, not read back.

Results go to ``OUT/results.json`` and are printed as a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

WELLS, GENES, COMPOUNDS, DIMS = 222_601, 735, 1_674, 384
GENE_EXPERIMENTS, COMPOUND_EXPERIMENTS = 176, 4
CONCENTRATIONS = (0.0025, 0.01, 0.025, 0.1, 0.25, 1.0, 2.5, 10.0)
MISSING_COMBOS = 38  # (compound, concentration) pairs absent from the real map: 1,674 x 8 - 38 = 13,354
EMPTY_GENE, EMPTY_COMPOUND, CRISPR_CONTROL = 144, 10_234, 22_062
CRISPR_WELLS = 126_900

_WRAPPER = ("import resource, subprocess, sys, time; t = time.perf_counter(); code = subprocess.call(sys.argv[1:]); "
            "u = resource.getrusage(resource.RUSAGE_CHILDREN); "
            "print('__bench__', code, time.perf_counter() - t, u.ru_maxrss, u.ru_utime + u.ru_stime)")


def _address(i: int) -> str:
    rows = [chr(65 + k) for k in range(26)] + [f"A{chr(65 + k)}" for k in range(6)]
    return f"{rows[(i // 48) % 32]}{i % 48 + 1:02d}"


def real_genes(n: int, rng: np.random.Generator) -> list[str]:
    """n gene symbols of CORUM (efaar-benchmarking), so the map has real pairs to score."""
    from importlib import resources

    folder = Path(str(resources.files("efaar_benchmarking").joinpath("benchmark_annotations")))
    corum = pd.read_csv(folder / "CORUM.txt")
    chosen: dict[str, None] = {}
    for k in rng.permutation(len(corum)):  # both genes of random pairs: small scales keep some pairs
        chosen.update(dict.fromkeys(corum.iloc[k][["entity1", "entity2"]]))
        if len(chosen) >= n:
            return sorted(chosen)[:n]
    raise ValueError(f"CORUM has fewer than {n} genes")


def make_metadata(scale: float, rng: np.random.Generator) -> pd.DataFrame:
    """Wells in the real proportions: gene experiments (guides + 144 controls each), compound experiments."""
    n_genes = max(8, round(GENES * scale))
    n_compounds = max(4, round(COMPOUNDS * scale))
    n_gene_exps = max(2, round(GENE_EXPERIMENTS * scale))
    genes = real_genes(n_genes, rng)
    crispr_wells = round(CRISPR_WELLS * scale)
    per_exp_controls = EMPTY_GENE
    guide_wells = max(n_genes * 2, crispr_wells - n_gene_exps * per_exp_controls)
    gene_of = np.array(genes)[np.arange(guide_wells) % n_genes]
    guide = (np.arange(guide_wells) // n_genes) % 4 + 1
    rows = {"experiment_name": [], "gene": [], "treatment": [], "concentration": [], "perturbation_type": []}

    def add(experiment, gene, treatment, concentration, kind):
        rows["experiment_name"] += list(experiment)
        rows["gene"] += list(gene)
        rows["treatment"] += list(treatment)
        rows["concentration"] += list(concentration)
        rows["perturbation_type"] += [kind] * len(experiment)

    exp_of_gene = {g: k % n_gene_exps for k, g in enumerate(rng.permutation(genes))}
    add([f"gene-{exp_of_gene[g] + 1:03d}" for g in gene_of], gene_of,
        [f"{g}_guide_{k}" for g, k in zip(gene_of, guide)], [np.nan] * guide_wells, "CRISPR")
    for e in range(n_gene_exps):
        add([f"gene-{e + 1:03d}"] * per_exp_controls, ["EMPTY_control"] * per_exp_controls,
            ["EMPTY_control"] * per_exp_controls, [np.nan] * per_exp_controls, "CRISPR")
    total = max(round(WELLS * scale), len(rows["gene"]) + n_compounds * 8 + 8)
    controls = round((EMPTY_COMPOUND + CRISPR_CONTROL) * scale)
    compound_wells = total - len(rows["gene"]) - controls
    combos = [(c, conc) for c in range(n_compounds) for conc in CONCENTRATIONS]
    drop = set(rng.choice(len(combos), min(round(MISSING_COMBOS * scale), len(combos) // 10), replace=False))
    combos = [combo for k, combo in enumerate(combos) if k not in drop]
    picks = np.arange(compound_wells) % len(combos)
    names = [f"CPD{c:04d}" for c, _ in (combos[k] for k in picks)]
    # the j-th well of a (compound, concentration) goes to experiment (combination + j) mod 4: its replicates
    # sit in several compound experiments at every scale (k mod 4 put them all in one where 4 divides
    # the combinations), so replicate mAP has positives to score
    experiment = (picks + np.arange(compound_wells) // len(combos)) % COMPOUND_EXPERIMENTS
    add([f"compound-{e + 1:03d}" for e in experiment], [""] * compound_wells, names,
        [combos[k][1] for k in picks], "COMPOUND")
    empty = round(controls * EMPTY_COMPOUND / (EMPTY_COMPOUND + CRISPR_CONTROL))
    kinds = ["EMPTY_control"] * empty + ["CRISPR_control"] * (controls - empty)
    add([f"compound-{k % COMPOUND_EXPERIMENTS + 1:03d}" for k in range(controls)], [""] * controls, kinds,
        [np.nan] * controls, "COMPOUND")
    frame = pd.DataFrame(rows)
    frame["plate"] = frame.groupby("experiment_name").cumcount() // 1536 + 1
    frame["address"] = [_address(i) for i in frame.groupby("experiment_name").cumcount() % 1536]
    frame["well_id"] = frame["experiment_name"] + "_" + frame["plate"].astype(str) + "_" + frame["address"]
    frame["SMILES"] = np.where(frame["perturbation_type"] == "COMPOUND", "CCO", "")
    frame["cell_type"] = "HUVEC"
    columns = ["well_id", "experiment_name", "plate", "address", "gene", "treatment", "SMILES", "concentration",
               "perturbation_type", "cell_type"]
    return frame[columns].iloc[rng.permutation(len(frame))].reset_index(drop=True)


def make_embeddings(meta: pd.DataFrame, dims: int, rng: np.random.Generator) -> pd.DataFrame:
    """Per-experiment shifts, an effect per perturbation, noise: float32 like OpenPhenom's file."""
    x = rng.standard_normal((len(meta), dims), dtype=np.float32)
    codes, _ = pd.factorize(meta["experiment_name"])
    x += rng.standard_normal((codes.max() + 1, dims), dtype=np.float32)[codes]
    pert, _ = pd.factorize(meta["treatment"].str.split("_").str[0])
    x += 0.5 * rng.standard_normal((pert.max() + 1, dims), dtype=np.float32)[pert]
    frame = pd.DataFrame(x, columns=[f"feature_{i}" for i in range(dims)])
    frame.insert(0, "well_id", meta["well_id"].to_numpy())
    return frame.sort_values("well_id").reset_index(drop=True)


def replicate_map_worker(metadata: Path, embeddings: Path, out: Path) -> None:
    """What ``--replicate-map`` runs in its own process: the wells ``rcic map`` reads, their replicate mAP."""
    from rcic.profiles.metrics import map_from_average_precision, replicate_average_precision
    from rcic.rxrx3.mapping import read_rxrx3_embeddings

    meta, x = read_rxrx3_embeddings(embeddings, metadata)
    ap = replicate_average_precision(meta, x)
    mean_ap, fraction, per_label = map_from_average_precision(ap)
    out.write_text(json.dumps({"replicate_map": mean_ap, "replicate_fraction": fraction, "query_wells": len(ap),
                               "labels": len(per_label), "labelled_wells": int(((meta["well_type"] == "treatment")
                                                                               & (meta["label"] != "")).sum()),
                               "null_configurations": len(ap[["n_pos_pairs", "n_total_pairs"]].drop_duplicates())}))


def measure(command: list[str], threads: int, cache: Path) -> dict:
    shutil.rmtree(cache, ignore_errors=True)  # copairs' null distributions are computed, not read back
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "OPENBLAS_NUM_THREADS": str(threads), "COLUMNS": "200", "XDG_CACHE_HOME": str(cache)}
    proc = subprocess.run([sys.executable, "-c", _WRAPPER, *command], capture_output=True, text=True, env=env)
    line = [x for x in proc.stdout.splitlines() if x.startswith("__bench__")][-1].split()
    code, seconds, peak_kb, cpu = int(line[1]), float(line[2]), int(line[3]), float(line[4])
    if code != 0:
        raise SystemExit(f"{' '.join(command)} failed ({code}):\n{proc.stderr[-3000:]}")
    # CPU seconds beside the wall time: on a shared machine the wall time overstates
    return {"seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1), "peak_rss_gb": round(peak_kb / 2**20, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the real wells, genes and compounds")
    parser.add_argument("--dims", type=int, default=DIMS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-map", action="store_true", help="no rcic map")
    parser.add_argument("--skip-benchmark", action="store_true", help="no rcic benchmark rxrx3-core")
    parser.add_argument("--replicate-map", action="store_true", help="also the replicate mAP alone (Python API)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", nargs=3, type=Path, help=argparse.SUPPRESS)  # metadata embeddings out.json
    args = parser.parse_args()
    if args.worker:
        replicate_map_worker(*args.worker)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    metadata, embeddings = args.out / "metadata_rxrx3_core.csv", args.out / "embeddings.parquet"
    start = time.perf_counter()
    meta = make_metadata(args.scale, rng)
    meta.to_csv(metadata, index=False)
    make_embeddings(meta, args.dims, rng).to_parquet(embeddings, index=False)
    made = time.perf_counter() - start
    rcic = [sys.executable, "-m", "rcic.cli"]
    results = {"scale": args.scale, "wells": len(meta), "dims": args.dims, "threads": args.threads,
               "data_seconds": round(made, 1)}
    cache = args.out / "cache"
    if not args.skip_benchmark:
        bench_out = args.out / "benchmark"
        results["benchmark"] = measure([*rcic, "benchmark", "rxrx3-core", "--metadata", str(metadata),
                                        "--embeddings", str(embeddings), "--out", str(bench_out)], args.threads, cache)
        scores = json.loads((bench_out / "scores.json").read_text())
        results["map_entities"] = scores["dataset"]["map_entities"]
        results["null_pairs"] = scores["dataset"]["null_pairs"]
        results["query_pairs"] = {s: v["query_distribution_size"]
                                  for s, v in scores["corrections"]["pca-centerscale"]["recall"].items()}
    if not args.skip_map:
        results["map"] = measure([*rcic, "map", str(embeddings), "--metadata", str(metadata), "--out",
                                  str(args.out / "map"), "--correct", "none", "--no-probe"], args.threads, cache)
        results["map"]["replicate_map"] = json.loads((args.out / "map" / "scores.json").read_text())["none"][
            "replicate_map"]
    if args.replicate_map:
        answer = args.out / "replicate_map.json"
        results["replicate_map"] = measure([sys.executable, __file__, "--out", str(args.out), "--worker",
                                            str(metadata), str(embeddings), str(answer)], args.threads, cache)
        results["replicate_map"].update(json.loads(answer.read_text()))
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    print("\n| command | wells | wall (s) | CPU (s) | peak RSS (GB) |\n|---|---|---|---|---|")
    for name, what in (("benchmark", "rcic benchmark rxrx3-core"), ("map", "rcic map --correct none --no-probe"),
                       ("replicate_map", "replicate mAP (read_rxrx3_embeddings + replicate_map)")):
        if name in results:
            r = results[name]
            print(f"| {what} | {results['wells']:,} | {r['seconds']} | {r['cpu_seconds']} | {r['peak_rss_gb']} |")


if __name__ == "__main__":
    main()
