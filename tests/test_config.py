"""Training recipes (rcic.config): every refusal names the key (and the --set or file it came from) and the
rule broken; the values at each bound are accepted. Pure Python and pydantic: the file runs in about a second."""

from __future__ import annotations

import os

import pytest

from rcic.config import (
    MAX_RECIPE_BYTES,
    Recipe,
    check_pretrained_file,
    dump_recipe,
    load_recipe,
    recipe_from_dict,
    resolve_recipe_path,
)
from rcic.errors import RecipeError


def _refused(*overrides: str, recipe="cpu-demo") -> str:
    with pytest.raises(RecipeError) as err:
        load_recipe(recipe, list(overrides))
    return str(err.value)


def _file(tmp_path, text: str | bytes):
    path = tmp_path / "r.yaml"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


# the --set items and the exact line: pydantic's field bounds, then rcic's own validators
FIELD_ERRORS = [
    ("model.backbon=resnet18", "recipe key model.backbon: unknown key"),
    ("trainer.epochs=0", "recipe key trainer.epochs: Input should be greater than or equal to 1 (got 0)"),
    ("optim.lr=0", "recipe key optim.lr: Input should be greater than 0 (got 0)"),
    ("optim.lr=.inf", "recipe key optim.lr: Input should be a finite number (got inf)"),
    ("data.normalization=zscore", "recipe key data.normalization: Input should be 'none', 'image', 'experiment', "
                                  "'experiment_controls', 'plate' or 'plate_controls' (got 'zscore')"),
    ("data.batch_size=true", "recipe key data.batch_size: must be a number or a name, not true/false (got True)"),
    ("data.fold=true", "recipe key data.fold: must be a number or a name, not true/false (got True)"),
    ("data.fold=-1", "recipe key data.fold: must be >= 0 or 'all' (got -1)"),
    ("augment.random_resized_crop={scale: [0.9, 0.5]}",
     "recipe key augment.random_resized_crop: scale must be 0 < min <= max <= 1 (got {'scale': [0.9, 0.5]})"),
    ("augment.random_resized_crop={scale: [0, 1]}",
     "recipe key augment.random_resized_crop: scale must be 0 < min <= max <= 1 (got {'scale': [0, 1]})"),
    ("augment.random_resized_crop={scale: [0.5, 1.5]}",
     "recipe key augment.random_resized_crop: scale must be 0 < min <= max <= 1 (got {'scale': [0.5, 1.5]})"),
    ("augment.random_resized_crop={ratio: [2, 1]}",
     "recipe key augment.random_resized_crop: ratio must be 0 < min <= max (got {'ratio': [2, 1]})"),
    ("augment.random_resized_crop={ratio: [0, 1]}",
     "recipe key augment.random_resized_crop: ratio must be 0 < min <= max (got {'ratio': [0, 1]})"),
    ("trainer.image_size_schedule={1: 32}", "recipe key trainer.image_size_schedule: needs an entry for epoch 0, "
                                            "epochs >= 0 and sizes in 16-1024 (got {1: 32})"),
    ("trainer.image_size_schedule={0: 15}", "recipe key trainer.image_size_schedule: needs an entry for epoch 0, "
                                            "epochs >= 0 and sizes in 16-1024 (got {0: 15})"),
    ("trainer.image_size_schedule={0: 1025}", "recipe key trainer.image_size_schedule: needs an entry for epoch 0, "
                                              "epochs >= 0 and sizes in 16-1024 (got {0: 1025})"),
    ("trainer.image_size_schedule={0: 32, -1: 32}", "recipe key trainer.image_size_schedule: needs an entry for "
                                                    "epoch 0, epochs >= 0 and sizes in 16-1024 (got {0: 32, -1: 32})"),
    ("trainer.limit_train_batches=0", "recipe key trainer.limit_train_batches: must be a number of batches (>= 1) "
                                      "or a fraction of the epoch in (0, 1] (got 0)"),
    ("trainer.limit_train_batches=1.5", "recipe key trainer.limit_train_batches: must be a number of batches (>= 1) "
                                        "or a fraction of the epoch in (0, 1] (got 1.5)"),
    ("trainer.limit_train_batches=0.0", "recipe key trainer.limit_train_batches: must be a number of batches (>= 1) "
                                        "or a fraction of the epoch in (0, 1] (got 0.0)"),
    ("trainer.devices=0", "recipe key trainer.devices: must be a number of devices (>= 1) or auto (got 0)"),
    ("trainer.devices=1025", "recipe key trainer.devices: must be a number of devices (>= 1) or auto (got 1025)"),
    *[(f"model.adabn_prior={v}", f"recipe key model.adabn_prior: must be a number between 0 and 1, or auto (got {g})")
      for v, g in (("1.5", "1.5"), ("-0.1", "-0.1"), ("often", "'often'"), ("true", "True"), ("nan", "'nan'"))],
]


