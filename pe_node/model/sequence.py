"""Stage 2 of the paper (section 2.3): a sequence model over the slice embeddings of one series.

A bidirectional LSTM reads the embeddings in slice order and a dense layer follows, giving one feature h_k per
slice. The image head classifies each h_k; attention MIL pooling (Ilse et al. 2018),
a_k = softmax_k(w^T tanh(V h_k)) and z = sum_k a_k h_k, gives the study feature z that the study head classifies
into the nine exam labels. ``pooling="mean"`` or ``"max"`` replaces the attention by plain pooling: the paper's
"CNN-LSTM without attention" baseline.

Batches hold series of different lengths, padded at the end and described by a mask [B, T] that is True on real
slices. The LSTM never sees padding (packed sequences) and the pooling ignores it, so padding changes no result.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from pe_node.findings import EXAM_LABELS


class Pooling(str, enum.Enum):
    """How the slice features of a series become the study feature z."""

    ATTENTION = "attention"
    MEAN = "mean"
    MAX = "max"


@dataclass(frozen=True)
class SequenceOutput:
    """Stage-2 outputs for a batch of series.

    ``image`` [B, T] and ``exam`` [B, 9] are logits; ``attention`` [B, T] sums to 1 over each series' real slices
    and is 0 on padding (for mean pooling it is uniform, for max pooling each slice's share of the feature channels
    whose maximum it supplies); ``study`` [B, F] is the pooled feature z (for the paper's t-SNE plot) and
    ``slices`` [B, T, F] the per-slice features h_k. Padded positions of ``image`` and ``slices`` are 0.
    """

    image: torch.Tensor
    exam: torch.Tensor
    attention: torch.Tensor
    study: torch.Tensor
    slices: torch.Tensor


class AttentionPool(nn.Module):
    """Attention MIL pooling: a_k = softmax_k(w^T tanh(V h_k)) over the real slices, z = sum_k a_k h_k."""

    def __init__(self, features: int, hidden: int):
        super().__init__()
        self.V = nn.Linear(features, hidden, bias=False)
        self.w = nn.Linear(hidden, 1, bias=False)

    def forward(self, slices: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.w(torch.tanh(self.V(slices))).squeeze(-1)
        weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=1)
        return torch.einsum("bt,btf->bf", weights, slices), weights


class SequenceModel(nn.Module):
    """BiLSTM + dense over slice embeddings [B, T, D], an image head per slice and a study head on the pooled z."""

    def __init__(
        self,
        input_dim: int,
        lstm_hidden: int = 256,
        lstm_layers: int = 1,
        dense_dim: int = 256,
        attention_dim: int = 128,
        pooling: Pooling | str = Pooling.ATTENTION,
        dropout: float = 0.0,
        study_norm: bool = False,
    ):
        super().__init__()
        try:
            self.pooling = Pooling(pooling)
        except ValueError:
            choices = ", ".join(p.value for p in Pooling)
            raise ValueError(f"pooling {pooling!r}: must be one of {choices}") from None
        self.input_dim = input_dim
        self.lstm = nn.LSTM(
            input_dim,
            lstm_hidden,
            num_layers=lstm_layers,
            batch_first=True,
            bidirectional=True,
            dropout=dropout if lstm_layers > 1 else 0.0,
        )
        self.dense = nn.Sequential(nn.Linear(2 * lstm_hidden, dense_dim), nn.ReLU(), nn.Dropout(dropout))
        self.attention = AttentionPool(dense_dim, attention_dim) if self.pooling is Pooling.ATTENTION else None
        self.image_head = nn.Linear(dense_dim, 1)
        # The pooled z of the dense layer's ReLU features is all positive, with a common part that the negative
        # studies' gradients (the larger share of the RSNA loss) push the exam head along: positive studies, whose
        # features are larger, then score as more negative, until the head finds the direction that separates them.
        # On weak signals it may never get there; layer normalization of z takes the common part out.
        self.study_norm = nn.LayerNorm(dense_dim) if study_norm else nn.Identity()
        self.exam_head = nn.Linear(dense_dim, len(EXAM_LABELS))

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> SequenceOutput:
        """Run stage 2 on embeddings [B, T, D]; ``mask`` [B, T] is True on real slices, which come first."""
        if features.ndim != 3 or features.shape[-1] != self.input_dim:
            raise ValueError(f"stage 2 expects features [B, T, {self.input_dim}], got shape {tuple(features.shape)}")
        mask = _check_mask(mask, features)
        lengths = mask.sum(dim=1)
        packed = pack_padded_sequence(features, lengths.cpu(), batch_first=True, enforce_sorted=False)
        encoded, _ = self.lstm(packed)
        encoded, _ = pad_packed_sequence(encoded, batch_first=True, total_length=features.shape[1])
        slices = self.dense(encoded) * mask[..., None]
        study, attention = self._pool(slices, mask, lengths)
        image = self.image_head(slices).squeeze(-1).masked_fill(~mask, 0.0)
        exam = self.exam_head(self.study_norm(study))
        return SequenceOutput(image=image, exam=exam, attention=attention, study=study, slices=slices)

    def _pool(
        self, slices: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.attention is not None:
            return self.attention(slices, mask)
        if self.pooling is Pooling.MEAN:
            weights = mask.to(slices.dtype) / lengths[:, None].to(slices.dtype)
            return torch.einsum("bt,btf->bf", weights, slices), weights
        study, winners = slices.masked_fill(~mask[..., None], float("-inf")).max(dim=1)
        shares = nn.functional.one_hot(winners, slices.shape[1]).to(slices.dtype).mean(dim=1)
        return study, shares


def _check_mask(mask: torch.Tensor | None, features: torch.Tensor) -> torch.Tensor:
    """The mask as bool [B, T], all True when absent; refused unless every row is real slices then padding."""
    batch, steps = features.shape[:2]
    if mask is None:
        return torch.ones(batch, steps, dtype=torch.bool, device=features.device)
    if mask.shape != (batch, steps):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match features [B, T] = ({batch}, {steps})")
    mask = mask.to(torch.bool)
    lengths = mask.sum(dim=1)
    if bool((lengths == 0).any()):
        raise ValueError(f"mask: series {torch.nonzero(lengths == 0).flatten().tolist()} have no real slice")
    prefix = torch.arange(steps, device=mask.device)[None, :] < lengths[:, None]
    if not torch.equal(prefix, mask):
        raise ValueError("mask: real slices must come first in each row, padding after them")
    return mask
