"""A run survives being killed at any moment; its folder is locked; loading a file never runs its code.

The kill-anywhere property test trains in forked processes (the test process has imported torch
once) and kills them with SIGKILL at moments of an uninterrupted run: after a training step, while a
file (a checkpoint, the log, run.json) is half written, after it is renamed into place, and while the
run finishes. Every resumed run must end with the uninterrupted run's weights, or refuse with one line
that says how to start over. RCIC_KILL_MOMENTS=20 runs the issue's 20 moments (the default suite
runs 4: right after the first checkpoint, right after the first checkpoint of the second epoch, inside a
checkpoint write, inside the finish).
"""

from __future__ import annotations

import importlib
import json
import os
import pickle
import shutil
import signal
import traceback
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch

import rcic.atomic
from rcic.config import load_recipe
from rcic.errors import RcicError
from rcic.store import open_source
from rcic.training.fit import fit, lock_run_dir
from tests.conftest import run_cli

# data.fold: all with trainer.val_every_n_steps (the seed-densenet121 case: no validation, step
# checkpoints), a frozen backbone in epoch 0 (a mid-epoch resume must keep it frozen), CutMix
KILL_RECIPE = ["data.num_workers=0", "data.batch_size=8", "data.folds=2", "data.fold=all", "data.image_size=16",
               "trainer.epochs=2", "trainer.limit_train_batches=3", "trainer.val_every_n_steps=2",
               "trainer.accelerator=cpu", "optim.freeze_backbone_epochs=1", "augment.cutmix=0.5"]
KILL_MOMENTS = int(os.environ.get("RCIC_KILL_MOMENTS", "4"))
# the modules (rcic.training re-exports a function named fit)
fit_module = importlib.import_module("rcic.training.fit")
callbacks_module = importlib.import_module("rcic.training.callbacks")


