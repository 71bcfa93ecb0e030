"""The contract, everywhere: bad input is one line on stderr and exit 2 (Ctrl-C 130), never a traceback,
never a silently wrong result, and files that existed before are left exactly as they were.

The table drives the installed ``rcic`` command, as a careless or hostile user would.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from rcic.io import read_dataset
from rcic.predict import Logits, load_logits, save_logits

RCIC = str(Path(sys.executable).with_name("rcic"))
ROOT_USER = hasattr(os, "geteuid") and os.geteuid() == 0


def rcic(*args, cwd=None, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([RCIC, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=timeout,
                          env={**os.environ, "COLUMNS": "200", **(env or {})})


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


@dataclass
class Case:
    name: str
    make: Callable[[Path, dict], list]  # (case folder, fixtures) -> arguments of rcic
    message: str
    code: int = 2


def _edit(path: Path, old: str, new: str, count: int = 1) -> None:
    path.write_text(path.read_text().replace(old, new, count))


def _kaggle(folder: Path, fx: dict) -> Path:
    """A copy of the tiny dataset's CSVs (no images) to break."""
    data = folder / "data"
    data.mkdir()
    for name in ("train.csv", "test.csv", "train_controls.csv", "test_controls.csv", "sample_submission.csv"):
        shutil.copy(fx["data"] / name, data / name)
    return data


def _line(folder: Path, fx: dict, file: str, number: int, change) -> list:
    """``rcic info`` on a copy of the CSVs whose line ``number`` (0 = header) of ``file`` is changed."""
    data = _kaggle(folder, fx)
    lines = (data / file).read_text().splitlines()
    lines[number] = change(lines[number])
    (data / file).write_text("\n".join(lines) + "\n")
    return ["info", data]


def _label(value: str, file: str = "train.csv"):
    def make(folder, fx):
        data = _kaggle(folder, fx)
        lines = (data / file).read_text().splitlines()
        parts = lines[3].split(",")
        parts[4] = value
        lines[3] = ",".join(parts)
        (data / file).write_text("\n".join(lines) + "\n")
        return ["info", data]
    return make


def _logits_lacking_classes(folder, fx):
    full = load_logits(fx["test_logits"])
    keep = [i for i, c in enumerate(full.classes) if c != full.classes[1]]
    save_logits(folder / "l.npz", Logits(full.id_code, full.logits[:, keep], [full.classes[i] for i in keep]))
    return ["submit", "--data", fx["store"], "--logits", folder / "l.npz", "--out", folder / "s.csv"]


