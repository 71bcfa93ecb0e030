"""Training recipes: a typed, frozen schema, validated in one place.

YAML files, ``--set a.b=value`` overrides and the recipe stored in a checkpoint all pass through
``Recipe.model_validate`` (field checks, then the cross-field checks of ``Recipe._cross_checks``).
Unknown keys and bad values are refused with one line that names the key, and ``--set`` where
the bad value came from there. This module imports neither torch nor timm, so a bad recipe is
reported at once.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from rcic.errors import RecipeError

RECIPE_DIR = Path(__file__).parent / "recipes"
MONITORS = ("val/acc", "val/acc_leak", "val/loss")
# keys that do not change what a run computes: a resumed run may change them
RESUMABLE_CHANGES = ("trainer.devices", "trainer.num_nodes", "data.num_workers", "data.eval_batch_size")


class _Strict(BaseModel):
    # no NaN or infinity anywhere: `optim.lr: .inf` is refused here, not found by the optimiser
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_as_number(cls, value, info):
        # pydantic reads true as 1 for an int field: `data.batch_size: true` would train with batches of 1
        if isinstance(value, bool) and "bool" not in str(cls.model_fields[info.field_name].annotation):
            raise ValueError("must be a number or a name, not true/false")
        return value


SEED_MAX = 2**32 - 1  # what numpy and Lightning accept as a seed


def _cross(key: str, message: str) -> PydanticCustomError:
    """A cross-field error that remembers the key it is about (for the one-line message)."""
    return PydanticCustomError("recipe", "{message}", {"key": key, "message": message})


class DataConfig(_Strict):
    split: Literal["folds", "wilds"] = Field(
        "folds", description="folds: K folds of the labelled experiments; wilds: the WILDS release's own split")
    split_seed: int = Field(0, ge=0, le=SEED_MAX,
                            description="Decides the folds (independent of seed: a seed ensemble holds out "
                                        "the same experiments)")
    folds: int = Field(4, ge=2, le=20)
    fold: int | Literal["all"] = Field(0, description="Held-out fold, or all: train on every labelled experiment")
    image_size: int | None = Field(None, ge=16, le=1024, description="Model input size; None = as stored")
    classes: Literal["treatments", "treatments+controls"] = "treatments"
    normalization: Literal["none", "image", "experiment", "experiment_controls", "plate", "plate_controls"] = "image"
    sampler: Literal["random", "experiment", "plate"] = Field(
        "random", description="random: shuffled sites; plate / experiment: every training batch from one plate "
                              "(one experiment), deterministic from seed and epoch")
    batch_size: int = Field(32, ge=1, le=65536)
    eval_batch_size: int | None = Field(None, ge=1, le=65536)
    num_workers: int = Field(2, ge=0, le=256)

    @field_validator("fold")
    @classmethod
    def _fold(cls, value):
        if isinstance(value, int) and value < 0:
            raise ValueError("must be >= 0 or 'all'")
        return value


class NeckConfig(_Strict):
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    batchnorm: bool = False
    dim: int | None = Field(None, ge=8, description="Linear projection before the head; None = none")


def parse_adabn_prior(value) -> float | str:
    """``model.adabn_prior`` and ``--adabn-prior``: a number in [0, 1], or ``auto``; ValueError otherwise."""
    if isinstance(value, str) and value.strip() == "auto":
        return "auto"
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not 0.0 <= number <= 1.0:  # NaN fails both
        raise ValueError("must be a number between 0 and 1, or auto")
    return number


class ModelConfig(_Strict):
    backbone: str = "resnet18"
    backbone_args: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments for timm.create_model, e.g. {output_stride: 8}")
    pretrained: bool = False
    pretrained_file: str | None = None
    input: Literal["six_channel", "rgb"] = "six_channel"
    head: Literal["linear", "cosine"] = "linear"
    neck: NeckConfig = NeckConfig()
    cell_type_embedding: int = Field(0, ge=0, description="Size of a learned cell-type embedding (0 = off)")
    drop_path: float = Field(0.0, ge=0.0, lt=1.0)
    adabn: Literal["none", "plate", "experiment"] = Field(
        "none", description="Domain BatchNorm: statistics recomputed per plate / experiment of the wells being "
                            "validated or predicted")
    adabn_prior: float | Literal["auto"] = Field(
        0.0, description="With AdaBN, the weight of the trained BatchNorm statistics mixed into each domain's own "
                         "(0: the domain's alone; 1: no adaptation); auto: predictions with 0, 0.25, 0.5, 0.75 and 1 "
                         "blended by the agreement of their arg-max with the plate assignment (no labels needed)")
    center_embeddings: Literal["none", "plate", "experiment"] = Field(
        "none", description="Subtract the plate's / experiment's mean embedding before the head")

    @field_validator("adabn_prior", mode="before")
    @classmethod
    def _prior(cls, value):
        return parse_adabn_prior(value)


class LossConfig(_Strict):
    ce: float = Field(1.0, ge=0.0)
    arcface: float = Field(0.0, ge=0.0)
    cosface: float = Field(0.0, ge=0.0)
    focal: float = Field(0.0, ge=0.0)
    focal_gamma: float = Field(2.0, ge=0.0)
    margin: float = Field(0.3, ge=0.0, le=1.0)
    scale: float = Field(30.0, gt=0.0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)


class CropConfig(_Strict):
    scale: tuple[float, float] = (0.6, 1.0)
    ratio: tuple[float, float] = (0.75, 1.3333)

    @model_validator(mode="after")
    def _ranges(self):
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError("scale must be 0 < min <= max <= 1")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError("ratio must be 0 < min <= max")
        return self


class AugmentConfig(_Strict):
    on: Literal["auto", "workers", "device"] = Field(
        "auto", description="Where augmentation runs: device (batched, on the GPU; auto where one is present) "
                            "or workers (per sample, in the DataLoader workers)")
    d4: bool = True
    random_resized_crop: CropConfig | None = None
    intensity_jitter: float = Field(0.0, ge=0.0, le=1.0, description="Per-channel gain/offset jitter")
    cutmix: float = Field(0.0, ge=0.0, le=1.0, description="Probability of CutMix per batch")
    mixup: float = Field(0.0, ge=0.0, le=1.0, description="Probability of mixup per batch")
    mix_alpha: float = Field(1.0, gt=0.0)


class OptimConfig(_Strict):
    optimizer: Literal["adam", "adamw", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0.0, le=10.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    schedule: Literal["cosine", "onecycle", "constant"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0.0)
    accumulate: int = Field(1, ge=1, le=4096)
    grad_clip: float | None = Field(None, gt=0.0)
    freeze_backbone_epochs: int = Field(0, ge=0)


class TrainerConfig(_Strict):
    epochs: int = Field(10, ge=1, le=100_000)
    precision: Literal["auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true"] = "auto"
    monitor: Literal["val/acc", "val/acc_leak", "val/loss"] = Field(
        "val/acc", description="The validation number that picks best.ckpt")
    val_every_n_steps: int | None = Field(None, ge=1)
    checkpoint_every_n_steps: int | None = Field(None, ge=1, description="Refresh last.ckpt every N steps too")
    image_size_schedule: dict[int, int] | None = None
    limit_train_batches: int | float | None = Field(
        None, description="Batches per epoch: a count (>= 1) or a fraction of the epoch (0-1]")
    keep_epoch_checkpoints: int | None = Field(None, ge=1, description="Keep the N latest per-epoch files")
    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps"] = "auto"
    devices: int | Literal["auto"] = 1
    num_nodes: int = Field(1, ge=1)
    channels_last: bool | Literal["auto"] = Field("auto", description="auto: on a GPU, off on CPU")
    compile: bool = Field(False, description="torch.compile the network (GPU)")

    @field_validator("image_size_schedule")
    @classmethod
    def _sizes(cls, value):
        if value is not None and (0 not in value or any(s < 16 or s > 1024 for s in value.values())
                                  or any(e < 0 for e in value)):
            raise ValueError("needs an entry for epoch 0, epochs >= 0 and sizes in 16-1024")
        return value

    @field_validator("limit_train_batches", mode="before")
    @classmethod
    def _limit(cls, value):
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, bool) or (isinstance(value, int) and value < 1) or (
                isinstance(value, float) and not 0 < value <= 1):
            raise ValueError("must be a number of batches (>= 1) or a fraction of the epoch in (0, 1]")
        return value

    @field_validator("devices")
    @classmethod
    def _devices(cls, value):
        if isinstance(value, int) and not 1 <= value <= 1024:
            raise ValueError("must be a number of devices (>= 1) or auto")
        return value


class Recipe(_Strict):
    name: str = "recipe"
    seed: int = Field(0, ge=0, le=SEED_MAX)
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    augment: AugmentConfig = AugmentConfig()
    optim: OptimConfig = OptimConfig()
    trainer: TrainerConfig = TrainerConfig()

    @model_validator(mode="after")
    def _cross_checks(self):
        d, loss = self.data, self.loss
        if isinstance(d.fold, int) and d.fold >= d.folds:
            raise _cross("data.fold", f"{d.fold} is out of range for data.folds {d.folds} (0-{d.folds - 1} or all)")
        if d.split == "wilds" and d.fold == "all":
            raise _cross("data.fold", "all has no meaning with data.split: wilds (the release fixes the split)")
        if (loss.arcface or loss.cosface) and self.model.head != "cosine":
            raise _cross("loss.arcface", "margin losses need model.head: cosine (arcface, cosface)")
        if loss.ce + loss.arcface + loss.cosface + loss.focal <= 0:
            raise _cross("loss", "at least one loss weight must be positive")
        if self.optim.freeze_backbone_epochs >= self.trainer.epochs:
            raise _cross("optim.freeze_backbone_epochs",
                         f"{self.optim.freeze_backbone_epochs} leaves no epoch to train the backbone "
                         f"(trainer.epochs {self.trainer.epochs})")
        if self.model.center_embeddings != "none" and d.sampler == "random":
            raise _cross("model.center_embeddings", f"{self.model.center_embeddings} centres each training batch "
                         "by its domains' means and needs domain batches: set data.sampler to plate or experiment")
        m = self.model
        if "none" not in (m.adabn, m.center_embeddings) and m.adabn != m.center_embeddings:
            raise _cross("model.adabn", f"{m.adabn} with model.center_embeddings: {m.center_embeddings}: both go "
                         "domain by domain and must name the same domain")
        if m.adabn_prior != "auto" and m.adabn_prior > 0 and m.adabn == "none":  # auto: nothing to choose
            raise _cross("model.adabn_prior", f"{m.adabn_prior} mixes statistics into AdaBN's and needs "
                         "model.adabn: plate or experiment")
        if self.augment.cutmix + self.augment.mixup > 1:
            raise _cross("augment.cutmix", "augment.cutmix + augment.mixup must not exceed 1")
        return self

    @property
    def validates(self) -> bool:
        """Whether the run holds out experiments (``data.fold: all`` trains on every one)."""
        return self.data.fold != "all"

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    def digest(self, ignore: tuple[str, ...] = RESUMABLE_CHANGES) -> str:
        """A hash of what defines the run (resuming under another recipe is refused)."""
        flat = {k: v for k, v in _flatten(self.to_dict()).items() if k not in ignore}
        return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:16]

    def differences(self, other: Recipe, ignore: tuple[str, ...] = RESUMABLE_CHANGES) -> list[str]:
        mine, theirs = _flatten(self.to_dict()), _flatten(other.to_dict())
        return sorted(k for k in mine.keys() | theirs.keys() if k not in ignore and mine.get(k) != theirs.get(k))


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flatten(v, key + ".") if isinstance(v, dict) and k != "image_size_schedule" else {key: v})
    return out


MAX_RECIPE_BYTES = 1 << 20  # a recipe is a few hundred bytes; more is not a recipe
MAX_YAML_NODES = 100_000  # nodes after anchors are expanded: an alias bomb is refused before it is built


class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses a key written twice in one mapping (the last would win, silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:
                continue  # an unhashable key: construct_mapping itself reports it
            if first != key_node.start_mark.line + 1:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is written twice (lines {first} and {key_node.start_mark.line + 1})",
                    key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _expanded_size(node, memo: dict) -> int:
    """Nodes in the document once every alias is expanded (shared nodes are counted once per use)."""
    if id(node) in memo:
        return memo[id(node)]
    memo[id(node)] = MAX_YAML_NODES + 1  # a node that contains itself (a recursive alias) is too large
    if isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    elif isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(v, memo) for v in node.value)
    else:
        size = 1
    memo[id(node)] = min(size, MAX_YAML_NODES + 1)
    return memo[id(node)]


def safe_yaml(text: str):
    """YAML as plain data: no tags that run code, no key written twice, no alias bomb, no huge document."""
    if len(text) > MAX_RECIPE_BYTES:
        raise yaml.YAMLError(f"{len(text):,} characters; a recipe is at most {MAX_RECIPE_BYTES:,}")
    loader = _RecipeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}) > MAX_YAML_NODES:
            raise yaml.YAMLError(f"more than {MAX_YAML_NODES:,} values once its anchors (&) and aliases (*) are "
                                 "expanded (an alias bomb?)")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _yaml_problem(err: yaml.YAMLError) -> str:
    """What is wrong and on which line, without PyYAML's multi-line excerpt of the text."""
    problem, mark = getattr(err, "problem", None), getattr(err, "problem_mark", None)
    if not problem:
        return " ".join(str(err).split())[:300]
    return problem if mark is None or "line" in problem else f"{problem} at line {mark.line + 1}"


