"""The paper's two-stage attention CNN-LSTM for pulmonary embolism, shared by serving and training.

Modules, one job each: ``preprocess`` (HU windows to the network input), ``encoder`` (stage 1), ``sequence``
(stage 2), ``cnn_lstm`` (both stages), ``factory`` (models by name), ``loss`` (the RSNA weighted log loss),
``consistency`` (the RSNA label rules), ``cam`` (class-activation maps), ``folding`` (batch norm folded for
inference), ``checkpoint`` (one file per trained model) and ``predictor`` (a series in, findings out).
"""

from pe_node.model.cam import activation_maps, to_slice
from pe_node.model.checkpoint import (
    CheckpointError,
    CheckpointMeta,
    LoadedCheckpoint,
    load_checkpoint,
    save_checkpoint,
)
from pe_node.model.cnn_lstm import ModelConfig, PEModel
from pe_node.model.consistency import ConsistentOutput, check, make_consistent
from pe_node.model.encoder import SliceEncoder, SliceLogits
from pe_node.model.factory import (
    DEFAULT_MODEL,
    create_model,
    list_models,
    model_config,
    register_model,
)
from pe_node.model.folding import fold_batchnorm
from pe_node.model.loss import rsna_loss, slice_loss
from pe_node.model.predictor import Predictor, cpu_has_fast_bf16, resolve_device
from pe_node.model.preprocess import (
    CropBox,
    CropMode,
    PreprocessConfig,
    plan_crop,
    preprocess_slices,
)
from pe_node.model.sequence import Pooling, SequenceModel, SequenceOutput

__all__ = [
    "DEFAULT_MODEL",
    "CheckpointError",
    "CheckpointMeta",
    "ConsistentOutput",
    "CropBox",
    "CropMode",
    "LoadedCheckpoint",
    "ModelConfig",
    "PEModel",
    "Pooling",
    "Predictor",
    "PreprocessConfig",
    "SequenceModel",
    "SequenceOutput",
    "SliceEncoder",
    "SliceLogits",
    "activation_maps",
    "check",
    "cpu_has_fast_bf16",
    "create_model",
    "fold_batchnorm",
    "list_models",
    "load_checkpoint",
    "make_consistent",
    "model_config",
    "plan_crop",
    "preprocess_slices",
    "register_model",
    "resolve_device",
    "rsna_loss",
    "save_checkpoint",
    "slice_loss",
    "to_slice",
]
