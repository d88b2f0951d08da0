"""Folding batch normalisation into the convolution before it, for faster inference.

In eval mode a BatchNorm after a convolution is an affine map per channel, which can be merged into the
convolution's weights and bias. On CPUs without fast bf16 this removes about a third of EfficientNet's inference
time (batch norm is memory-bound). Which BatchNorm follows which convolution is found by running the network once
and watching which module's output each BatchNorm receives, so it works for any timm backbone; the folded copy is
then checked against the original on the same input, and the original is kept if they disagree.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Any, TypeVar, cast

import torch
from torch import nn

logger = logging.getLogger(__name__)

_TOLERANCE = 1e-3
"""Largest difference allowed between the folded and the original network, relative to the output's scale."""


Module = TypeVar("Module", bound=nn.Module)
Run = Callable[[Any, torch.Tensor], torch.Tensor]


def fold_batchnorm(module: Module, example: torch.Tensor, run: Run | None = None) -> Module:
    """An eval-mode copy of ``module`` with every BatchNorm2d that directly follows a Conv2d folded into it.

    ``run(module, example)`` (default: ``module(example)``) computes the tensor to compare; it is used to find the
    pairs and to check the result. Returns the original module (in eval mode, otherwise unchanged) when nothing can
    be folded or the folded copy does not match.
    """
    run = run or (lambda net, x: net(x))
    module = module.eval()
    folded = copy.deepcopy(module)
    pairs = _conv_bn_pairs(folded, example, run)
    if not pairs:
        return module
    with torch.no_grad():
        for conv, bn_name in pairs:
            _fold(conv, cast(nn.BatchNorm2d, folded.get_submodule(bn_name)))
            _replace(folded, bn_name)
        expected = run(module, example)
        got = run(folded, example)
    error = float((expected - got).abs().max()) / max(float(expected.abs().max()), 1.0)
    if error > _TOLERANCE:
        logger.warning("batch-norm folding changed the output by %.2g (relative); keeping the original", error)
        return module
    return folded


def _conv_bn_pairs(module: nn.Module, example: torch.Tensor, run: Run) -> list[tuple[nn.Conv2d, str]]:
    """(convolution, BatchNorm name) for each BatchNorm2d whose input is exactly a Conv2d's output."""
    outputs: dict[int, tuple[nn.Conv2d, torch.Tensor]] = {}  # the tensor is kept alive so its id stays unique
    pairs: list[tuple[nn.Conv2d, str]] = []
    hooks = []

    def remember(conv: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        outputs[id(output)] = (cast(nn.Conv2d, conv), output)

    def pair(name: str):
        def hook(_bn: nn.Module, inputs: tuple) -> None:
            conv, _ = outputs.get(id(inputs[0]), (None, None))
            if conv is not None and all(existing is not conv for existing, _ in pairs):
                pairs.append((conv, name))

        return hook

    for name, sub in module.named_modules():
        if type(sub) is nn.Conv2d:
            hooks.append(sub.register_forward_hook(remember))
        elif isinstance(sub, nn.BatchNorm2d) and sub.track_running_stats and _replacement(sub) is not None:
            hooks.append(sub.register_forward_pre_hook(pair(name)))
    try:
        with torch.no_grad():
            run(module, example)
    finally:
        for hook in hooks:
            hook.remove()
    return pairs


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    assert bn.running_var is not None and bn.running_mean is not None, "folding needs running statistics"
    scale = bn.running_var.add(bn.eps).rsqrt()
    if bn.affine:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale + (bn.bias if bn.affine else 0.0)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    conv.weight.mul_(scale.view(-1, 1, 1, 1))
    conv.bias = nn.Parameter(bias * scale + shift)


def _replacement(bn: nn.BatchNorm2d) -> nn.Module | None:
    """What is left of ``bn`` once folded: nothing for a plain BatchNorm2d, the activation for timm's BatchNormAct2d."""
    if type(bn) is nn.BatchNorm2d:
        return nn.Identity()
    drop, act = getattr(bn, "drop", None), getattr(bn, "act", None)
    if type(bn).__name__ == "BatchNormAct2d" and isinstance(drop, nn.Module) and isinstance(act, nn.Module):
        return nn.Sequential(drop, act)
    return None


def _replace(root: nn.Module, name: str) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, _replacement(cast(nn.BatchNorm2d, root.get_submodule(name))))
