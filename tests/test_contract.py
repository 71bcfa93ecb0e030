"""The contract, everywhere: bad input is one line on stderr and exit 2 (Ctrl-C 130), never a traceback,
never a silently wrong result, and files that existed before are left exactly as they were.

The table drives the ``rcic`` command line as a careless or hostile user would: in this process (its own
``main`` and error handling), or as a process where only a process shows it (a library writing to stderr).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rcic.io import read_dataset
from rcic.predict import Logits, load_logits, save_logits
from tests.conftest import run_cli

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
    process: bool = False  # run as a process: what a library prints on stderr shows only there


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


# --- stores whose parts are damaged (each a copy of the tiny store) -----------------------------------------

def _store(change, command: str = "info"):
    def make(folder, fx):
        store = Path(shutil.copytree(fx["store"], folder / "s.zarr"))
        change(store)
        if command == "rgb":
            return ["rgb", store, "--id", "HEPG2-01_1_B02", "--out", folder / "x.png"]
        return ["info", store]
    return make


def _flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def _edit_attrs(store: Path, change) -> None:
    meta = json.loads((store / "zarr.json").read_text())
    change(meta["attributes"])
    (store / "zarr.json").write_text(json.dumps(meta))


def _older_store(attrs: dict) -> None:
    attrs["rcic_store"] = 2
    for key in ("digest", "checksums"):
        attrs.pop(key)


def _sites_label_99999(store: Path) -> None:
    lines = (store / "sites.csv").read_text().splitlines()
    row = next(i for i, line in enumerate(lines) if ",train,treatment," in line)
    lines[row] = lines[row].rsplit(",", 1)[0] + ",99999"
    (store / "sites.csv").write_text("\n".join(lines) + "\n")


# --- inputs -------------------------------------------------------------------------------------------------

def _one_site(folder: Path, fx: dict, channel: int, change) -> list:
    """The tiny CSVs and the six PNGs of HEPG2-01_1_B02 site 1, one of them changed; rgb of that site."""
    data = _kaggle(folder, fx)
    plate = data / "train" / "HEPG2-01" / "Plate1"
    plate.mkdir(parents=True)
    for c in range(1, 7):
        shutil.copy(fx["data"] / "train" / "HEPG2-01" / "Plate1" / f"B02_s1_w{c}.png", plate / f"B02_s1_w{c}.png")
    change(plate / f"B02_s1_w{channel}.png")
    return ["rgb", data, "--id", "HEPG2-01_1_B02", "--out", folder / "x.png"]


def _huge_header(png: Path) -> None:
    data = bytearray(png.read_bytes())
    data[16:24] = (60000).to_bytes(4, "big") * 2
    png.write_bytes(bytes(data))


def _wide_values(png: Path) -> None:
    import cv2

    cv2.imwrite(str(png), cv2.imread(str(png), cv2.IMREAD_UNCHANGED).astype(np.uint16) * 256)


def _fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def _release(folder: Path, fx: dict, change) -> list:
    """The tiny data as the full RxRx1 release's metadata.csv (one row per site), changed by ``change``."""
    sites = read_dataset(fx["data"]).sites
    frame = pd.DataFrame({"experiment": sites.experiment, "plate": sites.plate, "well": sites.well,
                          "site": sites.site, "well_type": sites.well_type, "dataset": sites.split,
                          "sirna": sites.label, "sirna_id": sites.label})  # the real release has both
    change(frame)
    (folder / "release").mkdir()
    frame.to_csv(folder / "release" / "metadata.csv", index=False)
    return ["info", folder / "release"]


def _fifo_at(path: Path) -> Path:
    os.mkfifo(path)
    return path


def _fifo_csv(folder, fx):
    data = _kaggle(folder, fx)
    _fifo(data / "test.csv")
    return ["info", data]


def _one_val_row(folder, fx):
    def change(frame):
        frame.loc[5, "dataset"] = "val"
    return _release(folder, fx, change)


def _header_only_train(folder, fx):
    data = _kaggle(folder, fx)
    (data / "train.csv").write_text((data / "train.csv").read_text().splitlines()[0] + "\n")
    return ["train", "--data", data, "--recipe", "cpu-demo", "--out", folder / "r"]


def _recipe(text: str):
    def make(folder, fx):
        (folder / "r.yaml").write_text(text)
        return ["train", "--data", fx["store"], "--recipe", folder / "r.yaml", "--out", folder / "r"]
    return make


