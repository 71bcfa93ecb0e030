"""``rcic map`` at the scale of RxRx1: 62,755 wells (treatments and controls) x 512 dimensions.

    nice -n 10 python bench/map_speed.py [--dims 512] [--fraction 1.0] [--steps] [--out bench/out/map_speed]
    nice -n 10 python bench/map_speed.py --panel [--fraction 1.0] [--bootstrap 200]   # the correction panel
    python bench/map_speed.py --controls-study                             # which --controls default

Synthetic embeddings on the real well structure (the Kaggle 2019 CSVs in ../shared; the same
counts synthesised where they are absent): each siRNA a direction, each experiment a batch shift
and scaling, noise; genes of 1-2 siRNAs in complexes of 2-5 for the known-relationship recall.
Times the installed ``rcic map`` in a child process under ``/usr/bin/time -v`` (wall seconds, user +
sys CPU seconds, peak memory): with its default corrections (none, tvn), goal (issue #10) under 2
minutes on 2 cores; ``--steps`` also times each step of those in process. On a shared machine the
wall time is inflated; on 2 idle cores it is at least CPU seconds / 2 and at least the CPU seconds of
the command's main thread (serial work; sampled from ``/proc`` and printed with the load average).

``--panel`` times ``rcic map --panel`` (9 corrections, scib-metrics and copairs metrics; goal, issue
#15: under 15 minutes on 2 cores at full scale). ``--controls-study`` scores none, center, spherize
and TVN with each ``--controls`` choice on model-free features of ``rcic synth`` data (channel
intensity statistics, with the synthetic gene layer's known relationships) and on these synthetic
embeddings: the measurements behind the default (BENCHMARKS.md, "Which controls").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
REAL = Path(os.environ.get("RCIC_REALDATA", ROOT.parent / "shared" / "realdata" / "rxrx1")) / "kaggle_v2019"


def wells_table() -> pd.DataFrame:
    if (REAL / "train.csv").is_file():
        from rcic.io import read_dataset

        return read_dataset(REAL).wells
    from rcic.synth.generator import design_plates, preset

    wells, labels = design_plates(preset("small", n_classes=1108, n_positive=30, train_experiments=8,
                                         test_experiments=5))
    wells["label"] = [labels[c] if s == "train" or t != "treatment" else "" for c, s, t in
                      zip(wells["cls"], wells["split"], wells["well_type"])]
    wells["cell_type"] = wells["experiment"].str.split("-").str[0]
    return wells


def synthetic_embeddings(wells: pd.DataFrame, dims: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    truth = wells["label"].where(wells["label"] != "", "test-" + wells["id_code"])  # test wells: their own class
    labels = truth.unique()
    direction = {label: rng.normal(size=dims) for label in labels}
    x = np.stack([direction[label] for label in truth]) * 0.6
    for _, rows in wells.groupby("experiment").indices.items():
        x[rows] = x[rows] * rng.uniform(0.7, 1.3, dims) + rng.normal(scale=1.0, size=dims)
    x += rng.normal(size=x.shape)
    treat = sorted(set(wells.loc[wells.well_type == "treatment", "label"]) - {""})
    genes = pd.DataFrame({"label": treat, "gene": [f"G{i // 2 if i % 5 == 0 else i}" for i in range(len(treat))]})
    names = sorted(set(genes.gene))
    pairs = [(names[i], names[j]) for k in range(0, len(names) - 4, 4) for i in range(k, k + 3)
             for j in range(i + 1, k + 3)]
    return x.astype(np.float32), genes, pd.DataFrame(pairs, columns=["gene_a", "gene_b"])


def intensity_features(folder: Path, seed: int = 0):
    """Model-free well profiles of a small ``rcic synth`` set: per-channel intensity statistics."""
    from rcic.store import open_source, pack
    from rcic.synth import generate, preset

    data = folder / "data"
    if not (data / "answers.csv").is_file():
        generate(data, preset("small", image_size=32, test_experiments=2, seed=seed), workers=2)
    source = open_source(pack(data, folder / "s.zarr", workers=2).path)
    sites = source.dataset.sites

    def features(image):
        x = image.reshape(image.shape[0], -1).astype(np.float32)
        return np.concatenate([x.mean(1), x.std(1), *np.percentile(x, [10, 50, 90, 99], axis=1),
                               (x > x.mean(1, keepdims=True)).mean(1)])

    per_site = np.stack([features(source.read_site(r)) for r in sites.to_dict("records")])
    codes, inverse = np.unique(sites["id_code"], return_inverse=True)
    wells = np.zeros((len(codes), per_site.shape[1]))
    np.add.at(wells, inverse, per_site)
    wells /= np.bincount(inverse)[:, None]
    meta = sites.drop_duplicates("id_code").set_index("id_code").loc[codes].reset_index()
    answers = pd.read_csv(data / "answers.csv", dtype=str).set_index("id_code")["sirna"]
    meta["label"] = [answers.get(i, label) or label for i, label in zip(meta["id_code"], meta["label"])]
    meta["label"] = meta["label"].fillna("").astype(str)
    genes = pd.read_csv(data / "genes.csv", dtype=str)
    pairs = pd.read_csv(data / "relationships.csv", dtype=str)
    return meta[["id_code", "experiment", "plate", "well", "cell_type", "well_type", "label"]], wells, genes, pairs


def controls_study(args) -> None:
    from rcic.profiles import phenomic_map

    sets = {}
    meta, x, genes, pairs = intensity_features(args.out / "synth")
    sets["model-free features (rcic synth small)"] = (meta, x, genes, pairs)
    wells = _subset(wells_table(), args.fraction)
    x, genes, pairs = synthetic_embeddings(wells, args.dims)
    sets[f"synthetic embeddings ({len(wells):,} wells)"] = (wells[META].reset_index(drop=True), x, genes, pairs)
    rows = []
    for name, (meta, x, genes, pairs) in sets.items():
        for controls in ("negative", "all", "within"):
            result = phenomic_map(meta, x, ["none", "center", "spherize", "tvn"], genes, pairs, null_size=1000,
                                  probe=False, controls=controls)
            for method, s in result.scores.items():
                if method == "none" and controls != "negative":
                    continue
                rows.append({"data": name, "controls": "-" if method == "none" else controls, "correction": method,
                             "replicate mAP": s["replicate_map"], "batch leakage": s["batch_leakage"],
                             "leakage w/o batch": s["batch_leakage_expected"], "known recall": s["known_recall"]})
    table = pd.DataFrame(rows)
    print(_markdown(table))


def _markdown(frame: pd.DataFrame) -> str:
    """A markdown table for BENCHMARKS.md (numbers to 3 decimals)."""
    cell = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


META = ["id_code", "experiment", "plate", "well", "cell_type", "well_type", "label"]


def _subset(wells: pd.DataFrame, fraction: float) -> pd.DataFrame:
    """The first ``fraction`` of each cell type's experiments (at least two), train and test alike."""
    keep = []
    for _, group in wells.groupby("cell_type"):
        for split in ("train", "test"):
            names = sorted(group.loc[group["split"] == split, "experiment"].unique())
            keep += names[: max(2 if split == "train" else 1, round(len(names) * fraction))]
    return wells[wells["experiment"].isin(keep)].reset_index(drop=True)


