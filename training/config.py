"""The training configuration: one YAML file plus command-line overrides, validated once and frozen.

Precedence, lowest first: the defaults below, the YAML file (``--config``), then overrides given as dotted keys
(``stage1.epochs=3``; a value is read as YAML, so numbers, booleans, null and paths work). The command line's named
knobs (``--epochs``, ``--lr``, ``--pooling``, ...) are such overrides. Anything unknown, mistyped or impossible is
refused with a message naming the key. The resolved config is written as YAML beside every checkpoint, so a run can
be repeated from its own folder.

Paths of data, caches and runs are not part of the config but arguments of each command: the same config trains on
phantoms and on the real RSPECT data set.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import timm
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from pe_node.config import check_device
from pe_node.findings import IMAGE_WEIGHT
from pe_node.model import PreprocessConfig, model_config

Split = Literal["train", "val", "test"]
SPLITS: tuple[str, ...] = ("train", "val", "test")


class TrainConfigError(ValueError):
    """The training configuration cannot be used; the message names every bad key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Section):
    """How ``prepare`` splits the studies of a data set, by study and stratified by exam class; how much of the
    train split the stages train on."""

    val_fraction: float = Field(0.15, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    split_seed: int = Field(0, ge=0)
    train_fraction: float = Field(
        1.0, gt=0.0, le=1.0,
        description="share of the train split's studies stage 1 and stage 2 train on, within each exam class, drawn "
                    "with split_seed (the studies of a smaller share among those of a larger): a learning curve; "
                    "validation always takes the whole val split")
    workers: int = Field(1, ge=1, le=64, description="processes reading and preprocessing studies")

    @model_validator(mode="after")
    def _room_for_training(self) -> DataConfig:
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("val_fraction + test_fraction must leave studies for training (sum < 1)")
        return self


class PreprocessSection(_Section):
    """The network input: ``pe_node.model.PreprocessConfig`` (windows and normalisation keep its defaults)."""

    size: int = 256
    crop: Literal["none", "body"] = "body"

    @model_validator(mode="after")
    def _valid_for_pe_node(self) -> PreprocessSection:
        self.to_preprocess()
        return self

    def to_preprocess(self) -> PreprocessConfig:
        return PreprocessConfig(size=self.size, crop=self.crop)


class ModelSection(_Section):
    """The architecture (``pe_node.model.create_model`` name and overrides) and where stage 1's backbone starts.

    ``pretrained``: false (random weights), true (ImageNet weights from the timm model hub, which needs the network)
    or the path of a local ``.pth`` / ``.pt`` / ``.safetensors`` state dict of the backbone.
    """

    name: str = "pe_cnn_lstm"
    backbone: str = "efficientnet_b0"
    pretrained: bool | str = False
    lstm_hidden: int = 256
    lstm_layers: int = 1
    dense_dim: int = 256
    attention_dim: int = 128
    dropout: float = 0.0
    drop_path_rate: float = 0.0
    study_norm: bool = Field(False, description="layer normalization of the pooled study features before the exam "
                             "head (not in the paper; pe_node.model.sequence says why)")

    @field_validator("backbone")
    @classmethod
    def _timm_backbone(cls, backbone: str) -> str:
        if not timm.is_model(backbone):
            raise ValueError(f"{backbone!r} is not a timm model")
        return backbone

    @field_validator("pretrained", mode="before")
    @classmethod
    def _weights_source(cls, value: Any) -> bool | str:
        if isinstance(value, bool):
            return value
        if isinstance(value, str | Path) and str(value).strip():
            return str(Path(str(value).strip()).expanduser())
        raise ValueError(f"{value!r}: must be true, false or the path of a weights file")

    @model_validator(mode="after")
    def _known_to_pe_node(self) -> ModelSection:
        model_config(self.name, **self.architecture())
        return self

    def architecture(self, **overrides: Any) -> dict[str, Any]:
        """The ``create_model`` keyword arguments (everything but ``name`` and ``pretrained``)."""
        values = self.model_dump(exclude={"name", "pretrained"})
        return {**values, **overrides}


class OptimConfig(_Section):
    """Adam, a learning-rate schedule per epoch, gradient clipping and mixed precision."""

    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    lr: float = Field(gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    step_epochs: int = Field(1, ge=1, description="epochs between decays of the step schedule")
    gamma: float = Field(0.5, gt=0.0, le=1.0, description="decay factor of the step schedule")
    grad_clip: float | None = Field(1.0, gt=0.0, description="largest gradient norm; null: no clipping")
    amp: bool = Field(True, description="autocast on CUDA (bf16 if supported, else fp16 with loss scaling) and, for "
                      "stage 1, bf16 on CPUs that compute it natively (AMX or AVX512-BF16)")
    max_minutes: float | None = Field(
        None, gt=0.0,
        description="time budget: after the first and again after the second epoch the stage plans as many of its "
        "epochs as fit in this many minutes at the latest epoch's pace, and the schedule spans those; null: all")
    select: str = Field("val_loss", description="the validation number that picks best.pt")


class Stage1Config(OptimConfig):
    """Stage 1: the slice encoder, trained per slice on image and exam labels (paper section 3.2).

    Each epoch takes, from every training study, its positive slices (at most ``positives_per_study``, null: all) and
    ``negatives_per_study`` random negative slices (null: all), drawn ``uniform``-ly over the scan or ``matched`` to
    where positives lie (``training.fitting.data``); ``within`` takes the matched negatives from the studies with
    positive slices alone, so that positives and negatives come from the same patients. ``background_negatives`` adds,
    from every study (negative ones too), that many more negatives drawn uniformly over the whole scan, so that stage 1
    also sees the apices, the bases and the mimics of studies without emboli that a study-level maximum runs over.
    ``sampling: study`` makes each batch from one study, as in the paper; ``mixed`` mixes studies in a batch.
    ``image_weight`` is the image label's weight in ``pe_node.model.slice_loss`` (default: the RSNA weight, the
    paper's loss; the nine exam labels weigh about 1 in all); raising it makes stage 1 learn what shows on each slice
    rather than which patient a slice belongs to.
    ``augment`` moves each training slice a little (``training.fitting.augment``) for the same reason. Validation reads
    every slice of the validation studies, or their positives and ``val_negatives_per_study`` evenly spaced
    negatives (the same ones every epoch), which makes it cheaper on large sets.
    ``chronic_repeats`` draws the positive slices of studies labelled chronic (``chronic_pe`` or
    ``acute_and_chronic_pe``, which RSPECT gives per study) that many times an epoch: chronic emboli are few and look
    unlike acute ones (thin, eccentric, against the wall), and a stage 1 that sees them rarely misses them.
    ``hard_negatives`` adds, from every training study without a positive slice, that many of its slices that the
    weights the epoch starts from score highest (mined before each epoch over every ``hard_negatives_stride``-th
    slice, from a start that moves each epoch): the false alarms that a study-level maximum meets in studies without
    emboli, shown again until they stop being false alarms. Studies with emboli give none, since the slices beside a
    labelled one can show the thin ends of its embolus.
    ``init`` starts the encoder from a trained stage 1 instead of ``model.pretrained``: a stage-1 ``best.pt`` or a
    pe-node checkpoint (``models/pe-demo.pt``), of the same model and preprocessing. The run then validates those
    weights first (epoch 0 of its history), so ``best.pt`` is the starting point unless fine-tuning beats it.
    """

    epochs: int = Field(4, ge=1)
    batch_size: int = Field(16, ge=2)
    lr: float = Field(1e-3, gt=0.0)
    sampling: Literal["study", "mixed"] = "study"
    image_weight: float = Field(IMAGE_WEIGHT, gt=0.0, description="weight of the image label in the slice loss")
    augment: bool = Field(False, description="random rotation, scaling and shift of each training slice")
    positives_per_study: int | None = Field(None, ge=1)
    negatives_per_study: int | None = Field(16, ge=1)
    negatives: Literal["uniform", "matched", "within"] = "uniform"
    background_negatives: int = Field(0, ge=0, description="more negatives a study and epoch, from anywhere in it")
    val_negatives_per_study: int | None = Field(None, ge=1)
    loader_workers: int = Field(0, ge=0, le=64)
    chronic_repeats: int = Field(1, ge=1, le=100,
                                 description="draws an epoch of each positive slice of a chronic-labelled study")
    hard_negatives: int = Field(0, ge=0, le=1000, description="slices of each study without emboli an epoch that "
                                "the epoch's starting weights score highest")
    hard_negatives_stride: int = Field(1, ge=1, le=32, description="hard negatives: score every n-th slice")
    init: str | None = Field(None, description="fine-tune: a stage-1 best.pt or a pe-node checkpoint to start from")
    select: Literal["val_loss", "val_image_auc", "val_study_auc"] = Field(
        "val_loss", description="best.pt: the epoch of lowest validation loss (the paper) or of highest AUC")


class Stage2Config(OptimConfig):
    """Stage 2: the sequence model on stage-1 embeddings of whole series, with the RSNA loss (section 2.3)."""

    epochs: int = Field(30, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(5e-4, gt=0.0)
    pooling: Literal["attention", "mean", "max"] = "attention"
    select: Literal["val_loss", "val_rsna_log_loss", "val_study_auc"] = Field(
        "val_loss", description="best.pt: the epoch of lowest validation loss (the paper), log loss, or highest AUC")


class EvaluateConfig(_Section):
    """What ``evaluate`` draws besides the numbers."""

    cam_examples: int = Field(6, ge=0, le=64)
    tsne_perplexity: float = Field(15.0, gt=0.0)
    bootstrap: int = Field(2000, ge=0, le=100_000,
                           description="study resamples for the 95 % confidence intervals; 0: no intervals")


class TrainConfig(_Section):
    """The whole training configuration."""

    seed: int = Field(0, ge=0)
    device: str = "auto"
    threads: int | None = Field(None, ge=1, description="torch threads per process; null: the CPUs per process")
    data: DataConfig = DataConfig()
    preprocess: PreprocessSection = PreprocessSection()
    model: ModelSection = ModelSection()
    stage1: Stage1Config = Stage1Config()
    stage2: Stage2Config = Stage2Config()
    evaluate: EvaluateConfig = EvaluateConfig()

    @field_validator("device")
    @classmethod
    def _device(cls, device: str) -> str:
        return check_device(device)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def parse_override(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with a dotted key (``stage1.epochs=3``); the value is read as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key.strip()):
        raise TrainConfigError(f"override {text!r}: expected KEY=VALUE with a dotted key such as stage1.epochs=3")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError as error:
        raise TrainConfigError(f"override {key.strip()}: value {value!r} is not valid YAML ({error})") from None


def load_train_config(
    path: Path | None = None, overrides: Mapping[str, Any] | Iterable[tuple[str, Any]] = ()
) -> TrainConfig:
    """The defaults, then the YAML file at ``path``, then ``overrides`` (dotted key to value), validated."""
    data: dict[str, Any] = {}
    source = "training config"
    if path is not None:
        source = str(path)
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise TrainConfigError(f"{path}: config file not found") from None
        except yaml.YAMLError as error:
            raise TrainConfigError(f"{path}: not valid YAML: {error}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise TrainConfigError(f"{path}: the top level must be a mapping, got {type(loaded).__name__}")
        data = loaded or {}
    items = overrides.items() if isinstance(overrides, Mapping) else overrides
    for key, value in items:
        data = _set(data, key, value)
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as error:
        raise TrainConfigError(_describe(error, source)) from None


def save_train_config(config: TrainConfig, path: Path) -> Path:
    """Write the resolved config as YAML (read back by ``load_train_config``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config.to_yaml(), encoding="utf-8")
    return path


def _set(data: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """A copy of ``data`` with ``value`` at ``dotted``; sections on the way are created or copied."""
    keys = dotted.split(".")
    merged = dict(data)
    target = merged
    for depth, key in enumerate(keys[:-1]):
        node = target.get(key)
        if node is None:
            node = {}
        elif not isinstance(node, dict):
            raise TrainConfigError(f"override {dotted}: {'.'.join(keys[: depth + 1])} is not a section")
        target[key] = dict(node)
        target = target[key]
    target[keys[-1]] = value
    return merged


def _describe(error: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid training configuration"]
    seen: set[str] = set()
    for problem in error.errors():
        location: list[str] = []
        for part in problem["loc"]:  # stop at pydantic's union and validator tags: only the keys name the place
            if not re.fullmatch(r"[A-Za-z_]\w*|\d+", str(part)) or part in ("bool", "int", "float", "str", "none"):
                break
            location.append(str(part))
        key = ".".join(location) or "(top level)"
        if key in seen:
            continue
        seen.add(key)
        if problem["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        else:
            given = problem.get("input")
            shown = "" if isinstance(given, dict | list) else f" (got {given!r})"
            lines.append(f"  {key}: {problem['msg'].removeprefix('Value error, ')}{shown}")
    return "\n".join(lines)
