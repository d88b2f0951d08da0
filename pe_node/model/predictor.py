"""Running a trained PE model on one CT series: the ``Predictor``, loaded once and used for every series.

The int16 HU volume streams through preprocessing and stage 1 in batches (never a float copy of the whole volume),
stage 2 runs once over all slice embeddings in float32, the exam probabilities are made label-consistent with the
image probabilities, and class-activation maps are computed for a few chosen slices: the key slices and the peak
slice of each located finding (``pe_node.located``), whose region the reports draw from its map.

Stage 1 has a fast path (the default) and the plain float32 path (``fast=False``, for comparison and benchmarks).
The fast path runs under ``torch.inference_mode`` in channels-last memory format with batch norm folded into the
convolutions, and under autocast in bfloat16 on CPUs with native bf16 (AMX or AVX512-BF16) and in bfloat16 or
float16 on CUDA. On a CPU without native bf16 (where bf16 is far slower than float32) stage 1 runs in float32
through ONNX Runtime instead, when it is installed (``runtime.py``). On the CPU it also runs stage 1 a few slices at
a time (``CPU_FAST_BATCH``), which avoids the page faults of large activation buffers.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pe_node import __version__
from pe_node.findings import EXAM_LABELS, Prediction
from pe_node.located import peak_slices, rank_slices
from pe_node.model.cam import activation_maps, to_slice
from pe_node.model.checkpoint import CheckpointMeta, load_checkpoint
from pe_node.model.cnn_lstm import PEModel
from pe_node.model.consistency import make_consistent
from pe_node.model.encoder import SliceEncoder
from pe_node.model.folding import fold_batchnorm
from pe_node.model.preprocess import (
    CropBox,
    PreprocessConfig,
    plan_crop,
    preprocess_slices,
)
from pe_node.model.runtime import onnx_embedder
from pe_node.pipeline.series import CTSeries

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
CPU_FAST_BATCH = 4
"""Most slices per stage-1 step on the CPU's fast path. Larger batches have activations of tens to hundreds of MB,
which glibc maps and unmaps on every step: measured on 2 cores at 256 px, batch 32 spent a third of its time in
page faults and ran at half the speed of batch 4."""
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AMX tiles or AVX512-BF16)."""
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` is CUDA when available, else the CPU; an unavailable device is refused by name."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r}: not a torch device (use auto, cpu, cuda or cuda:N)") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available on this machine")
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: only cpu and cuda are supported")
    return resolved


@dataclass
class _Timer:
    """Seconds spent per phase, accumulated over batches."""

    device: torch.device
    seconds: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


class Predictor:
    """The PE model ready for inference on whole series.

    ``precision`` picks stage 1's autocast dtype: ``"auto"`` (bf16 on CPUs with native bf16, bf16 or fp16 on CUDA,
    else fp32), or ``"fp32"``, ``"bf16"``, ``"fp16"`` (CUDA only) to force one. ``fast=False`` is the plain fp32
    path: contiguous memory format, batch norm unfolded, no autocast.

    The model is moved to the device and put in eval mode. The fast path runs a folded copy of the encoder taken
    here, so a Predictor does not see later changes to the weights: build a new one after a training step.
    """

    def __init__(
        self,
        model: PEModel,
        preprocess: PreprocessConfig,
        device: str | torch.device = "auto",
        batch_size: int = 32,
        fast: bool = True,
        precision: str = "auto",
        meta: CheckpointMeta | None = None,
    ):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size {batch_size!r}: must be a positive integer")
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.preprocess = preprocess
        self.batch_size = batch_size
        self.fast = fast
        cpu_fast = fast and self.device.type == "cpu"
        self.step = min(batch_size, CPU_FAST_BATCH) if cpu_fast else batch_size  # slices per stage-1 step
        self.precision = _precision(precision, fast, self.device)
        self.meta = meta
        self._encoder = self._inference_encoder(model.encoder) if fast else model.encoder
        use_onnx = cpu_fast and self.precision == "fp32"
        self._runtime = onnx_embedder(model.encoder, preprocess.size) if use_onnx else None
        self.engine = "onnxruntime" if self._runtime is not None else "torch"

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        device: str | torch.device = "auto",
        batch_size: int = 32,
        fast: bool = True,
        precision: str = "auto",
    ) -> Predictor:
        """Load a checkpoint (``CheckpointError`` if it is unusable) and prepare it for ``device``."""
        resolved = resolve_device(device)
        loaded = load_checkpoint(path, resolved)
        return cls(loaded.model, loaded.preprocess, resolved, batch_size, fast, precision, loaded.meta)

    def predict(self, series: CTSeries, cam_slices: int | Sequence[int] = 0) -> Prediction:
        """Findings for a sorted series, with label-consistent probabilities and per-phase timings (seconds).

        ``cam_slices`` asks for class-activation maps: an int k means the k slices with the highest image
        probability times attention weight (the slices that both the image head and the study attention point
        at) and, when k > 0, the peak slice of each located finding (at most ``located.MAX_FINDINGS``), so that
        every finding of the report gets its region; a sequence gives slice indices. Timings: preprocess, stage1,
        stage2, cam, total.
        """
        hu = _check_series(series)
        timer = _Timer(self.device)
        with timer.phase("total"):
            with timer.phase("preprocess"):
                box = plan_crop(hu, self.preprocess)
            embeddings = self._embed(hu, box, timer)
            with timer.phase("stage2"), torch.inference_mode():
                output = self.model.sequence(embeddings[None])
                image = torch.sigmoid(output.image[0]).cpu().numpy()
                exam = torch.sigmoid(output.exam[0]).cpu().numpy()
                attention = output.attention[0].cpu().numpy().astype(np.float32)
                consistent = make_consistent(exam, image)
            image = consistent.image.astype(np.float32)
            with timer.phase("cam"):
                indices = cam_indices(cam_slices, image, attention)
                cams = self._cams(hu, indices, box)
        phases = ("preprocess", "stage1", "stage2", "cam", "total")
        return Prediction(
            series_instance_uid=series.series_instance_uid,
            sop_instance_uids=series.sop_instance_uids,
            exam={label: float(p) for label, p in zip(EXAM_LABELS, consistent.exam, strict=True)},
            image=image,
            attention=attention,
            cams=cams,
            timings={phase: timer.seconds.get(phase, 0.0) for phase in phases},
            model=self.model_info(),
        )

    def embed(self, hu: np.ndarray) -> torch.Tensor:
        """Stage-1 embeddings [n, C] (float32, on the device) of a series' slices [n, rows, cols] in HU.

        The series is cropped as the preprocessing config says, exactly as in ``predict``: training extracts the
        features of its stage-2 data set with this.
        """
        return self._embed(hu, plan_crop(hu, self.preprocess), _Timer(self.device))

    def embed_inputs(self, images: torch.Tensor) -> torch.Tensor:
        """Stage-1 embeddings [n, C] (float32, on the device) of slices already preprocessed [n, 3, S, S].

        The same encoder, steps and precision as ``predict`` and ``embed``, on input that ``preprocess_slices`` made
        earlier: training extracts its stage-2 features from its cache of preprocessed slices with this.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"embed_inputs expects preprocessed slices [n, 3, S, S], got {tuple(images.shape)}")
        with torch.inference_mode():
            embeddings = torch.empty(len(images), self.model.embedding_dim, dtype=torch.float32, device=self.device)
            for start in range(0, len(images), self.step):
                chunk = images[start : start + self.step].to(self.device, torch.float32, non_blocking=True)
                if self._runtime is not None:
                    embeddings[start : start + len(chunk)] = self._runtime(chunk)
                    continue
                if self.fast:
                    chunk = chunk.contiguous(memory_format=torch.channels_last)
                with self._autocast():
                    embeddings[start : start + len(chunk)] = self._encoder.embed(chunk)
        return embeddings.clone()

    def cams(self, hu: np.ndarray, indices: Sequence[int]) -> dict[int, np.ndarray]:
        """Class-activation maps of the image label for slices ``indices`` of a series [n, rows, cols] in HU.

        Each map is float32 [rows, cols] in [0, 1], mapped back through the crop and resize.
        """
        return self._cams(hu, indices, plan_crop(hu, self.preprocess))

    def _embed(self, hu: np.ndarray, box: CropBox | None, timer: _Timer) -> torch.Tensor:
        with torch.inference_mode():
            embeddings = torch.empty(len(hu), self.model.embedding_dim, dtype=torch.float32, device=self.device)
            for start in range(0, len(hu), self.step):
                stop = min(start + self.step, len(hu))
                with timer.phase("preprocess"):
                    images = self._input(hu[start:stop], box)
                with timer.phase("stage1"), self._autocast():
                    if self._runtime is not None:
                        embeddings[start:stop] = self._runtime(images)
                    else:
                        embeddings[start:stop] = self._encoder.embed(images)
        return embeddings.clone()  # a normal tensor, so training may feed it to autograd

    def _cams(self, hu: np.ndarray, indices: Sequence[int], box: CropBox | None) -> dict[int, np.ndarray]:
        if not indices:
            return {}
        rows, cols = hu.shape[1:]
        weights = self._encoder.image_head.weight[0].detach().float()
        maps: dict[int, np.ndarray] = {}
        with torch.inference_mode():
            for start in range(0, len(indices), self.step):
                chunk = list(indices[start : start + self.step])
                images = self._input(hu[chunk], box)
                with self._autocast():
                    features = self._encoder.forward_features(images)
                for index, cam in zip(chunk, activation_maps(features, weights).cpu(), strict=True):
                    maps[index] = to_slice(cam, rows, cols, box)
        return maps

    def model_info(self) -> dict[str, object]:
        """What ``Prediction.model`` carries: name, software version, checkpoint file and its SHA-256, how it ran."""
        return {
            "name": self.model.name,
            "version": __version__,
            "checkpoint": str(self.meta.path) if self.meta else None,
            "sha256": self.meta.sha256 if self.meta else None,
            "trained_with": self.meta.pe_node_version if self.meta else None,
            "device": str(self.device),
            "precision": self.precision,
            "engine": self.engine,
        }

    def _input(self, hu: np.ndarray, box: CropBox | None) -> torch.Tensor:
        images = preprocess_slices(torch.from_numpy(np.ascontiguousarray(hu)), self.preprocess, box, self.device)
        if self.fast and self._runtime is None:
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=_AUTOCAST_DTYPES[self.precision])

    def _inference_encoder(self, encoder: SliceEncoder) -> SliceEncoder:
        size = min(self.preprocess.size, 64)
        example = torch.randn(2, 3, size, size, device=self.device)
        folded = fold_batchnorm(encoder, example, run=lambda net, x: net.forward_features(x))
        return folded.to(memory_format=torch.channels_last)

def cam_indices(cam_slices: int | Sequence[int], image: np.ndarray, attention: np.ndarray) -> list[int]:
    """The slices that ``predict`` maps for ``cam_slices`` (see there), given the image probabilities and attention.

    For an int k: the k slices with the highest image probability times attention (``located.rank_slices``; the
    first is a non-positive exam's most suspicious slice, which its SR locates), then the peak slice of each located
    finding that is not among them.
    """
    count = len(image)
    if isinstance(cam_slices, (int, np.integer)):
        if cam_slices < 0:
            raise ValueError(f"cam_slices {cam_slices}: must be >= 0")
        if cam_slices == 0:
            return []
        return list(dict.fromkeys([*rank_slices(image, attention)[: int(cam_slices)], *peak_slices(image)]))
    indices = list(dict.fromkeys(int(i) for i in cam_slices))
    outside = [i for i in indices if not 0 <= i < count]
    if outside:
        raise ValueError(f"cam_slices {outside}: outside the series' {count} slices")
    return indices


def _precision(precision: str, fast: bool, device: torch.device) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: must be one of {', '.join(PRECISIONS)}")
    if not fast:
        if precision not in ("auto", "fp32"):
            raise ValueError(f"precision {precision!r}: the plain path (fast=False) is fp32 only")
        return "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision 'fp16': only on CUDA; use 'bf16' or 'fp32' on the CPU")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def _check_series(series: CTSeries) -> np.ndarray:
    hu = series.hu
    if not isinstance(hu, np.ndarray) or hu.ndim != 3 or hu.shape[0] == 0:
        shape = getattr(hu, "shape", None)
        raise ValueError(f"series {series.series_instance_uid}: hu must be an array [slices, rows, cols], got {shape}")
    if len(series.slices) != hu.shape[0]:
        raise ValueError(
            f"series {series.series_instance_uid}: {len(series.slices)} slice references for {hu.shape[0]} slices"
        )
    return hu
