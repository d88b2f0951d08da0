"""Batch-norm folding: the folded encoder computes the same features with fewer layers."""

from __future__ import annotations

import torch
from torch import nn

from pe_node.model.folding import fold_batchnorm
from tests.tiny_models import tiny_model


def randomise_batchnorm(module: nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    for sub in module.modules():
        if isinstance(sub, nn.BatchNorm2d):
            n = sub.num_features
            sub.running_mean.copy_(torch.randn(n, generator=generator) * 0.2)
            sub.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            sub.weight.data.copy_(torch.randn(n, generator=generator) * 0.2 + 1.0)
            sub.bias.data.copy_(torch.randn(n, generator=generator) * 0.2)


def features(encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return encoder.forward_features(images)


def test_folded_encoder_matches_the_original_and_has_no_batchnorm_left() -> None:
    encoder = tiny_model().encoder.eval()
    randomise_batchnorm(encoder)
    images = torch.randn(3, 3, 48, 48)
    folded = fold_batchnorm(encoder, images[:1], run=lambda net, x: net.forward_features(x))
    assert folded is not encoder
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert torch.allclose(features(folded, images), features(encoder, images), atol=1e-4, rtol=1e-4)


def test_original_is_left_untouched() -> None:
    encoder = tiny_model().encoder.eval()
    randomise_batchnorm(encoder)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    fold_batchnorm(encoder, torch.randn(1, 3, 32, 32), run=lambda net, x: net.forward_features(x))
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())


def test_batchnorm_not_after_a_convolution_is_kept() -> None:
    net = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    randomise_batchnorm(net)
    example = torch.randn(2, 3, 8, 8)
    folded = fold_batchnorm(net, example)
    assert isinstance(folded[0], nn.BatchNorm2d) and isinstance(folded[2], nn.Identity)
    with torch.no_grad():
        assert torch.allclose(folded(example), net(example), atol=1e-5)


def test_a_network_whose_folding_would_change_the_output_is_returned_as_is() -> None:
    class Shared(nn.Module):
        """The convolution's output feeds the BatchNorm and a skip connection: folding would change the skip."""

        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return self.bn(y) + y

    net = Shared().eval()
    randomise_batchnorm(net)
    assert fold_batchnorm(net, torch.randn(1, 3, 4, 4)) is net