def _parse_override(item: str) -> tuple[str, object]:
    if "=" not in item:
        raise RecipeError(f"--set expects key=value, got {item!r}")
    key, text = item.split("=", 1)
    try:
        value = safe_yaml(text)
    except yaml.YAMLError as err:
        raise RecipeError(f"--set {key}: value {text[:80]!r} is not valid YAML ({_yaml_problem(err)})") from None
    except RecursionError:
        raise RecipeError(f"--set {key}: value {text[:80]!r}... is nested too deeply") from None
    if not key.strip():
        raise RecipeError(f"--set expects key=value, got {item!r}")
    return key.strip(), value


def _apply_override(raw: dict, key: str, value: object) -> None:
    *parents, leaf = key.split(".")
    node = raw
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise RecipeError(f"--set {key}: {p} is not a section")
    node[leaf] = value


def _validate(raw: dict, source: str, overrides: dict[str, str] | None = None) -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        ctx = first.get("ctx") or {}
        if first["type"] == "recipe":
            key, what, value = ctx["key"], ctx["message"], ""
        else:
            loc = [str(p) for p in first["loc"] if not str(p).startswith(("function-", "literal["))]
            # pydantic names the union member that failed (int / literal); the key is what matters
            loc = [p for p in loc if p not in ("int", "str", "float", "bool", "CropConfig", "dict[int,int]")]
            key = ".".join(loc) or "(top level)"
            what = "unknown key" if first["type"] == "extra_forbidden" else first["msg"].removeprefix("Value error, ")
            value = "" if first["type"] == "extra_forbidden" else f" (got {first.get('input')!r})"
        for set_key, item in (overrides or {}).items():
            if key == set_key or key.startswith(set_key + ".") or set_key.startswith(key + "."):
                raise RecipeError(f"--set {item}: recipe key {key}: {what}{value}") from None
        raise RecipeError(f"recipe key {key}: {what}{value}", source) from None