def _alias_bomb() -> str:
    lines = ['a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for previous, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{previous}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def _train_set(*items: str):
    return lambda d, fx: ["train", "--data", fx["store"], "--recipe", "cpu-demo", "--out", d / "r",
                          *[a for item in items for a in ("--set", item)]]


def _submit_logits(change):
    def make(folder, fx):
        full = load_logits(fx["test_logits"])
        arrays = change(full, folder, fx)
        if arrays is not None:
            np.savez(folder / "l.npz", **arrays)
        return ["submit", "--data", fx["store"], "--logits", folder / "l.npz", "--out", folder / "s.csv"]
    return make


def _repeated_class(full, folder, fx):
    classes = list(full.classes)
    classes[1] = classes[0]
    save_logits(folder / "l.npz", Logits(full.id_code, full.logits, classes))


def _with_a_train_well(full, folder, fx):
    ds = read_dataset(fx["data"])
    train_well = ds.wells[(ds.wells.split == "train") & (ds.wells.well_type == "treatment")].id_code.iloc[0]
    save_logits(folder / "l.npz", Logits(np.append(full.id_code, train_well),
                                         np.vstack([full.logits, full.logits[:1]]), full.classes))


def _too_large(full, folder, fx):
    return {"id_code": full.id_code, "logits": full.logits.astype(np.float64) * 1e300, "classes": full.classes}


def _forged_header(full, folder, fx):
    """An .npz whose logits header claims 10^15 values over a few stored bytes."""
    import io

    buffer = io.BytesIO()
    np.save(buffer, np.zeros((2, 3), np.float32))
    raw = buffer.getvalue()
    length = int.from_bytes(raw[8:10], "little")
    header = raw[10:10 + length].decode("latin1")
    forged = header.replace("(2, 3)", "(1000000000, 1000000)")
    forged = forged[:-1].rstrip(" ").ljust(length - 1) + "\n"
    with zipfile.ZipFile(folder / "l.npz", "w") as archive:
        archive.writestr("logits.npy", raw[:10] + forged.encode("latin1") + raw[10 + length:])
        for name, value in (("id_code", full.id_code), ("classes", np.asarray(full.classes))):
            member = io.BytesIO()
            np.save(member, value)
            archive.writestr(f"{name}.npy", member.getvalue())


def _bare_npy(full, folder, fx):
    with open(folder / "l.npz", "wb") as f:
        np.save(f, full.logits)


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
    # everything in a store is checked (issue 17)
    Case("store: ok chunk gone", _store(lambda s: (s / "ok" / "c" / "0").unlink()),
         "ok of sites 0-239 is missing from the store"),
    Case("store: a flipped bit in ok", _store(lambda s: _flip(s / "ok" / "c" / "0", 7)),
         "ok of sites 0-239 changed since it was packed"),
    Case("store: a label of sites.csv made 99999", _store(_sites_label_99999),
         "sites.csv: changed since it was packed"),
    Case("store: sites.csv cut", _store(lambda s: (s / "sites.csv").write_bytes((s / "sites.csv").read_bytes()[:999])),
         "sites.csv: changed since it was packed"),
    Case("store: zarr.json without size", _store(lambda s: _edit_attrs(s, lambda a: a.pop("size"))),
         "zarr.json"),
    Case("store: images metadata edited", _store(lambda s: _flip(s / "images" / "zarr.json", 20)),
         "images/zarr.json: changed since it was packed"),
    Case("store: an empty shard", _store(lambda s: (s / "images" / "c" / "0" / "0" / "0" / "0").write_bytes(b""),
                                         "rgb"), "cut short"),
    Case("store: written by the previous rcic", _store(lambda s: _edit_attrs(s, _older_store)),
         "pack the data again into a new store"),
    # inputs that slipped through (issue 17)
    Case("PNG header claiming 60000 x 60000", lambda d, fx: _one_site(d, fx, 3, _huge_header),
         "B02_s1_w3.png: PNG header claims 60000 x 60000 pixels"),
    Case("16-bit PNG of 16-bit values", lambda d, fx: _one_site(d, fx, 2, _wide_values),
         "B02_s1_w2.png: 16-bit PNG with values up to"),
    Case("FIFO in place of a PNG", lambda d, fx: _one_site(d, fx, 4, _fifo), "B02_s1_w4.png: is not a regular file"),
    Case("FIFO in place of a CSV", _fifo_csv, "test.csv: is not a regular file"),
    Case("train.csv with only its header", _header_only_train, "train.csv: no labelled treatment wells"),
    Case("two columns with one name", lambda d, fx: _line(d, fx, "train.csv", 0, lambda x: x + ",sirna"),
         "train.csv: column 'sirna' appears 2 times"),
    Case("one row's dataset value flips the release", _one_val_row, "has dataset 'val' on 1 row(s) (first: row 7)"),
    Case("logits repeating a class", _submit_logits(_repeated_class), "appears twice in the logits' classes"),
    Case("logits with a train well", _submit_logits(_with_a_train_well), "logits mix"),
    Case("logits too large for float32", _submit_logits(_too_large), "l.npz: logits too large for float32"),
    Case("npz header claiming a huge shape", _submit_logits(_forged_header), "l.npz: array logits claims shape"),
    Case("a bare .npy as logits", _submit_logits(_bare_npy), "l.npz: a single .npy array"),
    Case("recipe with a section written twice", _recipe("data:\n  batch_size: 8\ndata:\n  folds: 2\n"),
         "r.yaml: not valid YAML (key 'data' is written twice (lines 1 and 3))"),
    Case("recipe alias bomb", _recipe(_alias_bomb()), "r.yaml: not valid YAML (more than 100,000 values"),
    Case("optim.lr=.inf", _train_set("optim.lr=.inf"), "--set optim.lr=.inf: recipe key optim.lr: Input should be "
                                                       "a finite number"),
    Case("limit_train_batches=-3", _train_set("trainer.limit_train_batches=-3"),
         "recipe key trainer.limit_train_batches: must be a number of batches"),
    Case("batch size true", _train_set("data.batch_size=true"), "recipe key data.batch_size: must be a number"),
    Case("train --devices 0", lambda d, fx: ["train", "--data", fx["store"], "--recipe", "cpu-demo", "--out", d / "r",
                                             "--devices", "0"], "--devices must be a number of devices"),
    Case("predict --devices 0", lambda d, fx: ["predict", fx["run"], "--data", fx["store"], "--out", d / "x.npz",
                                               "--devices", "0"], "--devices must be a number of devices"),
    Case("predict --precision banana", lambda d, fx: ["predict", fx["run"], "--data", fx["store"], "--out",
                                                      d / "x.npz", "--precision", "banana"],
         "--precision must be one of auto"),
    Case("junk pretrained_file", lambda d, fx: _train_set(f"model.pretrained_file={_file('w.pth', os.urandom(64))(d)}")
         (d, fx), "w.pth: recipe key model.pretrained_file: not a weights file"),
    # a hostile user's further tries (issue 17's second round)
    Case("a PNG with a flipped byte", lambda d, fx: _one_site(d, fx, 5, lambda p: _flip(p, 60)),
         "B02_s1_w5.png: not a readable PNG image (a damaged 'IDAT' chunk", process=True),
    Case("submit --out is a FIFO", lambda d, fx: ["submit", "--data", fx["store"], "--logits", fx["test_logits"],
                                                  "--out", _fifo_at(d / "s.csv")], "s.csv: exists and is not"),
    Case("logits of no wells", _submit_logits(lambda full, d, fx: {"id_code": full.id_code[:0],
                                                                   "logits": full.logits[:0],
                                                                   "classes": full.classes}), "logits of 0 wells"),
    Case("logits ids as a matrix", _submit_logits(lambda full, d, fx: {"id_code": full.id_code[:4].reshape(2, 2),
                                                                       "logits": full.logits[:2],
                                                                       "classes": full.classes}), "must be lists"),
    Case("store: sites.csv is a folder", _store(lambda s: (s / "sites.csv").unlink() or (s / "sites.csv").mkdir()),
         "sites.csv: is a folder where the store holds a file"),
    Case("gs:// without gcsfs", lambda d, fx: ["info", "gs://bucket/x.zarr"], "pip install gcsfs"),
    Case("az:// without adlfs", lambda d, fx: ["info", "az://container/x.zarr"], "pip install adlfs"),
]


