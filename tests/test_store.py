"""Packing into the zarr store: identical pixels, resume, refusal to mix datasets, missing files."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import zarr

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


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_pack_cli_resize_and_compression(tiny_data, tmp_path, compression):
    out = tmp_path / "s.zarr"
    run_cli("pack", tiny_data, "--out", out, "--size", "16", "--compression", compression, "--workers", "2")
    store = PackedStore(out)
    assert store.size == 16 and store.compression == compression
    assert store.read(0).shape == (6, 16, 16)


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
        pack(tiny_data, out)
    with pytest.raises(DataError, match="incomplete"):
        PackedStore(out)
    done_before = zarr.open_group(out, mode="r")["done"][:].sum()
    assert done_before == 2
    calls.clear()
    result = pack(tiny_data, out)
    assert result.resumed_blocks == 2 and calls[0] == 2 and len(calls) == zarr.open_group(out)["done"].shape[0] - 2
    png, store = open_source(tiny_data), open_source(out)
    for i in (0, 40, 100, 239):
        row = store.dataset.sites.iloc[i]
        np.testing.assert_array_equal(store.read_site(row), png.read_site(row))


def test_refuses_to_mix_two_datasets(tiny_data, tiny_store, tmp_path):
    proc = run_cli("pack", tiny_data, "--out", tiny_store, "--size", "16", check=False)
    assert proc.returncode == 2 and "holds another dataset" in proc.stderr
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file.txt").write_text("x")
    proc = run_cli("pack", tiny_data, "--out", tmp_path / "junk", check=False)
    assert proc.returncode == 2 and "not an rcic store" in proc.stderr


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


def test_parallel_pack_writes_every_sites_statistics(tmp_path):
    """Workers write disjoint chunks: the per-site channel statistics of every site survive (52 blocks)."""
    from rcic.synth import generate, preset

    data = generate(tmp_path / "d", preset("small", image_size=16), workers=2)
    store = PackedStore(pack(data, tmp_path / "p.zarr", workers=2).path)
    stats = store.channel_stats()
    images = np.stack([store.read(i) for i in store.dataset.sites["store_index"]]).astype(np.float64)
    flat = images.reshape(len(images), 6, -1)
    np.testing.assert_allclose(stats[..., 0], flat.mean(-1), rtol=1e-4)
    np.testing.assert_allclose(stats[..., 1], flat.std(-1), rtol=1e-3, atol=1e-3)
