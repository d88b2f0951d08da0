"""The pixels of a key-slice capture: PE window, attention overlay, and a band with the banner below the slice."""

from __future__ import annotations

import numpy as np
import pytest

from pe_node.reporting.overlay import blend, heat_map, render, window, with_band


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


def test_banner_sits_in_a_band_below_the_image_which_it_leaves_untouched() -> None:
    rgb = np.full((512, 512, 3), 128, dtype=np.uint8)
    out = with_band(rgb, ["PE, right, images 48-61, p 0.96 (finding 1 of 2)", "this slice: p 0.91"])
    assert out.shape[1:] == (512, 3) and 512 + 40 < out.shape[0] < 512 + 120
    assert (out[:512] == rgb).all(), "the image is unobstructed"
    band = out[512:]
    yellow = (band[..., 0] > 200) & (band[..., 1] > 200) & (band[..., 2] < 100)
    white = (band > 200).all(axis=-1)
    assert yellow.any() and white.any() and (band[0] == 0).all()
    text_rows = np.flatnonzero(yellow.any(axis=1))
    assert 10 <= text_rows[-1] - text_rows[0] + 1 <= 22, "banner text about 16 px high on a 512 px slice"


def test_band_text_wraps_on_a_narrow_slice() -> None:
    narrow = with_band(np.zeros((64, 64, 3), dtype=np.uint8), ["PE, central, images 11-16, p 0.97"])
    wide = with_band(np.zeros((64, 512, 3), dtype=np.uint8), ["PE, central, images 11-16, p 0.97"])
    assert narrow.shape[0] > wide.shape[0], "the lines wrapped into more rows"
    ink = (narrow[64:] > 0).any(axis=(0, 2))
    assert not ink[0] and not ink[-1], "no text cut at the edges"


def test_render_keeps_the_slice_and_adds_the_band() -> None:
    hu = np.zeros((96, 80), dtype=np.int16)
    out = render(hu, np.zeros((96, 80)), ["x"])
    assert out.shape[0] > 96 and out.shape[1:] == (80, 3)
    assert (out[:96] == window(hu, 100, 700)[..., None]).all()
