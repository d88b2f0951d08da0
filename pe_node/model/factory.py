"""Building models by name, timm style: ``create_model("pe_cnn_lstm", backbone="efficientnet_b0", ...)``.

Each registered name stands for a set of ``ModelConfig`` defaults; keyword arguments override them. Checkpoints
store the name and the full config, so a model comes back exactly as it was trained even if defaults change.
"""

from __future__ import annotations

from typing import Any

from pe_node.model.cnn_lstm import ModelConfig, PEModel

DEFAULT_MODEL = "pe_cnn_lstm"

_REGISTRY: dict[str, dict[str, Any]] = {}


def register_model(name: str, **defaults: Any) -> None:
    """Register ``name`` with the config values that differ from ``ModelConfig``'s defaults."""
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    ModelConfig.from_dict(defaults)
    _REGISTRY[name] = dict(defaults)


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def model_config(name: str = DEFAULT_MODEL, **overrides: Any) -> ModelConfig:
    """The config ``create_model`` would use for ``name`` and ``overrides``."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; registered: {', '.join(list_models())}")
    return ModelConfig.from_dict({**_REGISTRY[name], **overrides})


def create_model(name: str = DEFAULT_MODEL, **overrides: Any) -> PEModel:
    """A new model with random weights (timm backbones are always created with ``pretrained=False``)."""
    return PEModel(name, model_config(name, **overrides))


register_model("pe_cnn_lstm")  # the paper's model: EfficientNet-B0, BiLSTM + dense, attention MIL pooling
register_model("pe_cnn_lstm_mean", pooling="mean")  # the paper's baseline 2, CNN-LSTM without attention
