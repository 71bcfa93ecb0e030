"""Mutation score of the modules that decide results, with mutmut 3, one module at a time.

    python bench/mutation.py [assign submit profiles panel config metadata] [--children 2] [--sample N] [--keep]
                             [--seed 0]
                             [--real] [--examples 6] [--out DIR] [--report]

For each module, a scratch copy of ``src/``, ``tests/`` and ``pyproject.toml`` goes to
``DIR/<module>/`` (default ``bench/out/mutation``), its ``[tool.mutmut]`` table narrowed to that
module's files (``only_mutate``) and to the tests that cover it (``pytest_add_cli_args_test_selection``);
then ``mutmut run --max-children N`` (under ``nice``) mutates it there: mutmut copies the tree to
``mutants/``, runs the selected tests once to learn which test reaches which function, and runs,
for each mutant, only the tests that reach it. The checkout itself is never touched.

Tests are restricted to the fast ones: slow end-to-end tests (training a model per mutant) and,
unless ``--real``, the tests on the real RxRx1 CSVs (~1 min each on 2 cores) are left out; the real
CSVs make no new mutant reachable that the synthetic tests do not reach. The property tests draw
``--examples`` examples each (``RCIC_PROPERTY_EXAMPLES``; 15 in CI) and pytest stops at the first
failure, so that a mutant costs seconds.

``--sample N`` tests N mutants drawn at random (``--seed``, 0 by default) instead of all of them: on 2 busy
cores a mutant costs ~10 s, and a module has 300-800 (the score of a random sample estimates the module's,
within ~1/sqrt(N); another ``--seed`` draws another sample to confirm it). ``--keep`` reuses a module's folder,
so mutants already tested are not rerun (a second sample with ``--keep`` skips mutmut's first pass).

Results: ``DIR/<module>.json`` (counts by status and the surviving mutants) and one line per module
on stdout; ``mutmut show NAME`` inside ``DIR/<module>/`` prints a survivor's diff. A mutant is
"killed" when a test fails, "survived" when all pass, "no tests" when no selected test reaches its
function. Score = (killed + timeout) / (killed + timeout + survived + no tests): a mutant that no
test reaches counts as not found. Equivalent survivors are judged by hand and listed in BENCHMARKS.md.
Not part of CI: 10-30 minutes per module on 2 busy cores.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# module -> (files to mutate, the tests that cover them)
MODULES: dict[str, tuple[list[str], list[str]]] = {
    "assign": (["src/rcic/assign/*"], ["tests/test_assign.py", "tests/test_properties.py",
                                       "tests/test_plate_aware.py::test_sinkhorn_rows_and_columns_sum_to_one_and_plates_"
                                       "stay_permutations"]),
    "submit": (["src/rcic/submit/*"], ["tests/test_assign.py", "tests/test_properties.py",
                                       *(f"tests/test_predict_submit.py::test_{name}" for name in (
                                           "score_by_hand_and_what_it_refuses",
                                           "read_submission_csv_refuses_empty_or_repeated_files",
                                           "make_submission_labels_by_hand_and_its_refusals",
                                           "leak_pseudo_labels_are_the_most_confident_plate_assigned_test_wells"))]),
    # profiles: the corrections, the map's metrics, the embeddings files (panel.py apart: its fast tests reach
    # only a few of its functions, the rest is scored against scib-metrics by slow tests); the tests on
    # hand-made tables: those that synthesise and pack images (intensity_embeddings, ~1 min a mutant) or train a
    # model (tiny_run; embed_wells) are left out
    "profiles": ([f"src/rcic/profiles/{name}.py" for name in ("__init__", "correct", "metrics", "embeddings")], [
        "tests/test_properties.py",
        *(f"tests/test_profiles.py::test_{name}" for name in (
            "average_precision_equals_copairs", "average_precision_by_hand", "batch_leakage_and_known_recall_by_hand",
            "probe_holds_out_whole_experiments", "corrections_refuse_too_few_controls_unknown_methods_and_control_sets",
            "controls_all_and_within_pick_every_control_and_center_uses_their_mean",
            "principal_components_are_the_centred_datas_projections", "scored_wells_leave_out_the_seen_ones_and_say_so",
            "gene_tables_must_share_labels_and_genes", "embeddings_files_round_trip_and_their_defects_are_named",
            "map_scores_are_the_metrics_of_each_corrections_output_on_a_small_table",
            "average_precision_with_many_positives_equals_a_brute_force_ranking")),
        *(f"tests/test_maps.py::test_{name}" for name in (
            "within_controls_by_hand", "negative_controls_too_few_is_one_line",
            "center_standardize_spherize_known_answers",
            "spherize_regularisation_shrinks_each_control_direction_as_stated", "tvn_is_efaars_definition",
            "pca_is_the_first_components", "batch_only_shift_is_removed",
            "harmony_is_harmonypy_on_the_principal_components",
            "map_scores_unseen_wells_and_says_how_many", "silhouette_subsample_keeps_every_sirna_across_experiments",
            "replicate_map_against_negative_controls_by_hand", "aggregate_is_arevalos",
            "map_html_shows_the_panel_as_a_heat_table"))]),
    "panel": (["src/rcic/profiles/panel.py"], [f"tests/test_maps.py::test_{name}" for name in (
        "silhouette_subsample_keeps_every_sirna_across_experiments", "replicate_map_against_negative_controls_by_hand",
        "aggregate_is_arevalos", "map_html_shows_the_panel_as_a_heat_table")]),
    "config": (["src/rcic/config.py"], ["tests/test_config.py"]),
    "metadata": (["src/rcic/io/metadata.py"], ["tests/test_io_metadata.py", "tests/test_properties.py"]),
}
# mutmut's exit codes (mutmut.stats.status_by_exit_code), the ones a run gives
STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped", 36: "timeout",
          24: "timeout", -24: "timeout", 152: "timeout", 255: "timeout", 37: "caught by type check",
          None: "not checked"}


def mutmut_table(only_mutate: list[str], tests: list[str]) -> str:
    selection = [t for t in tests if (ROOT / t.split("::")[0]).exists()]
    return ("\n[tool.mutmut]\n"
            'source_paths = ["src"]\n'
            f"only_mutate = {json.dumps(only_mutate)}\n"
            f"pytest_add_cli_args_test_selection = {json.dumps(selection)}\n"
            'pytest_add_cli_args = ["-p", "no:cacheprovider", "-q", "-x", "-m",'
            ' "not slow and not gpu and not browser"]\n'
            'process_isolation = "forkserver"\n'  # torch is not fork-safe once the suite has run
            # CPU seconds a mutant's tests may take beyond 15x their clean time: the clean times leave out the
            # fixtures' set-up, which would otherwise end sound mutants as "timeout" on a busy machine
            "timeout_constant = 60.0\n"
            "use_git_change_detection = false\n")


def prepare(module: str, out: Path) -> Path:
    only_mutate, tests = MODULES[module]
    work = out / module
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", ".hypothesis")
    for folder in ("src", "tests"):
        shutil.copytree(ROOT / folder, work / folder, ignore=ignore)
    text = (ROOT / "pyproject.toml").read_text()
    text = re.sub(r"\n\[tool\.mutmut\]\n(?:(?!\n\[).)*", "\n", text, flags=re.S)  # the project's table, replaced
    (work / "pyproject.toml").write_text(text + mutmut_table(only_mutate, tests))
    return work


def results(work: Path, chosen: list[str] | None = None) -> dict:
    statuses: dict[str, str] = {}
    for meta in (work / "mutants").rglob("*.py.meta"):
        for name, code in json.loads(meta.read_text())["exit_code_by_key"].items():
            if chosen is None or name in chosen:
                statuses[name] = STATUS.get(code, "suspicious")
    counts = Counter(statuses.values())
    detected = counts["killed"] + counts["timeout"]  # a hang that a test's timeout stops is found too
    decided = detected + counts["survived"] + counts["no tests"]  # a mutant no test reaches is not found
    return {"counts": dict(counts), "mutants": len(statuses),
            "score": round(detected / decided, 4) if decided else None,
            "survived": sorted(n for n, s in statuses.items() if s == "survived"),
            "no_tests": sorted(n for n, s in statuses.items() if s == "no tests")}


def mutant_names(work: Path) -> list[str]:
    return sorted(name for meta in (work / "mutants").rglob("*.py.meta")
                  for name in json.loads(meta.read_text())["exit_code_by_key"])


def run(module: str, out: Path, children: int, real: bool, examples: int, sample: int | None, keep: bool,
        seed: int = 0) -> dict:
    work = out / module if keep and (out / module / "mutants").is_dir() else prepare(module, out)
    env = {**os.environ, "RCIC_REALDATA": os.environ.get("RCIC_REALDATA", "") if real else str(work / "no-real-data"),
           "RCIC_PROPERTY_EXAMPLES": str(examples)}
    command = ["nice", "-n", "10", str(Path(sys.executable).with_name("mutmut")), "run", "--max-children",
               str(children)]
    chosen = None
    with open(work / "mutmut.log", "a") as log:
        if sample is not None:
            if not (work / "mutants").is_dir():  # mutmut generates the mutants (and learns which test reaches
                # which function) in any run: one asked for a name that matches nothing stops right after that
                subprocess.run([*command, "no-such-mutant"], cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
            names = mutant_names(work)
            chosen = sorted(random.Random(seed).sample(names, min(sample, len(names))))
        proc = subprocess.run([*command, *(chosen or [])], cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
    result = {"module": module, "files": MODULES[module][0], "tests": MODULES[module][1],
              "mutmut_exit": proc.returncode, "sample": sample, "seed": seed, **results(work, chosen)}
    (out / f"{module}.json").write_text(json.dumps(result, indent=2))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("modules", nargs="*", default=list(MODULES), choices=list(MODULES))
    ap.add_argument("--children", type=int, default=2, help="mutants tested at once (cores)")
    ap.add_argument("--real", action="store_true", help="also run the tests on the real RxRx1 CSVs")
    ap.add_argument("--examples", type=int, default=6, help="hypothesis examples per property test (CI: 15)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "mutation")
    ap.add_argument("--report", action="store_true", help="only read the results of finished runs in --out")
    ap.add_argument("--sample", type=int, help="test this many mutants per module, drawn at random")
    ap.add_argument("--seed", type=int, default=0, help="the seed of --sample's draw")
    ap.add_argument("--keep", action="store_true", help="reuse --out/MODULE: mutants already tested are not rerun")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for module in args.modules:
        if args.report:
            names = mutant_names(args.out.resolve() / module)
            chosen = (sorted(random.Random(args.seed).sample(names, min(args.sample, len(names))))
                      if args.sample else None)
            r = results(args.out.resolve() / module, chosen)
            (args.out / f"{module}-report.json").write_text(json.dumps(r, indent=2))
        else:
            r = run(module, args.out.resolve(), args.children, args.real, args.examples, args.sample, args.keep,
                    args.seed)
        c = r["counts"]
        print(f"{module:<10} {r['mutants']:>5} mutants  killed {c.get('killed', 0):>4}  survived "
              f"{c.get('survived', 0):>4}  timeout {c.get('timeout', 0):>3}  no tests {c.get('no tests', 0):>4}  "
              f"score {r['score']}", flush=True)


if __name__ == "__main__":
    main()