@pytest.fixture(scope="module")
def fixtures(tiny_data, tiny_store, tiny_run, tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("contract")
    logits = folder / "test.npz"
    run_cli("predict", tiny_run, "--data", tiny_store, "--tta", "1", "--out", logits)
    return {"data": tiny_data, "store": tiny_store, "run": tiny_run, "test_logits": logits}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(case, fixtures, tmp_path):
    shared = {k: snapshot(v) for k, v in fixtures.items() if Path(v).is_dir()}
    args = case.make(tmp_path, fixtures)
    before = snapshot(tmp_path)
    proc = run_cli(*args, cwd=tmp_path, check=False, process=case.process)
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
    proc = run_cli("info", data, check=False)
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
    run_cli("rgb", fixtures["data"], "--id", test_well, "--site", "2", "--out", tmp_path / "t.png")
    assert (tmp_path / "t.png").stat().st_size > 100


def test_eda_on_a_png_folder_and_over_its_own_report(fixtures, tmp_path):
    out = tmp_path / "eda"
    for _ in range(2):  # the second run replaces its own earlier report
        run_cli("eda", fixtures["data"], "--out", out)
    assert (out / "index.html").is_file() and (out / "intensity_by_experiment.png").is_file()


def test_score_names_the_whole_experiments_it_scored(fixtures, tmp_path):
    answers = pd.read_csv(fixtures["data"] / "train.csv", dtype=str)
    experiment = answers.id_code.str.rsplit("_", n=2).str[0]
    chosen = sorted(experiment.unique())[:2]
    answers[experiment.isin(chosen)][["id_code", "sirna"]].to_csv(tmp_path / "v.csv", index=False)
    proc = run_cli("score", "--submission", tmp_path / "v.csv", "--answers", fixtures["data"] / "train.csv", "--json")
    result = json.loads(proc.stdout)
    assert result["experiments"] == chosen and result["accuracy"] == 1.0


@pytest.mark.parametrize("flags", [[], ["--resume"]], ids=["train", "train --resume"])
def test_a_run_that_died_before_its_first_checkpoint_starts_again(fixtures, tmp_path, flags):
    """Nothing of such a run is worth keeping: with or without --resume, the run starts afresh and finishes."""
    from rcic.config import dump_recipe, load_recipe

    run = tmp_path / "run"
    (run / "logs").mkdir(parents=True)
    recipe = load_recipe(fixtures["run"] / "recipe.yaml", ["trainer.epochs=1", "data.fold=all"])
    (run / "recipe.yaml").write_text(dump_recipe(recipe))  # what the died run had written: the same recipe
    (run / "logs" / "metrics.csv").write_text("epoch,step\n")
    proc = run_cli("train", "--data", fixtures["store"], "--recipe", run / "recipe.yaml", "--out", run, *flags,
                   check=False)
    assert proc.returncode == 0, proc.stderr
    assert (run / "checkpoints" / "best.ckpt").is_file()


@pytest.mark.slow
def test_ctrl_c_is_one_line_and_exit_130(fixtures, tmp_path):
    proc = subprocess.Popen([RCIC, "train", "--data", str(fixtures["store"]), "--recipe", "cpu-demo", "--out",
                             str(tmp_path / "r"), "--set", "trainer.epochs=50", "--set", "data.num_workers=0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # a shell that runs the suite in the background ignores SIGINT for its children;
                            # a user's terminal does not, and that is the case under test
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
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


def test_an_output_that_is_a_symlink_is_written_through(fixtures, tmp_path):
    target = tmp_path / "kept" / "submission.csv"
    target.parent.mkdir()
    target.write_text("old\n")
    (tmp_path / "s.csv").symlink_to(target)
    run_cli("submit", "--data", fixtures["store"], "--logits", fixtures["test_logits"], "--out", tmp_path / "s.csv")
    assert (tmp_path / "s.csv").is_symlink() and os.readlink(tmp_path / "s.csv") == str(target)
    expected = pd.read_csv(fixtures["data"] / "sample_submission.csv", dtype=str).id_code.tolist()
    assert pd.read_csv(target, dtype=str).id_code.tolist() == expected
    assert sorted(os.listdir(target.parent)) == ["submission.csv"]  # no temp file left beside it


def test_eda_on_the_csvs_with_a_sparse_set_of_images(fixtures, tmp_path):
    """Images of one site only (as with a partial download): the first site reads, the sampled ones do not."""
    data = _kaggle(tmp_path, fixtures)
    first = read_dataset(data).sites.iloc[0]
    experiment, plate, _ = first.id_code.rsplit("_", 2)
    folder = data / first.split / experiment / f"Plate{plate}"
    folder.mkdir(parents=True)
    for c in range(1, 7):
        name = f"{first.well}_s{first.site}_w{c}.png"
        shutil.copy(fixtures["data"] / first.split / experiment / f"Plate{plate}" / name, folder / name)
    proc = run_cli("eda", data, "--out", tmp_path / "eda", check=False)
    assert proc.returncode == 0, proc.stderr
    page = (tmp_path / "eda" / "index.html").read_text()
    assert "sampled sites could be read" in page and "montage_experiments.png" in page


def test_ctrl_c_swallowed_by_a_finalizer_is_still_an_interruption(monkeypatch, capfd):
    # matplotlib drops transform children in weakref callbacks; a Ctrl-C landing there is "ignored" by Python
    # and a training run went on to finish with exit 0 (CI, stop 22)
    import gc

    from rcic import interrupts

    monkeypatch.setattr(interrupts, "_pending", False)
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        interrupts.install()

        class Finalized:
            def __del__(self):
                os.kill(os.getpid(), signal.SIGINT)
                for _ in range(1000):  # the handler runs between bytecodes, inside this finalizer
                    pass

        Finalized()
        gc.collect()
        assert interrupts.pending()
        with pytest.raises(KeyboardInterrupt):
            interrupts.check()
        assert "Exception ignored" not in capfd.readouterr().err  # the contract's one line stays one line
    finally:
        signal.signal(signal.SIGINT, previous)