def time_map(args) -> None:
    """Write the embeddings and gene tables, then time ``rcic map`` (``--panel`` with ``args.panel``) in a
    child process under ``/usr/bin/time -v``: wall seconds, user + sys CPU seconds, peak resident memory."""
    from rcic.profiles import embedding_frame, write_embeddings

    wells = _subset(wells_table(), args.fraction)
    x, genes, pairs = synthetic_embeddings(wells, args.dims)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "embeddings.parquet"
    write_embeddings(path, embedding_frame(wells, x))
    genes.to_csv(args.out / "genes.csv", index=False)
    pairs.to_csv(args.out / "relationships.csv", index=False)
    report = args.out / ("panel" if args.panel else "map")
    if report.exists():
        import shutil

        shutil.rmtree(report)
    command = [str(Path(sys.executable).with_name("rcic")), "map", str(path), "--out", str(report),
               "--genes", str(args.out / "genes.csv"), "--relationships", str(args.out / "relationships.csv"),
               "--json"] + (["--panel", "--bootstrap", str(args.bootstrap), "--workers", str(args.workers)]
                          if args.panel else [])
    proc, main_thread, loads, workers = _run_sampled(["/usr/bin/time", "-v", *command])
    if proc.returncode:
        raise SystemExit(proc.stderr[-2000:])
    usage = _time_v(proc.stderr)
    cpu = usage["User time (seconds)"] + usage["System time (seconds)"]
    goal = 900 if args.panel else 120
    print(f"rcic map{' --panel' if args.panel else ''} on {len(wells):,} wells ({wells.experiment.nunique()} "
          f"experiments) x {args.dims} dims, {os.cpu_count()} CPUs (load {os.getloadavg()[0]:.1f}): "
          f"wall {usage['wall']:.0f} s, CPU {cpu:.0f} s (user + sys; / 2 = {cpu / 2:.0f} s on 2 idle cores), "
          f"peak RSS {usage['Maximum resident set size (kbytes)'] / 2**20:.1f} GiB (goal at 62,755 wells: < {goal} s)")
    print(f"  main thread CPU {main_thread:.0f} s (serial: a lower bound on the wall on any number of idle cores; "
          f"sampled every 5 s), load average {min(loads):.1f}-{max(loads):.1f} (median {np.median(loads):.1f})")
    busy = sorted((cpu for cpu in workers.values() if cpu >= 1), reverse=True)  # the pool's workers, not helpers
    if busy:
        print(f"  worker processes CPU {', '.join(f'{cpu:.0f}' for cpu in busy)} s (one thread each): on 2 idle cores "
              f"the wall is about the main thread's + the busiest worker's, {main_thread + busy[0]:.0f} s")
    for line in proc.stderr.splitlines():
        if line.startswith("panel:"):
            print(line)
    scores = json.loads(proc.stdout)
    if args.panel:
        print(_markdown(pd.read_csv(report / "panel.csv")))
    else:
        print(json.dumps(scores, indent=1))
    if args.steps and not args.panel:
        map_steps(wells, x, genes, pairs)