def resolve_recipe_path(recipe: str | Path) -> Path:
    """A recipe file, or the name of a shipped recipe (``cpu-demo``, ``winning``, ...)."""
    path = Path(recipe)
    if path.is_file():
        return path
    if path.is_dir():
        raise RecipeError("is a folder, not a recipe file", path)
    if path.exists():
        raise RecipeError("is not a regular file (a FIFO, socket or device): not a recipe", path)
    shipped = RECIPE_DIR / f"{Path(str(recipe)).stem}.yaml"
    if shipped.is_file() and not path.parent.name:
        return shipped
    names = ", ".join(sorted(p.stem for p in RECIPE_DIR.glob("*.yaml")))
    raise RecipeError(f"recipe not found (shipped recipes: {names})", path)


def read_recipe_file(path: Path) -> dict:
    """The YAML mapping of a recipe file; unreadable, non-UTF-8 or non-mapping content is a one-line error."""
    try:
        if path.stat().st_size > MAX_RECIPE_BYTES:
            raise RecipeError(f"{path.stat().st_size:,} bytes: not a recipe (a recipe is a short YAML file)", path)
        text = path.read_bytes().decode("utf-8")
    except PermissionError:
        raise RecipeError("cannot read the file (permission denied)", path) from None
    except OSError as err:
        raise RecipeError(f"cannot read the file ({err.strerror or err})", path) from None
    except UnicodeDecodeError:
        raise RecipeError("not a text file (not UTF-8): a recipe is a YAML file", path) from None
    try:
        raw = safe_yaml(text)
    except yaml.YAMLError as err:
        raise RecipeError(f"not valid YAML ({_yaml_problem(err)})", path) from None
    except RecursionError:
        raise RecipeError("not valid YAML (nested too deeply)", path) from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise RecipeError("a recipe is a mapping of sections (data, model, loss, ...)", path)
    return raw


