"""Stage 1 of the paper (section 2.2): a CNN that encodes one CT slice and classifies it.

Any timm backbone with a convolutional feature map works (EfficientNet-B0 by default, always ``pretrained=False``:
there is no network to download weights from). Global average pooling turns the last feature map into the slice
embedding that stage 2 reads; two linear heads on the embedding predict the image label and the nine exam labels.

Stage 1 is trained per slice and multi-label, as in the paper (section 3.2): each slice's targets are its own
``pe_present_on_image`` and the nine exam labels of its study (see ``pe_node.model.loss.slice_loss``). The exam head
only shapes the embedding during that training; serving reads the embedding and the image head (for the CAMs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import timm
import torch
from torch import nn

from pe_node.findings import EXAM_LABELS


@dataclass(frozen=True)
class SliceLogits:
    """Stage-1 outputs for a batch of slices: the pooled embedding [B, C] and the head logits."""

    embedding: torch.Tensor
    image: torch.Tensor
    exam: torch.Tensor


class SliceEncoder(nn.Module):
    """A timm backbone, global average pooling, an image head (1 logit) and an exam head (9 logits)."""

    backbone: Any  # a timm model: forward_features and num_features, which nn.Module's type does not know

    def __init__(self, backbone: str = "efficientnet_b0", drop_rate: float = 0.0, drop_path_rate: float = 0.0):
        super().__init__()
        kwargs: dict[str, Any] = {"drop_path_rate": drop_path_rate} if drop_path_rate else {}
        try:
            self.backbone = timm.create_model(backbone, pretrained=False, num_classes=0, global_pool="", **kwargs)
        except RuntimeError as error:  # timm's "Unknown model (...)"
            raise ValueError(f"backbone {backbone!r}: not a timm model ({error})") from None
        self.backbone_name = backbone
        self.num_features = int(self.backbone.num_features)
        self.dropout = nn.Dropout(drop_rate)
        self.image_head = nn.Linear(self.num_features, 1)
        self.exam_head = nn.Linear(self.num_features, len(EXAM_LABELS))

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """The last convolutional feature map [B, C, h, w] of images [B, 3, S, S]; CAMs are made from it."""
        features = self.backbone.forward_features(images)
        if features.ndim != 4:
            raise ValueError(
                f"backbone {self.backbone_name!r} gives features of shape {tuple(features.shape)}, "
                "not a convolutional feature map [B, C, h, w]"
            )
        return features

    @staticmethod
    def pool(features: torch.Tensor) -> torch.Tensor:
        """Global average pooling of a feature map to the slice embedding [B, C], in float32."""
        return features.float().mean(dim=(2, 3))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Slice embeddings [B, C] of images [B, 3, S, S]: what stage 2 reads."""
        return self.pool(self.forward_features(images))

    def forward_head(self, embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image logits [B] and exam logits [B, 9] from embeddings [B, C]."""
        hidden = self.dropout(embedding)
        return self.image_head(hidden).squeeze(-1), self.exam_head(hidden)

    def forward(self, images: torch.Tensor) -> SliceLogits:
        embedding = self.embed(images)
        image, exam = self.forward_head(embedding)
        return SliceLogits(embedding=embedding, image=image, exam=exam)
