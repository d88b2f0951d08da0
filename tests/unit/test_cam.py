"""Class-activation maps: weighted by the image head, scaled to [0, 1], mapped back through resize and crop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pe_node.model.cam import activation_maps, to_slice
from pe_node.model.preprocess import CropBox


def test_maps_weigh_channels_and_span_zero_to_one() -> None:
    features = torch.zeros(1, 2, 4, 4)
    features[0, 0, 1, 2] = 5.0  # channel 0: one hot spot
    features[0, 1, 3, 0] = 5.0  # channel 1: another
    maps = activation_maps(features, torch.tensor([1.0, -1.0]))
    assert maps.shape == (1, 4, 4)
    assert float(maps.min()) == 0.0 and float(maps.max()) == 1.0
    assert maps[0, 1, 2] == 1.0 and maps[0, 3, 0] == 0.0


def test_without_weights_the_map_is_the_channel_mean() -> None:
    features = torch.rand(2, 3, 5, 5)
    mean = features.mean(dim=1)
    expected = (mean - mean.amin(dim=(1, 2), keepdim=True)) / (
        mean.amax(dim=(1, 2), keepdim=True) - mean.amin(dim=(1, 2), keepdim=True)
    )
    assert torch.allclose(activation_maps(features), expected)


def test_flat_feature_map_gives_zeros_not_nan() -> None:
    maps = activation_maps(torch.ones(1, 4, 3, 3), torch.ones(4))
    assert torch.equal(maps, torch.zeros(1, 3, 3))


def hot_spot_map() -> torch.Tensor:
    cam = torch.zeros(8, 8)
    cam[2, 5] = 1.0
    return cam


def test_without_crop_the_map_is_resized_to_the_slice() -> None:
    mapped = to_slice(hot_spot_map(), rows=64, cols=128, box=None)
    assert mapped.shape == (64, 128) and mapped.dtype == np.float32
    row, col = np.unravel_index(np.argmax(mapped), mapped.shape)
    assert abs(row - (2.5 * 64 / 8)) <= 4 and abs(col - (5.5 * 128 / 8)) <= 8


def test_with_a_crop_box_the_map_lands_inside_the_box_and_is_zero_outside() -> None:
    box = CropBox(top=20, left=40, side=64)
    mapped = to_slice(hot_spot_map(), rows=128, cols=128, box=box)
    assert mapped.shape == (128, 128)
    row, col = np.unravel_index(np.argmax(mapped), mapped.shape)
    assert abs(row - (20 + 2.5 * 8)) <= 2 and abs(col - (40 + 5.5 * 8)) <= 2
    outside = np.ones_like(mapped, dtype=bool)
    outside[20:84, 40:104] = False
    assert not mapped[outside].any()
    assert float(mapped.min()) >= 0.0 and float(mapped.max()) <= 1.0


def test_box_reaching_past_the_slice_edges_is_clipped() -> None:
    box = CropBox(top=-16, left=-16, side=96)
    mapped = to_slice(torch.rand(6, 6), rows=64, cols=64, box=box)
    assert mapped.shape == (64, 64)


def test_wrong_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="feature maps"):
        activation_maps(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="one CAM"):
        to_slice(torch.zeros(1, 4, 4), 8, 8, None)
