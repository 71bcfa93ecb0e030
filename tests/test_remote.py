"""Stores on object storage, end to end against a local S3-compatible server that the tests start
themselves (moto's server mode on 127.0.0.1), never a mock of rcic's code."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from rcic.errors import DataError
from rcic.store import PackedStore, open_source, pack

BUCKET = "rcic-test"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A local S3 server and the standard AWS environment that points rcic (s3fs/botocore) at it."""
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir(BUCKET)
    yield env
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


def rcic(*args, env=None, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "rcic.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200", **(env or {})}, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"rcic {' '.join(map(str, args))} failed:\n{proc.stderr[-3000:]}")
    return proc


@pytest.mark.slow
def test_pack_train_predict_submit_from_a_bucket(s3, tiny_data, tmp_path):
    url = f"s3://{BUCKET}/tiny.zarr"
    rcic("pack", tiny_data, "--out", url, "--shard", "32", "--workers", "2")
    import s3fs

    objects = s3fs.S3FileSystem().find(f"{BUCKET}/tiny.zarr/images")
    assert len([o for o in objects if "/c/" in o]) == -(-240 // 32)  # one object per shard
    run = tmp_path / "run"
    rcic("train", "--data", url, "--recipe", "cpu-demo", "--out", run, "--set", "trainer.epochs=1",
         "--set", "data.batch_size=16", "--set", "data.folds=2", "--set", "data.num_workers=2")
    rcic("predict", run, "--data", url, "--tta", "2", "--out", tmp_path / "test.npz")
    rcic("submit", "--data", url, "--logits", tmp_path / "test.npz", "--out", tmp_path / "s.csv")
    submission = pd.read_csv(tmp_path / "s.csv", dtype=str)
    assert submission.id_code.tolist() == pd.read_csv(tiny_data / "sample_submission.csv", dtype=str).id_code.tolist()
    assert submission.sirna.isin(set(open_source(url).dataset.vocab.treatment_labels)).all()
    png, remote = open_source(tiny_data), open_source(url)
    for i in (0, 31, 32, 239):  # across shard boundaries: the same pixels as the PNGs
        row = remote.dataset.sites.iloc[i]
        np.testing.assert_array_equal(remote.read_site(row), png.read_site(row))


def test_a_killed_remote_pack_resumes(s3, tiny_data, monkeypatch):
    import rcic.store.packed as packed

    url = f"s3://{BUCKET}/resume.zarr"
    calls = []
    real_block = packed._pack_block

    def crash_on_third(args):
        calls.append(args[2])
        if len(calls) == 3:
            raise RuntimeError("killed")
        return real_block(args)

    monkeypatch.setattr(packed, "_pack_block", crash_on_third)
    with pytest.raises(RuntimeError, match="killed"):
        pack(tiny_data, url, shard=32)
    with pytest.raises(DataError, match="incomplete"):
        PackedStore(url)
    monkeypatch.setattr(packed, "_pack_block", real_block)
    result = pack(tiny_data, url, shard=32)
    assert result.resumed_blocks == 2 and result.packed == 240
    store = PackedStore(url)
    np.testing.assert_array_equal(store.read(200), open_source(tiny_data).read_site(store.dataset.sites.iloc[200]))


@pytest.mark.parametrize("where,env,message", [
    ("s3://{bucket}/nothing.zarr", {}, "not an rcic packed store"),
    ("s3://no-such-bucket-rcic/x.zarr", {}, "does not exist"),
    ("s3://{bucket}/x.zarr", {"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}, "cannot reach the object store"),
    ("s3://{bucket}/x.zarr", {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "",
                              "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent"},
     "no credentials"),
    ("ftp://host/x.zarr", {}, "unsupported URL scheme"),
])
def test_bad_buckets_are_one_line(s3, tiny_store, where, env, message):
    url = where.format(bucket=BUCKET)
    env = {k: v for k, v in env.items()}
    proc = rcic("info", url, env=env, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and url.split("/")[2] in lines[0], proc.stderr


def test_pack_to_a_missing_bucket_writes_nothing(s3, tiny_data):
    proc = rcic("pack", tiny_data, "--out", "s3://no-such-bucket-rcic/x.zarr", check=False)
    assert proc.returncode == 2 and "does not exist" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
