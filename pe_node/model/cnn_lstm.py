"""The paper's two-stage attention CNN-LSTM (Fig. 1): the stage-1 slice encoder and the stage-2 sequence model.

The two stages are trained one after the other (section 3.2) and live in one module so that one checkpoint holds
both. ``PEModel.forward`` runs them end to end on a batch of preprocessed series; serving streams slices through
the encoder in batches instead (``pe_node.model.predictor``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn

from pe_node.model.encoder import SliceEncoder
from pe_node.model.sequence import Pooling, SequenceModel, SequenceOutput


@dataclass(frozen=True)
class ModelConfig:
    """The architecture of both stages; stored in checkpoints as a plain dict."""

    backbone: str = "efficientnet_b0"
    lstm_hidden: int = 256
    lstm_layers: int = 1
    dense_dim: int = 256
    attention_dim: int = 128
    pooling: str = Pooling.ATTENTION.value
    dropout: float = 0.0
    drop_path_rate: float = 0.0
    study_norm: bool = False

    def __post_init__(self) -> None:
        for name in ("lstm_hidden", "lstm_layers", "dense_dim", "attention_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"model config {name}={value!r}: must be a positive integer")
        for name in ("dropout", "drop_path_rate"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"model config {name}={value!r}: must be in [0, 1)")
        try:
            object.__setattr__(self, "pooling", Pooling(self.pooling).value)
        except ValueError:
            choices = ", ".join(p.value for p in Pooling)
            raise ValueError(f"model config pooling={self.pooling!r}: must be one of {choices}") from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build a config from keyword values; an unknown key is an error that names it."""
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"model config: unknown key(s) {', '.join(unknown)}")
        return cls(**data)


class PEModel(nn.Module):
    """Both stages of the PE model: ``encoder`` (stage 1) and ``sequence`` (stage 2)."""

    def __init__(self, name: str, config: ModelConfig):
        super().__init__()
        self.name = name
        self.config = config
        self.encoder = SliceEncoder(config.backbone, drop_rate=config.dropout, drop_path_rate=config.drop_path_rate)
        self.sequence = SequenceModel(
            self.encoder.num_features,
            lstm_hidden=config.lstm_hidden,
            lstm_layers=config.lstm_layers,
            dense_dim=config.dense_dim,
            attention_dim=config.attention_dim,
            pooling=config.pooling,
            dropout=config.dropout,
            study_norm=config.study_norm,
        )

    @property
    def embedding_dim(self) -> int:
        return self.encoder.num_features

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> SequenceOutput:
        """Both stages on preprocessed series [B, T, 3, S, S]; ``mask`` [B, T] as in ``SequenceModel.forward``.

        Only the real slices go through the encoder; padded positions get zero embeddings, which stage 2 ignores.
        """
        if images.ndim != 5:
            raise ValueError(f"PEModel expects images [B, T, 3, S, S], got shape {tuple(images.shape)}")
        batch, steps = images.shape[:2]
        if mask is None:
            mask = torch.ones(batch, steps, dtype=torch.bool, device=images.device)
        mask = mask.to(torch.bool)
        embeddings = images.new_zeros(batch, steps, self.embedding_dim, dtype=torch.float32)
        embeddings[mask] = self.encoder.embed(images[mask])
        return self.sequence(embeddings, mask)