def _partial_experiment(folder, fx):
    frame = pd.read_csv(fx["data"] / "answers.csv", dtype=str)
    frame.iloc[: len(frame) // 2 + 3].to_csv(folder / "s.csv", index=False)
    return ["score", "--submission", folder / "s.csv", "--answers", fx["data"] / "answers.csv"]


def _foreign_spelling(folder, fx):
    frame = pd.read_csv(fx["data"] / "answers.csv", dtype=str)
    frame.loc[0, "sirna"] = "sirna_5"
    frame.to_csv(folder / "s.csv", index=False)
    return ["score", "--submission", folder / "s.csv", "--answers", fx["data"] / "answers.csv"]


def _file(name: str, content: bytes = b"x"):
    def make(folder):
        (folder / name).write_bytes(content)
        return folder / name
    return make


CASES = [
    # usage
    Case("unknown option", lambda d, fx: ["train", "--bogus"], "No such option: --bogus"),
    Case("missing required option", lambda d, fx: ["train"], "Missing option '--data'"),
    Case("no arguments", lambda d, fx: [], "no command given"),
    Case("unknown split after the run is loaded", lambda d, fx: ["evaluate", fx["run"], "--data", fx["store"],
                                                                 "--split", "bogus"], "--split must be one of"),
    Case("batch size 0", lambda d, fx: ["predict", fx["run"], "--data", fx["store"], "--out", d / "x.npz",
                                        "--batch-size", "0"], "--batch-size"),
    # CSVs and recipes
    Case("row with more fields", lambda d, fx: _line(d, fx, "train.csv", 2, lambda x: x + ",extra"), "fields"),
    Case("recipe of random bytes", lambda d, fx: ["train", "--data", fx["store"], "--out", d / "r", "--recipe",
                                                  _file("r.yaml", os.urandom(300))(d)], "r.yaml"),
    Case("recipe not UTF-8", lambda d, fx: ["train", "--data", fx["store"], "--out", d / "r", "--recipe",
                                            _file("r.yaml", "name: caf\xe9\n".encode("latin-1"))(d)], "not UTF-8"),
    # outputs that are files or inputs
    Case("pack --out is a file", lambda d, fx: ["pack", fx["data"], "--out", _file("f")(d)], "is not a folder"),
    Case("train --out is a file", lambda d, fx: ["train", "--data", fx["store"], "--recipe", "cpu-demo",
                                                 "--out", _file("f")(d)], "is not a folder"),
    Case("eda --out is a file", lambda d, fx: ["eda", fx["data"], "--out", _file("f")(d)], "is not a folder"),
    Case("rgb --out not an image", lambda d, fx: ["rgb", fx["data"], "--id", "HEPG2-01_1_B02", "--out",
                                                  _file("f.txt")(d)], ".png"),
    Case("submit --out is its logits", lambda d, fx: ["submit", "--data", fx["store"], "--logits",
                                                      shutil.copy(fx["test_logits"], d / "x.npz"), "--out",
                                                      d / "x.npz"], "is also an input"),
    Case("predict --out is the data", lambda d, fx: ["predict", fx["run"], "--data", fx["data"], "--out",
                                                     fx["data"]], ".npz"),
    Case("eda over a foreign folder", lambda d, fx: ["eda", fx["data"], "--out",
                                                     _file("index.html", b"<p>mine</p>")(d).parent],
         "holds no earlier rcic report"),
    # broken files
    Case("0-byte npz", lambda d, fx: ["submit", "--data", fx["store"], "--logits", _file("x.npz", b"")(d),
                                      "--out", d / "s.csv"], "0 bytes"),
    Case("truncated npz", lambda d, fx: ["submit", "--data", fx["store"], "--logits",
                                         _file("x.npz", Path(fx["test_logits"]).read_bytes()[:300])(d),
                                         "--out", d / "s.csv"], "truncated"),
    Case("checkpoint that is not one", lambda d, fx: ["predict", fx["run"], "--data", fx["store"], "--checkpoint",
                                                      _file("c.ckpt", b"PK\x03\x04 nope")(d), "--out", d / "x.npz"],
         "not a readable rcic checkpoint"),
    Case("0-byte submission", lambda d, fx: ["score", "--submission", _file("s.csv", b"")(d), "--answers",
                                             fx["data"] / "answers.csv"], "0 bytes"),
    # silent wrong results
    Case("label 99999", _label("99999"), "outside the treatment range"),
    Case("label 1.5", _label("1.5"), "'1.5'"),
    Case("label banana", _label("banana"), "'banana'"),
    Case("2023 spelling in a 2019 file", _label("sirna_5"), "mixed label spellings"),
    Case("control label on a treatment", _label("10"), "names different kinds of well"),
    Case("logits lacking classes", _logits_lacking_classes, "lack 1 of this data's"),
    Case("score part of an experiment", _partial_experiment, "whole experiments"),
    Case("score a foreign spelling", _foreign_spelling, "not spelt as the answers"),
    Case("experiment with ..", lambda d, fx: _line(d, fx, "test.csv", 1, lambda x: "../x_1_B03,../x,1,B03"),
         "is not a plain name"),
    Case("rgb --id leaving the folder", lambda d, fx: ["rgb", fx["data"], "--id", "../../etc_1_B02", "--out",
                                                       d / "x.png"], "not of the form"),
    Case("rgb --id in no metadata", lambda d, fx: ["rgb", fx["data"], "--id", "HEPG2-01_1_A01", "--out",
                                                   d / "x.png"], "in none of this data's metadata"),
    Case("evaluate the unlabelled test split", lambda d, fx: ["evaluate", fx["run"], "--data", fx["store"],
                                                              "--split", "test"], "no label"),
]


@pytest.fixture(scope="module")
def fixtures(tiny_data, tiny_store, tiny_run, tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("contract")
    logits = folder / "test.npz"
    proc = rcic("predict", tiny_run, "--data", tiny_store, "--tta", "1", "--out", logits)
    assert proc.returncode == 0, proc.stderr
    return {"data": tiny_data, "store": tiny_store, "run": tiny_run, "test_logits": logits}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(case, fixtures, tmp_path):
    shared = {k: snapshot(v) for k, v in fixtures.items() if Path(v).is_dir()}
    args = case.make(tmp_path, fixtures)
    before = snapshot(tmp_path)
    proc = rcic(*args, cwd=tmp_path)
    lines = proc.stderr.rstrip().splitlines()  # no blank line before the error either
    assert proc.returncode == case.code, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    assert case.message in lines[0], lines[0]
    assert snapshot(tmp_path) == before  # nothing written, nothing half-written, nothing destroyed
    assert {k: snapshot(v) for k, v in fixtures.items() if Path(v).is_dir()} == shared


@pytest.mark.skipif(ROOT_USER, reason="root reads files whatever their permissions")
def test_unreadable_files(fixtures, tmp_path):
    data = _kaggle(tmp_path, fixtures)
    (data / "test.csv").chmod(0)
    proc = rcic("info", data)
    assert proc.returncode == 2 and "permission denied" in proc.stderr and len(proc.stderr.splitlines()) == 1


def test_whitespace_never_makes_a_new_cell_type(fixtures, tmp_path):
    data = _kaggle(tmp_path, fixtures)
    _edit(data / "train.csv", ",HEPG2-01,", ", HEPG2-01 ,", 5)
    _edit(data / "test.csv", "HUVEC-03_1_", " HUVEC-03_1_", 1)
    clean, spaced = read_dataset(fixtures["data"]).summary(), read_dataset(data).summary()
    assert {k: v for k, v in spaced.items() if k != "root"} == {k: v for k, v in clean.items() if k != "root"}


def test_rgb_reads_a_test_well_from_where_its_layout_keeps_it(fixtures, tmp_path):
    ds = read_dataset(fixtures["data"])
    test_well = ds.wells[ds.wells.split == "test"].id_code.iloc[0]
    proc = rcic("rgb", fixtures["data"], "--id", test_well, "--site", "2", "--out", tmp_path / "t.png")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "t.png").stat().st_size > 100


def test_eda_on_a_png_folder_and_over_its_own_report(fixtures, tmp_path):
    out = tmp_path / "eda"
    for _ in range(2):  # the second run replaces its own earlier report
        proc = rcic("eda", fixtures["data"], "--out", out)
        assert proc.returncode == 0, proc.stderr
    assert (out / "index.html").is_file() and (out / "intensity_by_experiment.png").is_file()


def test_score_names_the_whole_experiments_it_scored(fixtures, tmp_path):
    answers = pd.read_csv(fixtures["data"] / "train.csv", dtype=str)
    experiment = answers.id_code.str.rsplit("_", n=2).str[0]
    chosen = sorted(experiment.unique())[:2]
    answers[experiment.isin(chosen)][["id_code", "sirna"]].to_csv(tmp_path / "v.csv", index=False)
    proc = rcic("score", "--submission", tmp_path / "v.csv", "--answers", fixtures["data"] / "train.csv", "--json")
    assert proc.returncode == 0, proc.stderr
    import json

    result = json.loads(proc.stdout)
    assert result["experiments"] == chosen and result["accuracy"] == 1.0


def test_a_run_that_died_before_its_first_checkpoint_starts_again(fixtures, tmp_path):
    run = tmp_path / "run"
    (run / "logs").mkdir(parents=True)
    shutil.copy(fixtures["run"] / "recipe.yaml", run / "recipe.yaml")
    (run / "logs" / "metrics.csv").write_text("epoch,step\n")
    for flags in ([], ["--resume"]):
        proc = rcic("train", "--data", fixtures["store"], "--recipe", run / "recipe.yaml", "--out", run,
                    "--set", "trainer.epochs=1", "--set", "data.fold=all", *flags)
        assert proc.returncode == 0 or "holds a run already" in proc.stderr, proc.stderr
    assert (run / "checkpoints" / "best.ckpt").is_file()


@pytest.mark.slow
def test_ctrl_c_is_one_line_and_exit_130(fixtures, tmp_path):
    proc = subprocess.Popen([RCIC, "train", "--data", str(fixtures["store"]), "--recipe", "cpu-demo", "--out",
                             str(tmp_path / "r"), "--set", "trainer.epochs=50", "--set", "data.num_workers=0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (tmp_path / "r" / "run.json").is_file() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: interrupted") and "Traceback" not in err


def _tiny_filesystem(tmp_path: Path, size: str) -> list[str] | None:
    """A command prefix that runs inside a private mount namespace with a tmpfs of ``size`` at tmp_path/full."""
    if shutil.which("unshare") is None:
        return None
    (tmp_path / "full").mkdir()
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            f"mount -t tmpfs -o size={size} none {tmp_path / 'full'}"], capture_output=True)
    return None if probe.returncode else ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c"]