@pytest.mark.parametrize("item,message", FIELD_ERRORS, ids=[c[0] for c in FIELD_ERRORS])
def test_a_bad_set_names_the_set_the_key_and_the_rule(item, message):
    assert _refused(item) == f"--set {item}: {message}"


@pytest.mark.parametrize("item,message", FIELD_ERRORS[:8], ids=[c[0] for c in FIELD_ERRORS[:8]])
def test_the_same_value_in_a_file_names_the_file(tmp_path, item, message):
    key, value = item.split("=", 1)
    *sections, leaf = key.split(".")
    text = "".join(f"{'  ' * i}{s}:\n" for i, s in enumerate(sections)) + f"{'  ' * len(sections)}{leaf}: {value}\n"
    assert _refused(recipe=_file(tmp_path, text)) == f"{tmp_path / 'r.yaml'}: {message}"


def test_values_at_each_bound_are_accepted():
    r = load_recipe("cpu-demo", [
        "data.fold=2", "trainer.image_size_schedule={0: 16, 3: 1024}", "trainer.limit_train_batches=1.0",
        "trainer.devices=1024", "augment.random_resized_crop={scale: [0.5, 1], ratio: [1, 1]}", "model.pretrained=true",
        "augment.cutmix=0.5", "augment.mixup=0.5", "optim.freeze_backbone_epochs=11", "trainer.epochs=12"])
    assert (r.data.fold, r.trainer.devices, r.trainer.limit_train_batches) == (2, 1024, 1.0)
    assert r.trainer.image_size_schedule == {0: 16, 3: 1024} and r.model.pretrained is True
    assert r.augment.random_resized_crop.scale == (0.5, 1.0) and r.augment.random_resized_crop.ratio == (1.0, 1.0)
    assert load_recipe("cpu-demo", ["trainer.limit_train_batches=1"]).trainer.limit_train_batches == 1
    assert load_recipe("cpu-demo", ["trainer.limit_train_batches=0.25"]).trainer.limit_train_batches == 0.25
    assert load_recipe("cpu-demo", ["trainer.devices=auto"]).trainer.devices == "auto"
    assert load_recipe("cpu-demo", ["data.fold=all"]).validates is False and r.validates is True


# cross-field rules: (the --set items, the key named, the rule); each also with the values that pass
CROSS_ERRORS = [
    (["data.folds=3", "data.fold=3"], "data.fold", "3 is out of range for data.folds 3 (0-2 or all)"),
    (["data.split=wilds", "data.fold=all"], "data.fold",
     "all has no meaning with data.split: wilds (the release fixes the split)"),
    (["model.head=linear"], "loss.arcface", "margin losses need model.head: cosine (arcface, cosface)"),
    (["model.head=linear", "loss.arcface=0", "loss.cosface=0.5"], "loss.arcface",
     "margin losses need model.head: cosine (arcface, cosface)"),
    (["loss.ce=0", "loss.arcface=0"], "loss", "at least one loss weight must be positive"),
    (["optim.freeze_backbone_epochs=12"], "optim.freeze_backbone_epochs",
     "12 leaves no epoch to train the backbone (trainer.epochs 12)"),
    (["model.center_embeddings=plate"], "model.center_embeddings",
     "plate centres each training batch by its domains' means and needs domain batches: set data.sampler to plate "
     "or experiment"),
    (["data.sampler=plate", "model.center_embeddings=plate", "model.adabn=experiment"], "model.adabn",
     "experiment with model.center_embeddings: plate: both go domain by domain and must name the same domain"),
    (["augment.cutmix=0.6", "augment.mixup=0.5"], "augment.cutmix", "augment.cutmix + augment.mixup must not exceed 1"),
    (["model.adabn=none", "model.adabn_prior=0.5"], "model.adabn_prior",
     "0.5 mixes statistics into AdaBN's and needs model.adabn: plate or experiment"),
]
CROSS_PASSES = [["data.folds=3", "data.fold=2"], ["data.split=wilds", "data.fold=1"],
                ["model.head=linear", "loss.arcface=0"], ["loss.ce=0", "loss.arcface=0", "loss.focal=1"],
                ["data.sampler=plate", "model.center_embeddings=plate", "model.adabn=plate"],
                ["data.sampler=experiment", "model.adabn=experiment"], ["model.adabn=plate"],
                ["model.adabn=plate", "model.adabn_prior=1"], ["model.adabn=none", "model.adabn_prior=0"],
                ["model.adabn=none", "model.adabn_prior=auto"]]


