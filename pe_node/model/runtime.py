"""Stage 1 through ONNX Runtime: the CPU fast path where the CPU has no native bfloat16.

On a CPU without AMX or AVX512-BF16, PyTorch's float32 convolutions leave much of the hardware idle, while ONNX
Runtime's fused float32 kernels run EfficientNet-B0 about 2.5 times faster (measured on 2 AVX2 cores at 256 px:
71 slices/s against 27 with channels-last PyTorch). The encoder's ``embed`` (features and global average pooling)
is exported once, in memory, when a Predictor is built; its outputs match PyTorch's float32 path to about 1e-5.
Class-activation maps, which need the feature map of a few slices, stay in PyTorch.
"""

from __future__ import annotations

import io
import logging
import time
import warnings

import numpy as np
import torch
from torch import nn

from pe_node.model.encoder import SliceEncoder

logger = logging.getLogger(__name__)

OPSET = 17


class _Embedding(nn.Module):
    def __init__(self, encoder: SliceEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder.embed(images)


class OnnxEmbedder:
    """``embed`` of a slice encoder as an ONNX Runtime session: images [n, 3, S, S] -> embeddings [n, C]."""

    def __init__(self, encoder: SliceEncoder, size: int, threads: int) -> None:
        import onnxruntime

        started = time.perf_counter()
        buffer = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter announces its deprecation
            torch.onnx.export(  # the TorchScript exporter writes to a file object as well as to a path
                _Embedding(encoder).eval().cpu(), (torch.zeros(2, 3, size, size),), buffer,  # type: ignore[arg-type]
                input_names=["images"], output_names=["embedding"],
                dynamic_axes={"images": {0: "slices"}, "embedding": {0: "slices"}}, opset_version=OPSET, dynamo=False,
            )
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = onnxruntime.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
        logger.info("stage 1 prepared for ONNX Runtime %s in %.1f s", onnxruntime.__version__,
                    time.perf_counter() - started)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(images.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(self.session.run(None, {"images": array})[0])


def onnx_embedder(encoder: SliceEncoder, size: int) -> OnnxEmbedder | None:
    """The ONNX Runtime path, or None (PyTorch is used) when onnxruntime is missing or the backbone will not export."""
    try:
        return OnnxEmbedder(encoder, size, threads=torch.get_num_threads())
    except ImportError:
        logger.info("onnxruntime is not installed: stage 1 runs in PyTorch")
    except Exception as exc:  # an exotic backbone the exporter cannot trace: PyTorch runs it as it is
        logger.warning("stage 1 cannot run in ONNX Runtime (%s: %s); it runs in PyTorch", type(exc).__name__, exc)
    return None
