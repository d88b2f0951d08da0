"""The evaluation's figures (paper Fig. 3 and 4): ROC curves, the t-SNE of the study features, CAM examples.

Drawn with matplotlib's Agg backend (no display). CAM examples use the overlay of pe-node's secondary captures
(``pe_node.reporting.overlay``: the PE window and the heat-map colour ramp), so the report shows what PACS users see.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402
from sklearn.manifold import TSNE  # noqa: E402
from sklearn.metrics import roc_auc_score, roc_curve  # noqa: E402

from pe_node.findings import EXAM_LABELS, IMAGE_LABEL  # noqa: E402
from pe_node.model.preprocess import PE_WINDOW  # noqa: E402
from pe_node.reporting.overlay import blend, window  # noqa: E402

if TYPE_CHECKING:
    from training.evaluation.predictions import Predictions
    from training.fitting.cache import CachedStudy

_CLASS_COLOURS = {"negative": "tab:blue", "positive": "tab:red", "indeterminate": "tab:gray"}
_DPI = 110


@dataclass(frozen=True)
class CamExample:
    """One CAM example: a slice in HU, its map in [0, 1] at the slice's size, and what the model said of it."""

    study: str
    slice_index: int
    slices: int
    hu: np.ndarray
    cam: np.ndarray
    image_probability: float
    pe_probability: float
    attention_rank: int


def _roc(ax: plt.Axes, labels: np.ndarray, scores: np.ndarray, name: str) -> bool:
    labels = np.asarray(labels, dtype=np.float64)
    if len(np.unique(labels)) < 2:
        return False
    fpr, tpr, _ = roc_curve(labels, scores)
    ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc_score(labels, scores):.3f}, n+ {int(labels.sum())})")
    return True


def _finish_roc(ax: plt.Axes, title: str) -> None:
    ax.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01), title=title)
    ax.legend(loc="lower right", fontsize=7)


def draw_roc_labels(path: Path, predictions: Predictions, studies: Sequence[CachedStudy], title: str) -> Path:
    """ROC curves of each exam label with both classes present, and of the image level (paper Fig. 3a, b)."""
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    exam_y = np.stack([s.exam for s in studies])
    for j, label in enumerate(EXAM_LABELS):
        _roc(ax, exam_y[:, j], predictions.exam[:, j], label)
    _roc(ax, np.concatenate([s.image for s in studies]), np.concatenate(predictions.image), IMAGE_LABEL)
    _finish_roc(ax, f"{title}: exam and image labels")
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)
    return path


def draw_roc_models(path: Path, scores: Mapping[str, np.ndarray], positive: Sequence[bool]) -> Path:
    """The study-level PE ROC curve of each model, on one plot."""
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    for name, values in scores.items():
        _roc(ax, np.asarray(positive), values, name)
    _finish_roc(ax, "Study-level PE: the model and its baselines")
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)
    return path


def draw_tsne(path: Path, study_features: np.ndarray | None, classes: Sequence[str], perplexity: float,
              seed: int) -> Path:
    """t-SNE of the attention-pooled study features z, coloured by exam class (paper Fig. 3c)."""
    if study_features is None or len(study_features) < 4:
        raise ValueError("draw_tsne needs the study features of at least 4 studies")
    perplexity = min(perplexity, (len(study_features) - 1) / 3)
    points = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(
        np.asarray(study_features, dtype=np.float64)
    )
    fig, ax = plt.subplots(figsize=(5.6, 5.0))
    for name, colour in _CLASS_COLOURS.items():
        chosen = np.array([c == name for c in classes])
        if chosen.any():
            ax.scatter(points[chosen, 0], points[chosen, 1], s=22, c=colour, label=f"{name} ({chosen.sum()})",
                       edgecolors="white", linewidths=0.5)
    ax.set(title="t-SNE of the attention-pooled study features", xticks=[], yticks=[])
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)
    return path


def draw_cam(path: Path, example: CamExample) -> Path:
    """The slice in the PE window beside the same slice with the CAM overlay (paper Fig. 4)."""
    grey = window(example.hu, *PE_WINDOW)
    fig, axes = plt.subplots(1, 2, figsize=(8.0, 4.3))
    axes[0].imshow(grey, cmap="gray", vmin=0, vmax=255)
    axes[0].set_title(f"slice {example.slice_index + 1}/{example.slices}: PE present (ground truth)", fontsize=9)
    axes[1].imshow(blend(grey, example.cam))
    axes[1].set_title(f"CAM; p(image) {example.image_probability:.2f}, attention rank {example.attention_rank}",
                      fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(f"study ...{example.study[-12:]}: study PE probability {example.pe_probability:.2f}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)
    return path
