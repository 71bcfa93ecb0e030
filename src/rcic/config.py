"""Training recipes: a typed schema, validated once when a YAML file is loaded.

Unknown keys and bad values are refused with one line that names the key. ``--set a.b=value``
overrides any key (the value is parsed as YAML, so ``--set optim.lr=3e-4`` is a float).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from rcic.errors import RecipeError

RECIPE_DIR = Path(__file__).parent / "recipes"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    image_size: int | None = Field(None, ge=16, le=1024, description="Model input size; None = as stored")
    classes: Literal["treatments", "treatments+controls"] = "treatments"
    normalization: Literal["none", "image", "experiment", "experiment_controls", "plate"] = "image"
    folds: int = Field(4, ge=2, le=20)
    fold: int = Field(0, ge=0)
    batch_size: int = Field(32, ge=1)
    eval_batch_size: int | None = Field(None, ge=1)
    num_workers: int = Field(2, ge=0)


class NeckConfig(_Strict):
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    batchnorm: bool = False
    dim: int | None = Field(None, ge=8, description="Linear projection before the head; None = none")


class ModelConfig(_Strict):
    backbone: str = "resnet18"
    pretrained: bool = False
    pretrained_file: str | None = None
    input: Literal["six_channel", "rgb"] = "six_channel"
    head: Literal["linear", "cosine"] = "linear"
    neck: NeckConfig = NeckConfig()
    cell_type_embedding: int = Field(0, ge=0, description="Size of a learned cell-type embedding (0 = off)")
    drop_path: float = Field(0.0, ge=0.0, lt=1.0)


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


class AugmentConfig(_Strict):
    d4: bool = True
    random_resized_crop: CropConfig | None = None
    intensity_jitter: float = Field(0.0, ge=0.0, le=1.0, description="Per-channel gain/offset jitter")
    cutmix: float = Field(0.0, ge=0.0, le=1.0, description="Probability of CutMix per batch")
    mixup: float = Field(0.0, ge=0.0, le=1.0, description="Probability of mixup per batch")
    mix_alpha: float = Field(1.0, gt=0.0)


class OptimConfig(_Strict):
    optimizer: Literal["adam", "adamw", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    schedule: Literal["cosine", "onecycle", "constant"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0.0)
    accumulate: int = Field(1, ge=1)
    grad_clip: float | None = Field(None, gt=0.0)
    freeze_backbone_epochs: int = Field(0, ge=0)


class TrainerConfig(_Strict):
    epochs: int = Field(10, ge=1)
    precision: Literal["auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true"] = "auto"
    val_every_n_steps: int | None = Field(None, ge=1)
    image_size_schedule: dict[int, int] | None = None
    limit_train_batches: int | float | None = None
    keep_epoch_checkpoints: int | None = Field(None, ge=1, description="Keep the N latest per-epoch files")
    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps"] = "auto"
    devices: int | Literal["auto"] = 1
    num_nodes: int = Field(1, ge=1)

    @field_validator("image_size_schedule")
    @classmethod
    def _sizes(cls, value):
        if value is not None and (0 not in value or any(s < 16 for s in value.values())):
            raise ValueError("needs an entry for epoch 0 and sizes >= 16")
        return value


class Recipe(_Strict):
    name: str = "recipe"
    seed: int = 0
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    augment: AugmentConfig = AugmentConfig()
    optim: OptimConfig = OptimConfig()
    trainer: TrainerConfig = TrainerConfig()

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    def digest(self, ignore: tuple[str, ...] = ("trainer.epochs", "trainer.devices", "trainer.num_nodes",
                                                "data.num_workers")) -> str:
        """A hash of what defines the run (resuming under another recipe is refused)."""
        d = self.to_dict()
        for key in ignore:
            *parents, leaf = key.split(".")
            node = d
            for p in parents:
                node = node[p]
            node.pop(leaf, None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def differences(self, other: Recipe) -> list[str]:
        return sorted(k for k, v in _flatten(self.to_dict()).items() if _flatten(other.to_dict()).get(k) != v)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flatten(v, key + ".") if isinstance(v, dict) and k != "image_size_schedule" else {key: v})
    return out


def _apply_override(raw: dict, item: str) -> None:
    if "=" not in item:
        raise RecipeError(f"--set expects key=value, got {item!r}")
    key, text = item.split("=", 1)
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise RecipeError(f"--set {key}: value {text!r} is not valid YAML") from err
    *parents, leaf = key.strip().split(".")
    node = raw
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise RecipeError(f"--set {key}: {p} is not a section")
    node[leaf] = value


def _validate(raw: dict, source: str) -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"]) or "(top level)"
        what = "unknown key" if first["type"] == "extra_forbidden" else first["msg"]
        value = "" if first["type"] == "extra_forbidden" else f" (got {first.get('input')!r})"
        raise RecipeError(f"recipe key {key}: {what}{value}", source) from None


def resolve_recipe_path(recipe: str | Path) -> Path:
    """A recipe file, or the name of a shipped recipe (``cpu-demo``, ``winning``, ...)."""
    path = Path(recipe)
    if path.is_file():
        return path
    shipped = RECIPE_DIR / f"{Path(str(recipe)).stem}.yaml"
    if shipped.is_file() and not path.parent.name:
        return shipped
    names = ", ".join(sorted(p.stem for p in RECIPE_DIR.glob("*.yaml")))
    raise RecipeError(f"recipe not found (shipped recipes: {names})", path)


def load_recipe(recipe: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Load and validate a YAML recipe (file or shipped name), applying ``key=value`` overrides."""
    path = resolve_recipe_path(recipe)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise RecipeError(f"not valid YAML ({str(err).splitlines()[0]})", path) from err
    if not isinstance(raw, dict):
        raise RecipeError("a recipe is a mapping of sections (data, model, loss, ...)", path)
    for item in overrides or []:
        _apply_override(raw, item)
    recipe_ = _validate(raw, str(path))
    if recipe_.data.fold >= recipe_.data.folds:
        raise RecipeError(f"recipe key data.fold: {recipe_.data.fold} >= data.folds {recipe_.data.folds}", path)
    if (recipe_.loss.arcface or recipe_.loss.cosface) and recipe_.model.head != "cosine":
        raise RecipeError("recipe key loss.arcface/cosface: margin losses need model.head: cosine", path)
    if recipe_.loss.ce + recipe_.loss.arcface + recipe_.loss.cosface + recipe_.loss.focal <= 0:
        raise RecipeError("recipe key loss: at least one loss weight must be positive", path)
    return recipe_


def recipe_from_dict(raw: dict, source: str = "checkpoint") -> Recipe:
    return _validate(raw, source)


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)