@pytest.mark.parametrize("items,key,rule", CROSS_ERRORS, ids=[c[2][:40] for c in CROSS_ERRORS])
def test_cross_field_rules_name_the_key_and_the_set_that_touched_it(items, key, rule):
    touched = [i for i in items if i.split("=")[0] == key or i.split("=")[0].startswith(key + ".")]
    where = f"--set {touched[0]}" if touched else str(resolve_recipe_path("cpu-demo"))  # else the recipe's own value
    assert _refused(*items) == f"{where}: recipe key {key}: {rule}"


def test_a_cross_field_rule_broken_in_a_file_names_the_file(tmp_path):
    path = _file(tmp_path, "model: {head: linear}\nloss: {arcface: 0.5}\n")
    assert _refused(recipe=path) == f"{path}: recipe key loss.arcface: {CROSS_ERRORS[2][2]}"


@pytest.mark.parametrize("items", CROSS_PASSES, ids=["-".join(c) for c in CROSS_PASSES])
def test_values_next_to_a_cross_field_rule_pass(items):
    assert isinstance(load_recipe("cpu-demo", items), Recipe)


SET_SYNTAX = [
    ("optim.lr", "--set expects key=value, got 'optim.lr'"),
    ("=3", "--set expects key=value, got '=3'"),
    (" =3", "--set expects key=value, got ' =3'"),
    ("optim.lr=[1", "--set optim.lr: value '[1' is not valid YAML (expected ',' or ']', but got '<stream end>' "
                    "at line 1)"),
    ("optim.lr.x=1", "--set optim.lr.x: lr is not a section"),
]


@pytest.mark.parametrize("item,message", SET_SYNTAX, ids=[c[0] for c in SET_SYNTAX])
def test_set_syntax_errors(item, message):
    assert _refused(item) == message


def test_set_values_are_yaml_typed_and_reach_nested_keys():
    r = load_recipe("cpu-demo", ["optim.lr=3e-4", "trainer.image_size_schedule={0: 32, 2: 48}", "data.fold=1",
                                 " model.neck.dim =64", "name=a=b"])
    assert r.optim.lr == 3e-4 and r.trainer.image_size_schedule == {0: 32, 2: 48} and r.data.fold == 1
    assert r.model.neck.dim == 64 and r.model.neck.dropout == 0.1 and r.name == "a=b"  # the rest of the neck kept


def _alias_bomb() -> bytes:
    """Six lines, 10**6 values once expanded: each anchor repeats the one before ten times."""
    lines = ["a: &a [" + ", ".join(["1"] * 10) + "]"]
    lines += [f"{b}: &{b} [" + ", ".join([f"*{a}"] * 10) + "]" for a, b in zip("abcde", "bcdef")]
    return ("\n".join(lines) + "\n").encode()


def test_recipe_files_that_are_not_recipes(tmp_path):
    folder = tmp_path / "dir"
    folder.mkdir()
    assert _refused(recipe=folder) == f"{folder}: is a folder, not a recipe file"
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    assert _refused(recipe=fifo) == f"{fifo}: is not a regular file (a FIFO, socket or device): not a recipe"
    shipped = "shipped recipes: cpu-demo, seed-densenet121, winning"
    assert _refused(recipe="cpu-dem") == f"cpu-dem: recipe not found ({shipped})"
    assert _refused(recipe=tmp_path / "cpu-demo.yaml") == f"{tmp_path / 'cpu-demo.yaml'}: recipe not found ({shipped})"
    assert resolve_recipe_path("cpu-demo.yaml") == resolve_recipe_path("cpu-demo")
    assert resolve_recipe_path("cpu-demo").name == "cpu-demo.yaml"
    path = tmp_path / "r.yaml"
    for text, problem in [
        (b"a: 1\n\xff\n", "not a text file (not UTF-8): a recipe is a YAML file"),
        (b"data: [1\n", "not valid YAML (expected ',' or ']', but got '<stream end>' at line 2)"),
        (b"data:\n  folds: 2\ndata:\n  fold: 1\n", "not valid YAML (key 'data' is written twice (lines 1 and 3))"),
        (b"- data\n- model\n", "a recipe is a mapping of sections (data, model, loss, ...)"),
        (b"!!python/object:os.system {}\n", "not valid YAML (could not determine a constructor for the tag "
                                             "'tag:yaml.org,2002:python/object:os.system' at line 1)"),
        (_alias_bomb(), "not valid YAML (more than 100,000 values once its anchors (&) and aliases (*) are "
                        "expanded (an alias bomb?))"),
        (b"#" * (MAX_RECIPE_BYTES + 1),
         f"{MAX_RECIPE_BYTES + 1:,} bytes: not a recipe (a recipe is a short YAML file)"),
    ]:
        path.write_bytes(text)
        assert _refused(recipe=path) == f"{path}: {problem}", text[:40]
    path.write_bytes(b"# only a comment\n")
    assert load_recipe(path) == Recipe()  # an empty recipe is the defaults