@pytest.mark.parametrize("command", ["pack", "train", "predict", "submit"])
def test_disk_full_is_one_line_and_loses_nothing(fixtures, tmp_path, command):
    prefix = _tiny_filesystem(tmp_path, "600k" if command in ("pack", "train") else "8k")
    if prefix is None:
        pytest.skip("no unprivileged mount namespace here to make a full disk")
    full = tmp_path / "full"
    args = {"pack": ["pack", fixtures["data"], "--out", full / "s.zarr"],
            "train": ["train", "--data", fixtures["store"], "--recipe", "cpu-demo", "--out", full / "r",
                      "--set", "trainer.epochs=1", "--set", "data.num_workers=0"],
            "predict": ["predict", fixtures["run"], "--data", fixtures["store"], "--tta", "1",
                        "--out", full / "x.npz"],
            "submit": ["submit", "--data", fixtures["store"], "--logits", fixtures["test_logits"],
                       "--out", full / "s.csv"]}[command]
    filler = "" if command in ("pack", "train") else f"head -c 7k /dev/zero > {full}/filler; "
    script = (f"mount -t tmpfs -o size={'600k' if command in ('pack', 'train') else '8k'} none {full} && {filler}"
              f"COLUMNS=200 {RCIC} {' '.join(map(str, args))}; code=$?; ls -A {full}; exit $code")
    proc = subprocess.run([*prefix, script], capture_output=True, text=True, timeout=600)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and "no space left on device" in lines[0] and "Traceback" not in proc.stderr
    leftovers = set(proc.stdout.split()) - {"filler", "s.zarr", "r"}
    assert not any(name.startswith(".") and "tmp" in name for name in leftovers), proc.stdout  # no temp files
    if command in ("predict", "submit"):
        assert not leftovers, proc.stdout  # no half-written output
