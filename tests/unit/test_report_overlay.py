"""The pixels of a key-slice capture: PE window, attention overlay, burned-in banner."""

from __future__ import annotations

import numpy as np
import pytest

from pe_node.reporting.overlay import blend, burn_in, heat_map, render, window


def test_pe_window_maps_its_edges_to_black_and_white() -> None:
    hu = np.array([[-1000, -250, 100, 450, 3000]], dtype=np.int16)
    assert window(hu, 100, 700).tolist() == [[0, 0, 128, 255, 255]]


def test_heat_map_runs_from_blue_to_red() -> None:
    cold, hot = heat_map(np.array([0.0, 1.0]))
    assert cold[2] > cold[0] and hot[0] > hot[2]


def test_overlay_colours_only_where_attention_is() -> None:
    grey = np.full((8, 8), 100, dtype=np.uint8)
    cam = np.zeros((8, 8))
    cam[2:4, 2:4] = 1.0
    rgb = blend(grey, cam)
    assert rgb.shape == (8, 8, 3) and rgb.dtype == np.uint8
    assert (rgb[0, 0] == 100).all()
    assert rgb[2, 2, 0] > rgb[2, 2, 2]


def test_no_attention_map_gives_the_grey_slice_in_rgb() -> None:
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8)
    assert (blend(grey, None) == grey[..., None]).all()


def test_attention_map_of_another_size_is_refused() -> None:
    with pytest.raises(ValueError, match="attention map"):
        blend(np.zeros((8, 8), dtype=np.uint8), np.zeros((4, 4)))


def test_banner_is_burned_into_a_band_across_the_top() -> None:
    rgb = np.full((256, 256, 3), 128, dtype=np.uint8)
    out = burn_in(rgb, ["PE probability 0.91"])
    band = out[:20]
    yellow = (band[..., 0] > 200) & (band[..., 1] > 200) & (band[..., 2] < 100)
    assert (band == 0).all(axis=-1).any() and yellow.any()
    assert (out[-50:] == 128).all()


def test_render_keeps_the_slice_size() -> None:
    hu = np.zeros((96, 80), dtype=np.int16)
    assert render(hu, np.zeros((96, 80)), ["x"]).shape == (96, 80, 3)