def _cpu_seconds(pid: str, task: str | None = None) -> float:
    """utime + stime of a process (or of one of its threads) from ``/proc``."""
    path = f"/proc/{pid}/task/{task}/stat" if task else f"/proc/{pid}/stat"
    fields = Path(path).read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _run_sampled(argv: list[str]) -> tuple[subprocess.CompletedProcess, float, list[float], dict[str, float]]:
    """Run ``/usr/bin/time -v COMMAND``, sampling every 5 s the CPU seconds of COMMAND's main thread and of
    each of its child processes (``--panel``'s workers; ``/proc``: they exit before time reports, so the last
    sample, at most 5 s old) and the load average."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    main_thread, loads, out, workers = 0.0, [], None, {}
    while out is None:
        try:
            out = proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            loads.append(os.getloadavg()[0])
            try:
                child = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()[0]
                main_thread = _cpu_seconds(child, child)
                for task in os.listdir(f"/proc/{child}/task"):
                    for pid in Path(f"/proc/{child}/task/{task}/children").read_text().split():
                        workers[pid] = max(workers.get(pid, 0.0), _cpu_seconds(pid))
            except (OSError, IndexError):
                pass
    return (subprocess.CompletedProcess(argv, proc.returncode, *out), main_thread, loads or [os.getloadavg()[0]],
            workers)


def _time_v(stderr: str) -> dict[str, float]:
    """The figures of ``/usr/bin/time -v`` (its last lines), wall clock in seconds under ``wall``."""
    usage: dict[str, float] = {}
    for line in stderr.splitlines():
        name, _, value = line.strip().rpartition(": ")
        if name.startswith("Elapsed (wall clock) time"):
            parts = [float(p) for p in value.split(":")]
            usage["wall"] = sum(p * 60 ** i for i, p in enumerate(reversed(parts)))
        elif name in ("User time (seconds)", "System time (seconds)", "Maximum resident set size (kbytes)"):
            usage[name] = float(value)
    return usage


def map_steps(wells: pd.DataFrame, x: np.ndarray, genes: pd.DataFrame, pairs: pd.DataFrame) -> None:
    """The default corrections' steps, timed in process."""
    from rcic.profiles.correct import correct
    from rcic.profiles.metrics import known_recall, map_from_average_precision, probe_accuracy, similarity_scores

    meta = wells[META].reset_index(drop=True)
    steps = {}
    for method in ("none", "tvn"):
        t = time.perf_counter()
        z = correct(meta, x, method, controls="within")
        steps[f"{method}: correction"] = time.perf_counter() - t
        t = time.perf_counter()
        similarity = similarity_scores(meta, z)
        steps[f"{method}: similarities (replicate APs, batch leakage)"] = time.perf_counter() - t
        t = time.perf_counter()
        map_from_average_precision(similarity.average_precision)
        steps[f"{method}: mAP p-values (copairs)"] = time.perf_counter() - t
        t = time.perf_counter()
        known_recall(meta, z, genes, pairs)
        steps[f"{method}: known recall"] = time.perf_counter() - t
        t = time.perf_counter()
        probe_accuracy(meta, z)
        steps[f"{method}: linear probe"] = time.perf_counter() - t
    for name, seconds in steps.items():
        print(f"  {name:<52} {seconds:6.1f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", type=int, default=512)
    ap.add_argument("--fraction", type=float, default=1.0, help="share of each cell type's experiments")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "map_speed")
    ap.add_argument("--panel", action="store_true", help="time rcic map --panel instead")
    ap.add_argument("--bootstrap", type=int, default=200, help="siRNA resamples of the panel's rank intervals")
    ap.add_argument("--workers", type=int, default=2, help="rcic map --panel's worker processes")
    ap.add_argument("--steps", action="store_true", help="also time the default map's steps in process")
    ap.add_argument("--controls-study", action="store_true", help="score the --controls choices")
    args = ap.parse_args()
    if args.controls_study:
        return controls_study(args)
    time_map(args)


if __name__ == "__main__":
    main()
