"""Tiny random-weight PE models for unit tests: the real architecture on timm's test EfficientNet (~0.1 M weights)."""

from __future__ import annotations

import torch

from pe_node.model import PEModel, PreprocessConfig, create_model

TINY_MODEL = {
    "backbone": "test_efficientnet",
    "lstm_hidden": 16,
    "dense_dim": 16,
    "attention_dim": 8,
}
"""Config overrides that make ``pe_cnn_lstm`` small enough for unit tests."""
TINY_PREPROCESS = PreprocessConfig(size=64)


def tiny_model(seed: int = 0, **overrides: object) -> PEModel:
    """A random-weight tiny PE model in eval mode, identical for the same seed and overrides."""
    torch.manual_seed(seed)
    return create_model("pe_cnn_lstm", **{**TINY_MODEL, **overrides}).eval()
