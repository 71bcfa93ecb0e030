"""Packing into the zarr store: identical pixels, shards, checksums, resume, locks, refusals, missing files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from rcic.errors import DataError
from rcic.store import PackedStore, open_source, pack
from tests.conftest import run_cli


def test_store_reads_the_same_pixels_as_png(tiny_data, tiny_store):
    png, store = open_source(tiny_data), open_source(tiny_store)
    assert len(store.dataset.sites) == len(png.dataset.sites) and store.dataset.layout == "kaggle-2019"
    for i in (0, 17, len(png.dataset.sites) - 1):
        row = store.dataset.sites.iloc[i]
        np.testing.assert_array_equal(store.read_site(row), png.read_site(row))
    stats = store.channel_stats()
    first = png.read_site(store.dataset.sites.iloc[0]).reshape(6, -1)
    np.testing.assert_allclose(stats[0, :, 0], first.mean(-1), rtol=1e-5)
    assert store.dataset.test_ids == png.dataset.test_ids


@pytest.mark.parametrize("compression,shard", [("none", 1), ("zstd", 1), ("lz4", 7), ("none", 64)])
def test_pack_resize_compression_and_shards(tiny_data, tmp_path, compression, shard):
    out = tmp_path / "s.zarr"
    run_cli("pack", tiny_data, "--out", out, "--size", "16", "--compression", compression, "--shard", str(shard),
            "--workers", "2")
    store = PackedStore(out)
    assert store.size == 16 and store.compression == compression and store.shard == shard
    objects = {p.relative_to(out / "images" / "c").parts[0] for p in (out / "images" / "c").rglob("*") if p.is_file()}
    assert len(objects) == -(-len(store.dataset.sites) // shard)  # one object per shard (or per site)
    reference = PackedStore(pack(tiny_data, tmp_path / "ref.zarr", size=16, shard=1).path)
    for i in (0, 6, 7, 100, len(store.dataset.sites) - 1):  # across shard boundaries and the partial last shard
        np.testing.assert_array_equal(store.read(i), reference.read(i))
        np.testing.assert_array_equal(store.read(i), store.images[i])  # the direct path equals zarr's own read


def test_interrupted_pack_resumes_without_redoing_blocks(tiny_data, tmp_path, monkeypatch):
    import rcic.store.packed as packed

    out = tmp_path / "s.zarr"
    calls, crashed = [], []
    real_block = packed._pack_block

    def crash_on_third(args):
        calls.append(args[2])
        if len(calls) == 3 and not crashed:
            crashed.append(True)
            raise RuntimeError("simulated crash")
        return real_block(args)

    monkeypatch.setattr(packed, "_pack_block", crash_on_third)
    with pytest.raises(RuntimeError, match="simulated"):
        pack(tiny_data, out, shard=16)
    with pytest.raises(DataError, match="incomplete"):
        PackedStore(out)
    assert sorted(os.listdir(out / "ok" / "c")) == ["0", "1"]  # finished blocks are marked
    calls.clear()
    result = pack(tiny_data, out, shard=16)
    assert result.resumed_blocks == 2 and calls[0] == 2 and len(calls) == 15 - 2
    png, store = open_source(tiny_data), open_source(out)
    for i in (0, 40, 100, 239):
        row = store.dataset.sites.iloc[i]
        np.testing.assert_array_equal(store.read_site(row), png.read_site(row))


def test_refusals_leave_stores_and_folders_as_they_were(tiny_data, tiny_store, tmp_path):
    proc = run_cli("pack", tiny_data, "--out", tiny_store, "--size", "16", check=False)
    assert proc.returncode == 2 and "holds another dataset" in proc.stderr
    proc = run_cli("pack", tiny_data, "--out", tiny_store, "--compression", "zstd", check=False)
    assert proc.returncode == 2 and "--compression lz4" in proc.stderr
    proc = run_cli("pack", tiny_data, "--out", tiny_store, "--shard", "8", check=False)
    assert proc.returncode == 2 and "--shard" in proc.stderr
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file.txt").write_text("x")
    proc = run_cli("pack", tiny_data, "--out", tmp_path / "junk", check=False)
    assert proc.returncode == 2 and "not an rcic store" in proc.stderr
    proc = run_cli("pack", tiny_data, "--out", tmp_path / "big.zarr", "--size", "64", check=False)
    assert proc.returncode == 2 and "larger than the sites" in proc.stderr and not (tmp_path / "big.zarr").exists()
    proc = run_cli("pack", tiny_data, "--out", tmp_path / "x.zarr", "--shard", "0", check=False)
    assert proc.returncode == 2 and "--shard" in proc.stderr and not (tmp_path / "x.zarr").exists()


def test_checksums_and_missing_chunks_are_errors_naming_the_site(tiny_data, tmp_path):
    for shard in (1, 16):
        out = pack(tiny_data, tmp_path / f"s{shard}.zarr", shard=shard).path
        store = PackedStore(out)
        row = store.dataset.sites.iloc[5]
        chunk = out / "images" / "c" / str(5 // shard) / "0" / "0" / "0"
        data = bytearray(chunk.read_bytes())
        data[len(data) // 3] ^= 0xFF  # one flipped byte inside site 5's chunk (or shard)
        chunk.write_bytes(bytes(data))
        damaged = PackedStore(out)
        with pytest.raises(DataError) as err:
            for i in range(16):
                damaged.read(i)
        assert "the store is damaged" in str(err.value) and str(out) in str(err.value)
        if shard == 1:
            assert f"{row['id_code']} site {row['site']}" in str(err.value)
            (out / "images" / "c" / "9" / "0" / "0" / "0").unlink()
            with pytest.raises(DataError, match="is missing from the store"):
                PackedStore(out).read(9)
    (tmp_path / "s1.zarr" / "zarr.json").write_bytes(b"\x00garbage")
    proc = run_cli("info", tmp_path / "s1.zarr", check=False)
    assert proc.returncode == 2 and "zarr.json" in proc.stderr and "Traceback" not in proc.stderr


def test_skip_missing_on_real_pngs(real_b02, tmp_path):
    out = tmp_path / "real.zarr"
    proc = run_cli("pack", real_b02, "--out", out, check=False)
    assert proc.returncode == 2 and "_s2_w5.png: channel image not found" in proc.stderr
    run_cli("pack", real_b02, "--out", tmp_path / "real2.zarr", "--skip-missing", "--size", "128")
    store = PackedStore(tmp_path / "real2.zarr")
    assert len(store.dataset.sites) == 12 and set(store.dataset.sites.site) == {1}
    report = pd.read_csv(tmp_path / "real2.zarr" / "missing.csv")
    assert len(report) == 12 and report.reason.str.contains("w5.png").all()
    assert store.read(0).shape == (6, 128, 128) and store.read(0).std() > 5
    # only the sites that exist take space: a partial download never stores a zero site per gap
    for shard in (1, 8):
        out = tmp_path / f"none{shard}.zarr"
        run_cli("pack", real_b02, "--out", out, "--skip-missing", "--size", "128", "--compression", "none",
                "--shard", str(shard))
        raw = PackedStore(out)
        assert raw.nbytes_stored() < 12 * (6 * 128 * 128 + 64) + 2 * 24 * 16
        for i in range(0, 12, 5):
            np.testing.assert_array_equal(raw.read(int(raw.dataset.sites.store_index.iloc[i])),
                                          store.read(int(store.dataset.sites.store_index.iloc[i])))


def test_parallel_pack_writes_every_sites_statistics(tmp_path):
    """Workers write disjoint objects: the per-site channel statistics of every site survive."""
    from rcic.synth import generate, preset

    data = generate(tmp_path / "d", preset("small", image_size=16), workers=2)
    store = PackedStore(pack(data, tmp_path / "p.zarr", workers=2, shard=64).path)
    stats = store.channel_stats()
    images = np.stack([store.read(i) for i in store.dataset.sites["store_index"]]).astype(np.float64)
    flat = images.reshape(len(images), 6, -1)
    np.testing.assert_allclose(stats[..., 0], flat.mean(-1), rtol=1e-4)
    np.testing.assert_allclose(stats[..., 1], flat.std(-1), rtol=1e-3, atol=1e-3)


def _pack_process(data, out, *args):
    return subprocess.Popen([sys.executable, "-m", "rcic.cli", "pack", str(data), "--out", str(out), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


@pytest.mark.slow
def test_one_pack_at_a_time_and_killed_packs_leave_no_workers(tmp_path):
    """A second pack on the same store is refused; kill -9 of a pack takes its workers along; it resumes."""
    from rcic.synth import generate, preset

    data = generate(tmp_path / "d", preset("small", image_size=128), workers=2)
    out = tmp_path / "s.zarr"
    first = _pack_process(data, out, "--workers", "2", "--shard", "8", "--compression", "zstd")
    while not (out / "ok" / "c").is_dir() or not os.listdir(out / "ok" / "c"):
        assert first.poll() is None, first.stderr.read()
        time.sleep(0.05)
    second = _pack_process(data, out, "--workers", "2", "--shard", "8", "--compression", "zstd")
    _, err = second.communicate(timeout=120)
    assert second.returncode == 2 and "another pack is writing this store" in err
    assert len(err.strip().splitlines()) == 1
    workers = _children(first.pid)
    assert workers
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    deadline = time.time() + 10
    while any(_alive(p) for p in workers) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in workers)
    run_cli("pack", data, "--out", out, "--workers", "2", "--shard", "8", "--compression", "zstd")
    png, store = open_source(data), open_source(out)
    for i in range(0, len(store.dataset.sites), 97):
        row = store.dataset.sites.iloc[i]
        np.testing.assert_array_equal(store.read_site(row), png.read_site(row))


def test_a_pack_killed_while_creating_its_store_starts_it_again(tiny_data, tmp_path):
    out = tmp_path / "s.zarr"
    out.mkdir()
    (out / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group",
                                               "attributes": {"rcic_creating": True}}))
    run_cli("pack", tiny_data, "--out", out, "--shard", "32")
    assert PackedStore(out).read(3).shape == (6, 32, 32)


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_stats_ok_and_tables_are_checked_when_read(tiny_data, tmp_path):
    """Every part of a store is verified: a missing or flipped stats chunk is an error, never zeros; the site
    table is validated as the CSVs it came from even where its checksum was forged to match."""
    import hashlib

    import rcic.store.packed as packed

    out = pack(tiny_data, tmp_path / "s.zarr", shard=16).path
    reference = PackedStore(out).channel_stats()
    sites, png = PackedStore(out).dataset.sites, open_source(tiny_data)
    for i in range(0, len(sites), 5):  # each site's per-channel mean and std of its pixels, in site-table order
        pixels = png.read_site(sites.iloc[i]).reshape(6, -1).astype(np.float64)
        np.testing.assert_allclose(reference[i], np.stack([pixels.mean(1), pixels.std(1)], axis=1), rtol=1e-5)
    chunk = out / "stats" / "c" / "1" / "0" / "0"
    saved = chunk.read_bytes()
    chunk.unlink()
    with pytest.raises(DataError, match=r"stats of sites 16-31 is missing from the store"):
        PackedStore(out).channel_stats()
    damaged = bytearray(saved)
    damaged[10] ^= 0x01
    chunk.write_bytes(bytes(damaged))
    with pytest.raises(DataError, match=r"stats of sites 16-31 changed since it was packed"):
        PackedStore(out).channel_stats()
    chunk.write_bytes(saved)
    np.testing.assert_array_equal(PackedStore(out).channel_stats(), reference)

    # a label made 99999 with the checksum and digest forged to match: the table's own validation refuses it
    meta = json.loads((out / "zarr.json").read_text())
    table = (out / "sites.csv").read_text().splitlines()
    well = next(line for line in table if ",train,treatment," in line).split(",")[0]
    table = [line.rsplit(",", 1)[0] + ",99999" if line.startswith(well + ",") else line for line in table]
    data = ("\n".join(table) + "\n").encode()
    (out / "sites.csv").write_bytes(data)
    meta["attributes"]["checksums"]["sites.csv"] = hashlib.sha256(data).hexdigest()
    meta["attributes"]["digest"] = packed._digest(meta["attributes"])
    (out / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"sites.csv: treatment label '99999' .* outside the treatment range"):
        PackedStore(out)


def test_a_store_of_the_previous_format_is_refused_by_reads_and_packs(tiny_data, tmp_path):
    out = pack(tiny_data, tmp_path / "s.zarr", shard=64).path
    meta = json.loads((out / "zarr.json").read_text())
    meta["attributes"]["rcic_store"] = 2
    for key in ("digest", "checksums"):
        meta["attributes"].pop(key)
    (out / "zarr.json").write_text(json.dumps(meta))
    for args in (("info", out), ("pack", tiny_data, "--out", out, "--shard", "64")):
        proc = run_cli(*args, check=False)
        assert proc.returncode == 2 and "store format 2" in proc.stderr and "pack the data again" in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1


def test_object_store_errors_are_named_by_their_type_not_their_words():
    """What an object store raised is told by its exception type (and a client error's code): a message without
    the words "credentials" or "connect" is still classified, and one that has them misleads nothing."""
    import botocore.exceptions as boto

    from rcic.store.location import NotFound, remote_errors

    url = "s3://bucket/x.zarr"
    cases = [
        (boto.NoCredentialsError(), "no credentials"),
        (boto.EndpointConnectionError(endpoint_url="http://10.0.0.1:9"), "cannot reach the object store"),
        (boto.ClientError({"Error": {"Code": "NoSuchBucket", "Message": "gone"}}, "ListObjectsV2"),
         "the bucket does not exist"),
        (boto.ClientError({"Error": {"Code": "SlowDown", "Message": "cannot connect: bad credentials"}}, "GetObject"),
         "refused the request"),
        (ImportError("no gcsfs"), "s3:// URLs need the s3fs package"),
    ]
    for raised, message in cases:
        with pytest.raises(DataError, match=message) as err:
            with remote_errors(url):
                raise raised
        assert str(err.value).startswith(url)
    wrapped = OSError("Errno 5: unexpected")  # s3fs's OSError that carries botocore's error as its cause
    wrapped.__cause__ = boto.ConnectTimeoutError(endpoint_url="http://10.0.0.1:9")
    with pytest.raises(DataError, match="cannot reach"), remote_errors(url):
        raise wrapped
    with pytest.raises(NotFound), remote_errors(url):
        raise FileNotFoundError("x.zarr/zarr.json")