def load_recipe(recipe: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Load and validate a YAML recipe (file or shipped name), applying ``key=value`` overrides."""
    path = resolve_recipe_path(recipe)
    raw = read_recipe_file(path)
    set_keys: dict[str, str] = {}
    for item in overrides or []:
        key, value = _parse_override(item)
        _apply_override(raw, key, value)
        set_keys[key] = item
    return _validate(raw, str(path), set_keys)


def check_pretrained_file(recipe: Recipe) -> None:
    """``model.pretrained_file``, where set, is a weights file (safetensors, or torch's zip format), checked
    before torch is imported: a missing or junk file is one line that names it, not a loader's traceback."""
    name = recipe.model.pretrained_file
    if name is None:
        return
    path = Path(name).expanduser()
    key = "recipe key model.pretrained_file"
    if not path.exists():
        raise RecipeError(f"{key}: file not found", path)
    if not path.is_file():
        raise RecipeError(f"{key}: is not a regular file", path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if head.startswith(b"PK\x03\x04"):  # torch.save's zip format (.pth, .bin, .pt)
                return
            length = int.from_bytes(head, "little") if len(head) == 8 else 0
            header = json.loads(f.read(length)) if 2 <= length <= min(size - 8, 100 << 20) else None
    except PermissionError:
        raise RecipeError(f"{key}: cannot read the file (permission denied)", path) from None
    except OSError as err:
        raise RecipeError(f"{key}: cannot read the file ({err.strerror or err})", path) from None
    except (ValueError, UnicodeDecodeError):
        header = None
    if not isinstance(header, dict):
        raise RecipeError(f"{key}: not a weights file (safetensors, or a torch .pth/.bin in zip format)", path)


def recipe_from_dict(raw: dict, source: str = "checkpoint") -> Recipe:
    return _validate(raw, source)


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)
