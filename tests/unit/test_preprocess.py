"""Preprocessing: windows as channels, resize, normalisation, the body crop, and config validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pe_node.model.preprocess import (
    AIR_HU,
    CropBox,
    CropMode,
    PreprocessConfig,
    body_box,
    plan_crop,
    preprocess_slices,
)
from tests.dicom_factory import phantom_volume

PLAIN = PreprocessConfig(size=32, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def test_windows_map_hu_to_channels_lung_pe_mediastinal() -> None:
    levels = torch.tensor([-600, 100, 40, -1350, 450, 240], dtype=torch.int16)
    hu = levels.view(6, 1, 1).expand(6, 32, 32).contiguous()
    out = preprocess_slices(hu, PLAIN)[:, :, 0, 0]
    assert out[0, 0] == pytest.approx(0.5)  # lung window centre
    assert out[1, 1] == pytest.approx(0.5)  # PE window centre
    assert out[2, 2] == pytest.approx(0.5)  # mediastinal window centre
    assert out[3].tolist() == pytest.approx([0.0, 0.0, 0.0])  # lung window floor and below the others
    assert out[4, 1] == pytest.approx(1.0)  # top of the PE window
    assert out[5, 2] == pytest.approx(1.0)  # top of the mediastinal window


def test_normalisation_applies_mean_and_std_per_channel() -> None:
    config = PreprocessConfig(size=32, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 2.0))
    hu = torch.full((1, 32, 32), 100, dtype=torch.int16)
    plain = preprocess_slices(hu, PLAIN)[0, :, 0, 0]
    normalised = preprocess_slices(hu, config)[0, :, 0, 0]
    expected = (plain - torch.tensor(config.mean)) / torch.tensor(config.std)
    assert torch.allclose(normalised, expected)


def test_output_is_float32_batch_of_three_channel_squares() -> None:
    hu = np.full((5, 48, 80), -1000, dtype=np.int16)
    out = preprocess_slices(hu, PreprocessConfig(size=64))
    assert out.shape == (5, 3, 64, 64)
    assert out.dtype == torch.float32


def test_shrinking_averages_pixels_instead_of_skipping_them() -> None:
    hu = np.zeros((1, 64, 64), dtype=np.int16)
    hu[0, ::2, ::2] = 400  # a fine pattern: sampling every other pixel would see only 400 or only 0
    out = preprocess_slices(hu, PLAIN)
    assert torch.allclose(out[0, 1], torch.full((32, 32), (100 - (100 - 350)) / 700))


def test_crop_box_outside_the_slice_is_filled_with_air() -> None:
    hu = np.full((1, 32, 32), 100, dtype=np.int16)
    out = preprocess_slices(hu, PLAIN, box=CropBox(top=-32, left=0, side=64))
    air = preprocess_slices(np.full((1, 32, 32), AIR_HU, dtype=np.int16), PLAIN)[0, :, 0, 0]
    assert torch.allclose(out[0, :, 0, 0], air)  # top half: outside the slice
    assert out[0, 1, -1, 0] == pytest.approx(0.5)  # bottom half: the slice (PE window centre)


def test_body_box_is_square_around_the_body_and_leaves_out_the_table() -> None:
    volume = phantom_volume(n_slices=8, size=128)
    box = body_box(volume)
    assert box is not None
    # The phantom's body is an ellipse of half-axes 0.42 x 0.32 of the width, centred; the table lies below it.
    body_width = 2 * 0.42 * 128
    assert body_width <= box.side <= body_width + 0.06 * 128
    assert abs((box.left + box.side / 2) - 64) <= 1.5
    assert abs((box.top + box.side / 2) - 64) <= 1.5  # a box including the table would be pushed down


def test_body_box_of_an_empty_series_is_none() -> None:
    assert body_box(np.full((3, 32, 32), -1000, dtype=np.int16)) is None


def test_plan_crop_follows_the_config() -> None:
    volume = phantom_volume(n_slices=4, size=64)
    assert plan_crop(volume, PreprocessConfig(size=64)) is None
    assert plan_crop(volume, PreprocessConfig(size=64, crop="body")) == body_box(volume)


def test_config_round_trips_through_a_plain_dict() -> None:
    config = PreprocessConfig(size=512, crop="body", mean=(0.1, 0.2, 0.3))
    data = config.to_dict()
    assert data["crop"] == "body" and isinstance(data["windows"], list)
    assert PreprocessConfig.from_dict(data) == config
    assert config.crop is CropMode.BODY


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"size": 16}, "size 16"),
        ({"crop": "lungs"}, "crop 'lungs'"),
        ({"windows": ((0, 100), (0, 0), (0, 10))}, "width must be > 0"),
        ({"windows": ((0, 100),)}, "3 (level, width)"),
        ({"std": (1.0, 0.0, 1.0)}, "std"),
    ],
)
def test_bad_config_is_refused_naming_the_value(kwargs: dict, named: str) -> None:
    with pytest.raises(ValueError, match=named.replace("(", r"\(").replace(")", r"\)")):
        PreprocessConfig(**kwargs)


def test_unknown_config_key_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="unknown key.*gamma"):
        PreprocessConfig.from_dict({"size": 64, "gamma": 2})