class _Moments:
    """Counts the moments of a run and kills the process (SIGKILL) at the chosen one."""

    def __init__(self, kill_at: int | None):
        self.kill_at, self.labels, self.finishing = kill_at, [], False

    def __call__(self, label: str, cut: Path | None = None) -> None:
        self.labels.append(("finish: " if self.finishing else "") + label)
        if len(self.labels) - 1 != self.kill_at:
            return
        # killed in the middle of writing this file (a hard link to another file is made whole, never written)
        if cut is not None and cut.is_file() and cut.stat().st_nlink == 1:
            os.truncate(cut, cut.stat().st_size // 2)
        os.kill(os.getpid(), signal.SIGKILL)


def _install(moments: _Moments) -> L.Callback:
    """Hooks on every atomic write (checkpoints, logs, run.json), the log's appends and the finish."""
    plain = rcic.atomic.atomic_path  # patched in the forked child only

    @contextmanager
    def killable(path):
        with plain(path) as tmp:
            yield tmp
            moments(f"writing {Path(path).name}", cut=tmp)
        moments(f"wrote {Path(path).name}")

    for module in (rcic.atomic, fit_module, callbacks_module):
        module.atomic_path = killable
    save = callbacks_module._ResumedWriter.save

    def logged(writer):
        save(writer)
        moments("appended metrics.csv", cut=Path(writer.metrics_file_path))

    callbacks_module._ResumedWriter.save = logged
    finish = fit_module._finish

    def finishing(*args):
        moments.finishing = True
        moments("finish starts")
        finish(*args)

    fit_module._finish = finishing

    class Steps(L.Callback):
        def on_train_batch_end(self, trainer, *args) -> None:
            moments(f"step {trainer.global_step}")

    return Steps()


def _train_in_child(store: Path, run_dir: Path, resume: bool, kill_at: int | None, report: Path) -> int:
    """Train in a forked process; returns its wait status. ``report`` gets the moments, or the error line."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            torch.set_num_threads(1)
            moments = _Moments(kill_at)
            steps = _install(moments)
            recipe = load_recipe("cpu-demo", KILL_RECIPE)
            fit(open_source(store), recipe, run_dir, resume=resume, progress=False, extra_callbacks=[steps])
            report.write_text(json.dumps(moments.labels))
            code = 0
        except RcicError as err:
            report.write_text(str(err))
            code = 2
        except BaseException:
            report.write_text(traceback.format_exc())
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return status


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def reference(tiny_store, tmp_path_factory) -> tuple[Path, list[str]]:
    """An uninterrupted run and the labels of its moments."""
    out = tmp_path_factory.mktemp("lifecycle") / "reference"
    report = out.with_suffix(".json")
    status = _train_in_child(tiny_store, out, False, None, report)
    assert os.waitstatus_to_exitcode(status) == 0, report.read_text()
    return out, json.loads(report.read_text())


def _chosen_moments(labels: list[str], n: int) -> list[int]:
    """Right after the first checkpoint; right after the first checkpoint of the second epoch (the log kept
    from epoch 0 lacks columns epoch 1 logs: Lightning's CSV writer crashed there); inside a checkpoint
    write; inside the finish; then seeded random moments."""
    rng = np.random.default_rng(17)
    wrote = [i for i, label in enumerate(labels) if label.startswith("wrote") and label.endswith(".ckpt")]
    second_epoch = next(i for i, label in enumerate(labels) if label.startswith("step")
                        and i > labels.index("wrote epoch000.ckpt"))
    writes = [i for i, label in enumerate(labels) if label.startswith("writing") and label.endswith(".ckpt")]
    finish = [i for i, label in enumerate(labels) if label.startswith("finish")]
    last = next(i for i in wrote if i > second_epoch and labels[i] == "wrote last.ckpt")
    chosen = [wrote[0], last, int(rng.choice(writes)), int(rng.choice(finish))]
    rest = [i for i in range(len(labels)) if i not in chosen]
    chosen += [int(i) for i in rng.choice(rest, size=max(n - len(chosen), 0), replace=False)]
    return chosen[:n]


def test_a_run_killed_at_any_moment_resumes_to_the_same_weights(reference, tiny_store, tmp_path):
    ref_dir, labels = reference
    assert (ref_dir / "checkpoints" / "best.ckpt").is_file()  # data.fold: all with val_every_n_steps
    expected = _weights(ref_dir / "checkpoints" / "last.ckpt")
    expected_best = _weights(ref_dir / "checkpoints" / "best.ckpt")  # data.fold: all: the last epoch's
    ref_columns = list(pd.read_csv(ref_dir / "logs" / "metrics.csv").columns)
    for moment in _chosen_moments(labels, KILL_MOMENTS):
        run_dir, report = tmp_path / f"killed-{moment}", tmp_path / f"report-{moment}"
        status = _train_in_child(tiny_store, run_dir, False, moment, report)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, labels[moment]
        status = _train_in_child(tiny_store, run_dir, True, None, report)
        code = os.waitstatus_to_exitcode(status)
        if code == 2:  # a refusal must be one line saying how to start over
            message = report.read_text()
            assert "start over" in message and "\n" not in message, (labels[moment], message)
            continue
        assert code == 0, (labels[moment], report.read_text())
        for name, want in (("last.ckpt", expected), ("best.ckpt", expected_best)):
            got = _weights(run_dir / "checkpoints" / name)
            assert got.keys() == want.keys(), (labels[moment], name)
            for key in want:
                torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=f"{labels[moment]}: {name}")
        info = json.loads((run_dir / "run.json").read_text())
        assert info["complete"] and info["compacted"], labels[moment]
        assert not list(run_dir.rglob(".*.tmp-*")), labels[moment]  # no half-written file stays behind
        assert list(pd.read_csv(run_dir / "logs" / "metrics.csv").columns) == ref_columns, labels[moment]
        for path in (run_dir / "checkpoints").iterdir():
            assert "optimizer_states" not in torch.load(path, map_location="cpu", weights_only=True), path


@pytest.fixture(scope="module")
def killed_run(reference, tiny_store, tmp_path_factory) -> Path:
    """A run killed in its second epoch, with its resume points on disk (the refusals leave it as it is)."""
    _, labels = reference
    moment = next(i for i, label in enumerate(labels) if label == "step 5")
    run_dir = tmp_path_factory.mktemp("lifecycle") / "killed"
    status = _train_in_child(tiny_store, run_dir, False, moment, run_dir.with_suffix(".json"))
    assert os.WIFSIGNALED(status)
    return run_dir


def _one_line_refusal(proc, *words: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    for word in words:
        assert word in proc.stderr, (word, proc.stderr)


def _train_args(store, run_dir) -> list:
    args = ["train", "--data", store, "--recipe", "cpu-demo", "--out", run_dir]
    for override in KILL_RECIPE:
        args += ["--set", override]
    return args


def test_resume_refuses_what_changes_the_computation(killed_run, tiny_store, tiny_data, tmp_path):
    before = (killed_run / "run.json").read_text()
    proc = run_cli(*_train_args(tiny_store, killed_run), "--resume", "--devices", "2", check=False)
    _one_line_refusal(proc, "2 device(s)", "trained on 1 x 1", "--devices 1", "start over with another --out")
    # the same data with one label changed (a CSV that differs from the run's)
    other = tmp_path / "other"
    other.mkdir()
    for path in tiny_data.iterdir():
        (other / path.name).symlink_to(path)
    (other / "train.csv").unlink()
    train = pd.read_csv(tiny_data / "train.csv")
    train.loc[0, "sirna"] = train.loc[1, "sirna"] if train.loc[0, "sirna"] != train.loc[1, "sirna"] else \
        train.loc[2, "sirna"]
    train.to_csv(other / "train.csv", index=False)
    proc = run_cli(*_train_args(other, killed_run), "--resume", check=False)
    _one_line_refusal(proc, "other data than the run's", "start over with another --out")
    # pseudo-labels that the run did not train with
    recipe = load_recipe("cpu-demo", KILL_RECIPE)
    test_wells = open_source(tiny_store).dataset.sites.query("split == 'test'")["id_code"].unique()[:4]
    pseudo = pd.DataFrame({"id_code": test_wells, "label": ["0"] * len(test_wells)})
    with pytest.raises(RcicError, match="other pseudo-labels.*start over"):
        fit(open_source(tiny_store), recipe, killed_run, resume=True, extra_train=pseudo, progress=False)
    assert (killed_run / "run.json").read_text() == before


def test_a_cut_last_checkpoint_falls_back_to_an_older_one_or_is_one_line(killed_run, reference, tiny_store, tmp_path):
    last = killed_run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 3])
    status = _train_in_child(tiny_store, killed_run, True, None, tmp_path / "report")
    assert os.waitstatus_to_exitcode(status) == 0, (tmp_path / "report").read_text()
    expected = _weights(reference[0] / "checkpoints" / "last.ckpt")
    got = _weights(last)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)
    # nothing intact to resume from: one line
    run_dir = tmp_path / "cut"
    (run_dir / "checkpoints").mkdir(parents=True)
    for name in ("recipe.yaml", "run.json"):
        shutil.copy(killed_run / name, run_dir / name)
    info = json.loads((run_dir / "run.json").read_text()) | {"complete": False}
    (run_dir / "run.json").write_text(json.dumps(info))
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"PK\x03\x04 cut")
    proc = run_cli(*_train_args(tiny_store, run_dir), "--resume", check=False)
    _one_line_refusal(proc, "last.ckpt", "cut or damaged", "start over with another --out")


def test_a_second_train_in_the_same_folder_is_refused(tiny_store, tmp_path):
    run_dir = tmp_path / "run"
    with lock_run_dir(run_dir):
        proc = run_cli(*_train_args(tiny_store, run_dir), check=False)
        _one_line_refusal(proc, str(run_dir), "in use by another rcic train", f"pid {os.getpid()}")
        assert [p.name for p in run_dir.iterdir()] == ["run.lock"]
    assert not run_dir.exists()  # the lock of a run that wrote nothing goes with its folder


class _Marker:
    """A pickle that would create a file when loaded with plain pickle."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_a_malicious_checkpoint_runs_nothing(tiny_run, tiny_store, tmp_path):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.ckpt"
    checkpoint = torch.load(tiny_run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    torch.save(checkpoint | {"payload": _Marker(marker)}, evil)
    with pytest.raises(pickle.UnpicklingError):  # it is a real exploit: plain unpickling would run it
        torch.load(evil, weights_only=True)
    proc = run_cli("predict", tiny_run, "--data", tiny_store, "--out", tmp_path / "logits.npz",
                   "--checkpoint", evil, check=False)
    _one_line_refusal(proc, str(evil), "never loads")
    # the same file as a run's resume point
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copy(tiny_run / "recipe.yaml", run_dir / "recipe.yaml")
    (run_dir / "run.json").write_text(json.dumps({"complete": False}))
    shutil.copy(evil, run_dir / "checkpoints" / "last.ckpt")
    proc = run_cli("train", "--data", tiny_store, "--recipe", run_dir / "recipe.yaml", "--out", run_dir, "--resume",
                   check=False)
    _one_line_refusal(proc, "never loads", "start over")
    assert not marker.exists()


def test_a_run_trained_with_pretrained_weights_loads_without_them(tiny_run, tmp_path):
    from rcic.predict.runner import load_task

    checkpoint = torch.load(tiny_run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    checkpoint["hyper_parameters"]["recipe"]["model"]["pretrained"] = True  # test_resnet has none offline
    torch.save(checkpoint, tmp_path / "pretrained.ckpt")
    task = load_task(tmp_path / "pretrained.ckpt")
    for key, value in task.state_dict().items():
        assert torch.equal(value, checkpoint["state_dict"][key]), key


def test_quiet_lightning_silences_only_known_warnings():
    import warnings

    from rcic.cli import _quiet_lightning

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        _quiet_lightning()
        warnings.warn("something a user must see", UserWarning, stacklevel=1)
        warnings.warn("an API going away", DeprecationWarning, stacklevel=1)
        from lightning.pytorch.utilities import rank_zero_warn

        rank_zero_warn("Checkpoint directory /x exists and is not empty.")
    assert [str(w.message) for w in seen] == ["something a user must see", "an API going away"]
