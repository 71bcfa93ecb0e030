"""Normalisation and augmentation kernels: the worker path and the device path are one implementation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rcic.config import load_recipe
from rcic.data.augment import (
    TTA_SETS,
    AugmentParams,
    apply_params,
    d4_transform,
    draw_params,
    generator,
    normalize,
    prepare,
)

AUGMENT = load_recipe("winning", ["augment.intensity_jitter=0.2"]).augment  # D4, crops, jitter


def _images(n=6, c=6, size=24, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, c, size, size), dtype=np.uint8))


def test_worker_and_device_paths_give_identical_results_for_identical_parameters():
    images = normalize(_images(), "image")
    params = draw_params(AUGMENT, len(images), 6, generator(0, 1, 2))
    batched = apply_params(images, params, 16)  # the device path: one call on the batch
    for i in range(len(images)):  # the worker path: one sample at a time
        one = AugmentParams(params.d4[i:i + 1], params.crop[i:i + 1], params.gain[i:i + 1], params.shift[i:i + 1])
        torch.testing.assert_close(apply_params(images[i:i + 1], one, 16)[0], batched[i], rtol=0, atol=0)


def test_prepare_is_a_function_of_its_generator():
    images, stats = _images(), torch.rand(6, 6, 2) * 50 + 1
    a = prepare(images, "experiment", stats, 16, AUGMENT, generator(3, 0, 5))
    b = prepare(images, "experiment", stats, 16, AUGMENT, generator(3, 0, 5))
    c = prepare(images, "experiment", stats, 16, AUGMENT, generator(3, 0, 6))
    assert torch.equal(a, b) and not torch.equal(a, c) and a.shape == (6, 6, 16, 16)


def test_parameters_cover_their_distributions():
    params = draw_params(AUGMENT, 4000, 6, generator(1))
    counts = torch.bincount(params.d4, minlength=8).float() / 4000
    assert torch.allclose(counts, torch.full((8,), 1 / 8), atol=0.03)  # every D4 element alike
    area = params.crop[:, 2] * params.crop[:, 3]
    low, high = AUGMENT.random_resized_crop.scale
    assert area.min() >= low - 1e-6 and area.max() <= high + 1e-6
    assert (params.crop[:, 0] + params.crop[:, 2] <= 1 + 1e-6).all()
    assert params.gain.min() >= 0.8 and params.gain.max() <= 1.2 and params.shift.abs().max() <= 0.2


def test_normalisation_matches_its_definition():
    images = _images(2)
    x = images.double()
    expected = (x - x.mean((2, 3), keepdim=True)) / x.std((2, 3), keepdim=True, unbiased=False).clamp_min(1.0)
    torch.testing.assert_close(normalize(images, "image").double(), expected, rtol=1e-5, atol=1e-5)
    stats = torch.tensor([[10.0, 2.0]] * 6).expand(2, 6, 2)
    torch.testing.assert_close(normalize(images, "experiment", stats), (images.float() - 10.0) / 2.0)
    assert normalize(images, "none").max() <= 1.0


def test_d4_kernels_form_the_group():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    images = [d4_transform(x, k) for k in range(8)]
    assert len({tuple(i.flatten().tolist()) for i in images}) == 8
    assert torch.equal(d4_transform(d4_transform(x, 1), 3), x)  # four quarter turns
    assert torch.equal(d4_transform(d4_transform(x, 4), 4), x)  # a flip twice
    assert TTA_SETS[8] == tuple(range(8))


@pytest.mark.parametrize("on", ["workers", "device"])
def test_each_path_augments_its_training_batch_as_the_kernels_say(tiny_store, on):
    """The batch the model trains on is the kernels' output for that path's generator, and not the plain
    batch: an augmentation that does nothing on either path fails here."""
    from rcic.data import RxRxDataModule
    from rcic.store import open_source
    from rcic.training.fit import build_task

    recipe = load_recipe("cpu-demo", [f"augment.on={on}", "data.num_workers=0", "data.batch_size=8", "data.folds=2",
                                      "augment.intensity_jitter=0.2",
                                      "augment.random_resized_crop={scale: [0.5, 1.0]}"])
    source = open_source(tiny_store)
    dm = RxRxDataModule(source, recipe.data, recipe.augment, recipe.seed, on)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))  # epoch 0
    got = build_task(dm, recipe, on, channels_last=False)._images(batch, 3, train=True)  # batch 3 of epoch 0
    index = batch["index"].tolist()
    raw = torch.stack([torch.from_numpy(np.ascontiguousarray(source.read_site(dm.train_set.records[i])))
                       for i in index])
    norm, stats, size = recipe.data.normalization, batch["stats"], dm.input_size
    if on == "device":  # one draw for the whole batch, from the step's generator (seed, epoch, batch, rank)
        expected = prepare(raw, norm, stats, size, recipe.augment, generator(recipe.seed, 0, 3, 0, 1))
    else:  # one draw per sample, from its own generator (seed, epoch, index)
        expected = torch.cat([prepare(raw[j:j + 1], norm, stats[j:j + 1], size, recipe.augment,
                                      generator(recipe.seed, 0, i)) for j, i in enumerate(index)])
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    plain = prepare(raw, norm, stats, size)
    assert got.shape == plain.shape and not torch.isclose(got, plain).all(dim=(1, 2, 3)).any()  # each one changed


@pytest.mark.parametrize("on", ["workers", "device"])
def test_training_with_augmentation_on_workers_or_device(tiny_store, tmp_path, on):
    from rcic.store import open_source
    from rcic.training import fit

    recipe = load_recipe("cpu-demo", [f"augment.on={on}", "data.num_workers=0", "data.batch_size=16",
                                      "data.folds=2", "trainer.epochs=1", "augment.cutmix=0.5",
                                      "augment.random_resized_crop={scale: [0.5, 1.0]}"])
    result = fit(open_source(tiny_store), recipe, tmp_path / on, progress=False)
    assert result.best_checkpoint is not None and result.best_checkpoint.is_file()
    import json

    assert json.loads((tmp_path / on / "run.json").read_text())["augment_on"] == on
