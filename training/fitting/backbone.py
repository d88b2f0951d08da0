"""Where stage 1's backbone starts: random weights, ImageNet weights from the timm model hub, or a local file.

pe-node creates every backbone with ``pretrained=False`` (serving never downloads anything). Training can start
from ImageNet weights, which matters on the real data set: ``pretrained: true`` asks timm for the backbone's default
pretrained weights (this needs the Hugging Face hub or timm's cache) and ``pretrained: PATH`` reads a state dict
from a ``.pth`` / ``.pt`` (``torch.load`` with ``weights_only=True``) or ``.safetensors`` file. A local file is
loaded leniently: a classifier it carries, or a ``module.`` prefix, does not matter; the keys that were missing,
unexpected or of another shape are reported, and a file that fits nothing is refused.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_file

from pe_node.model import SliceEncoder

logger = logging.getLogger(__name__)

_CONTAINERS = ("state_dict", "model", "state_dict_ema", "model_ema")


class BackboneWeightsError(ValueError):
    """Pretrained weights that cannot be had or do not fit; the message names the source and the reason."""


def load_backbone_weights(encoder: SliceEncoder, pretrained: bool | str) -> dict[str, Any]:
    """Load the configured starting weights into ``encoder.backbone``; returns a report for the run's metrics."""
    if pretrained is False:
        return {"source": "random"}
    if pretrained is True:
        return _from_hub(encoder)
    return _from_file(encoder, Path(pretrained))


def _from_hub(encoder: SliceEncoder) -> dict[str, Any]:
    name = encoder.backbone_name
    try:
        source = timm.create_model(name, pretrained=True, num_classes=0, global_pool="")
    except Exception as error:  # the network boundary: hub, HTTP and file errors of every kind end here
        raise BackboneWeightsError(
            f"model.pretrained: true: could not get ImageNet weights for {name!r} from the timm model hub "
            f"({type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}). Without network "
            "access give a downloaded state dict instead: model.pretrained: /path/to/weights.safetensors"
        ) from None
    encoder.backbone.load_state_dict(source.state_dict())
    tag = source.pretrained_cfg.get("hf_hub_id") or source.pretrained_cfg.get("url") or name
    logger.info("backbone %s starts from the timm hub's pretrained weights %s", name, tag)
    return {"source": f"timm hub: {tag}", "loaded": len(source.state_dict())}


def _from_file(encoder: SliceEncoder, path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise BackboneWeightsError(f"model.pretrained: {path}: no such file")
    state = _read(path)
    own = encoder.backbone.state_dict()
    fitting = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    mismatched = sorted(k for k in state if k in own and k not in fitting)
    if not fitting:
        raise BackboneWeightsError(
            f"model.pretrained: {path}: none of its {len(state)} tensors fit backbone {encoder.backbone_name!r} "
            f"(e.g. {next(iter(state), 'none')}); is it a state dict of this architecture?"
        )
    result = encoder.backbone.load_state_dict(fitting, strict=False)
    unexpected = sorted(k for k in state if k not in own)
    report = {"source": str(path), "loaded": len(fitting), "missing": sorted(result.missing_keys),
              "unexpected": unexpected, "mismatched": mismatched}
    logger.info("backbone %s: %d tensors from %s; missing %d, unexpected %d, other shape %d",
                encoder.backbone_name, len(fitting), path, len(report["missing"]), len(unexpected), len(mismatched))
    for kind in ("missing", "unexpected", "mismatched"):
        if report[kind]:
            logger.warning("backbone weights %s: %s %s", path, kind, ", ".join(report[kind][:8]))
    return report


def _read(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            state: Any = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # the file boundary
        raise BackboneWeightsError(
            f"model.pretrained: {path}: cannot be read as a state dict ({str(error).splitlines()[0][:200]})"
        ) from None
    for key in _CONTAINERS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneWeightsError(f"model.pretrained: {path}: holds no state dict (a dict of tensors)")
    return {key.removeprefix("module.").removeprefix("backbone."): value for key, value in state.items()}