def test_digest_and_differences_ignore_only_what_a_resumed_run_may_change():
    base = load_recipe("cpu-demo")
    same = load_recipe("cpu-demo", ["data.num_workers=0", "trainer.devices=2", "data.eval_batch_size=7",
                                    "trainer.num_nodes=2"])
    assert base.digest() == same.digest() and base.differences(same) == []
    other = load_recipe("cpu-demo", ["optim.lr=0.01", "model.neck.dim=128"])
    assert base.differences(other) == ["model.neck.dim", "optim.lr"] and base.digest() != other.digest()
    assert len(base.digest()) == 16 and base.digest() == load_recipe("cpu-demo").digest()
    assert base.differences(same, ignore=()) == ["data.eval_batch_size", "data.num_workers", "trainer.devices",
                                                 "trainer.num_nodes"]
    # the schedule is one value (its keys are epochs, not sections)
    sched = load_recipe("cpu-demo", ["trainer.image_size_schedule={0: 32, 2: 48}"])
    assert base.differences(sched) == ["trainer.image_size_schedule"]


def test_a_recipe_round_trips_through_yaml_and_a_checkpoint(tmp_path):
    r = load_recipe("winning", ["trainer.image_size_schedule={0: 32, 2: 48}"])
    path = _file(tmp_path, dump_recipe(r))
    assert load_recipe(path) == r and recipe_from_dict(r.to_dict()) == r
    raw = r.to_dict()
    raw["optim"]["lr"] = -1
    with pytest.raises(RecipeError) as err:
        recipe_from_dict(raw)
    assert str(err.value) == "checkpoint: recipe key optim.lr: Input should be greater than 0 (got -1)"


def test_pretrained_file_must_be_a_weights_file(tmp_path):
    def refused(path) -> str:
        with pytest.raises(RecipeError) as err:
            check_pretrained_file(load_recipe("cpu-demo", [f"model.pretrained_file={path}"]))
        return str(err.value)

    key = "recipe key model.pretrained_file"
    check_pretrained_file(load_recipe("cpu-demo"))  # none set: nothing to check
    assert refused(tmp_path / "nope.pth") == f"{tmp_path / 'nope.pth'}: {key}: file not found"
    assert refused(tmp_path) == f"{tmp_path}: {key}: is not a regular file"
    weights = tmp_path / "w.safetensors"
    header = b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'
    weights.write_bytes(len(header).to_bytes(8, "little") + header + b"\0\0\0\0")
    check_pretrained_file(load_recipe("cpu-demo", [f"model.pretrained_file={weights}"]))
    (tmp_path / "w.pth").write_bytes(b"PK\x03\x04" + b"\0" * 60)  # torch.save's zip
    check_pretrained_file(load_recipe("cpu-demo", [f"model.pretrained_file={tmp_path / 'w.pth'}"]))
    junk = "not a weights file (safetensors, or a torch .pth/.bin in zip format)"
    for name, content in [("short", b"abc"), ("text", b"hello world, not weights at all"),
                          ("badjson", len(b"{nope").to_bytes(8, "little") + b"{nope"),
                          ("list", (2).to_bytes(8, "little") + b"[]"), ("long", (10**9).to_bytes(8, "little") + b"{}")]:
        (tmp_path / name).write_bytes(content)
        assert refused(tmp_path / name) == f"{tmp_path / name}: {key}: {junk}", name
