"""Site loading from PNGs and the reference colour composite."""

from __future__ import annotations

import numpy as np
import pytest

from rcic.errors import DataError
from rcic.io import load_site, to_rgb
from rcic.io.images import RGB_MAP
from tests.conftest import need_real_images, run_cli


def reference_rgb(t, channels=(1, 2, 3, 4, 5, 6), vmax=255):
    """Recursion's loop over channels, as FACTS.md states it."""
    out = []
    for i, c in enumerate(channels):
        colour, hi = RGB_MAP[c]
        x = (t[:, :, i] / vmax) / ((hi - 0) / 255) + 0 / 255
        x = np.where(x > 1.0, 1.0, x)
        out.append(np.array(np.outer(x, colour).reshape(t.shape[0], t.shape[1], 3), dtype=int))
    im = np.array(np.array(out).sum(axis=0), dtype=int)
    return np.where(im > 255, 255, im)


@pytest.mark.parametrize("vmax", [255, 200])
def test_to_rgb_matches_reference_pixel_for_pixel(vmax):
    t = np.random.default_rng(1).integers(0, 256, (37, 53, 6), dtype=np.uint8)
    got = to_rgb(t, vmax=vmax)
    assert got.shape == (37, 53, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, reference_rgb(t, vmax=vmax))


def test_to_rgb_channel_subset_and_real_site():
    t = np.random.default_rng(2).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    np.testing.assert_array_equal(to_rgb(t, channels=(1, 3, 5)), reference_rgb(t, channels=(1, 3, 5)))
    real = load_site(need_real_images(), "HEPG2-01_1_B02", 1)
    assert real.shape == (6, 512, 512) and real.dtype == np.uint8 and real.std() > 5
    np.testing.assert_array_equal(to_rgb(real.transpose(1, 2, 0)), reference_rgb(real.transpose(1, 2, 0)))


def test_missing_and_corrupt_channel_named(tiny_data, tmp_path):
    images = need_real_images()
    with pytest.raises(DataError, match=r"B02_s2_w5\.png: channel image not found"):
        load_site(images, "HEPG2-01_1_B02", 2)  # the real files lack site-2 channels 5 and 6
    bad = tmp_path / "train" / "HEPG2-01" / "Plate1"
    bad.mkdir(parents=True)
    for c in range(1, 7):
        (bad / f"B02_s1_w{c}.png").write_bytes((tiny_data / "train/HEPG2-01/Plate1/B02_s1_w1.png").read_bytes())
    (bad / "B02_s1_w3.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match=r"B02_s1_w3\.png: not a readable PNG"):
        load_site(tmp_path, "HEPG2-01_1_B02", 1)


def test_rgb_command_writes_composite(tiny_data, tmp_path):
    import cv2

    out = tmp_path / "site.png"
    run_cli("rgb", tiny_data, "--id", "HEPG2-01_1_B02", "--site", "2", "--out", out)
    written = cv2.cvtColor(cv2.imread(str(out)), cv2.COLOR_BGR2RGB)
    expected = to_rgb(load_site(tiny_data, "HEPG2-01_1_B02", 2).transpose(1, 2, 0))
    np.testing.assert_array_equal(written, expected)
    proc = run_cli("rgb", tiny_data, "--id", "HEPG2-01_1_A01", "--out", tmp_path / "x.png", check=False)
    assert proc.returncode == 2 and "HEPG2-01_1_A01 is in none of this data's metadata files" in proc.stderr
    assert not (tmp_path / "x.png").exists()


def test_16_bit_pngs_of_8_bit_values_read_as_they_are(tiny_data, tmp_path):
    """8-bit data stored as 16-bit PNGs (a re-export) keeps its intensities: not shifted down to black."""
    import shutil

    import cv2

    plate = tmp_path / "train" / "HEPG2-01" / "Plate1"
    plate.mkdir(parents=True)
    for c in range(1, 7):
        source = tiny_data / "train" / "HEPG2-01" / "Plate1" / f"B02_s1_w{c}.png"
        if c % 2:
            cv2.imwrite(str(plate / source.name), cv2.imread(str(source), cv2.IMREAD_UNCHANGED).astype(np.uint16))
        else:
            shutil.copy(source, plate / source.name)
    wide = load_site(tmp_path, "HEPG2-01_1_B02", 1)
    assert cv2.imread(str(plate / "B02_s1_w1.png"), cv2.IMREAD_UNCHANGED).dtype == np.uint16
    assert wide.dtype == np.uint8 and wide.max() > 0
    np.testing.assert_array_equal(wide, load_site(tiny_data, "HEPG2-01_1_B02", 1))
