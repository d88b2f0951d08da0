"""Both stages of the model: shapes and finiteness, padding invariance, attention, gradients, determinism."""

from __future__ import annotations

import pytest
import torch

from pe_node.findings import EXAM_LABELS
from pe_node.model import (
    SequenceModel,
    create_model,
    list_models,
    model_config,
    rsna_loss,
    slice_loss,
)
from tests.tiny_models import TINY_MODEL, tiny_model

FEATURES = 24


def tiny_sequence(pooling: str = "attention", seed: int = 0) -> SequenceModel:
    torch.manual_seed(seed)
    return SequenceModel(FEATURES, lstm_hidden=8, dense_dim=12, attention_dim=6, pooling=pooling).eval()


@pytest.mark.parametrize("length", [1, 60, 1100])
def test_stage2_shapes_and_no_nan_for_series_of_1_60_1100_slices(length: int) -> None:
    model = tiny_sequence()
    with torch.inference_mode():
        out = model(torch.randn(2, length, FEATURES))
    assert out.image.shape == (2, length)
    assert out.exam.shape == (2, len(EXAM_LABELS))
    assert out.attention.shape == (2, length)
    assert out.study.shape == (2, 12) and out.slices.shape == (2, length, 12)
    for tensor in (out.image, out.exam, out.attention, out.study):
        assert torch.isfinite(tensor).all()


@pytest.mark.parametrize("length", [1, 60])
def test_both_stages_shapes_and_no_nan_on_images(length: int) -> None:
    model = tiny_model()
    with torch.inference_mode():
        out = model(torch.randn(1, length, 3, 32, 32))
    assert out.image.shape == (1, length) and out.exam.shape == (1, 9)
    assert torch.isfinite(out.image).all() and torch.isfinite(out.exam).all()


@pytest.mark.parametrize("pooling", ["attention", "mean", "max"])
def test_padding_changes_no_result(pooling: str) -> None:
    model = tiny_sequence(pooling)
    short, long = torch.randn(1, 7, FEATURES), torch.randn(1, 19, FEATURES)
    padded = torch.zeros(2, 19, FEATURES)
    padded[0, :7], padded[1] = short[0], long[0]
    padded[0, 7:] = 1e3  # padding content must not matter either
    mask = torch.zeros(2, 19, dtype=torch.bool)
    mask[0, :7], mask[1] = True, True
    with torch.inference_mode():
        alone = model(short)
        batched = model(padded, mask)
    assert torch.allclose(batched.image[0, :7], alone.image[0], atol=1e-5)
    assert torch.allclose(batched.exam[0], alone.exam[0], atol=1e-5)
    assert torch.allclose(batched.attention[0, :7], alone.attention[0], atol=1e-6)
    assert torch.allclose(batched.study[0], alone.study[0], atol=1e-5)
    assert torch.all(batched.attention[0, 7:] == 0) and torch.all(batched.image[0, 7:] == 0)
    assert torch.allclose(batched.exam[1], model(long).exam[0], atol=1e-5)


def test_padding_changes_no_result_through_both_stages() -> None:
    model = tiny_model()
    images = torch.randn(1, 5, 3, 32, 32)
    padded = torch.cat([images, torch.randn(1, 3, 3, 32, 32)], dim=1)
    mask = torch.tensor([[True] * 5 + [False] * 3])
    with torch.inference_mode():
        assert torch.allclose(model(padded, mask).exam, model(images).exam, atol=1e-5)


@pytest.mark.parametrize("pooling", ["attention", "mean", "max"])
def test_attention_weights_sum_to_one_over_real_slices(pooling: str) -> None:
    model = tiny_sequence(pooling)
    mask = torch.zeros(3, 10, dtype=torch.bool)
    for row, length in enumerate((10, 4, 1)):
        mask[row, :length] = True
    with torch.inference_mode():
        attention = model(torch.randn(3, 10, FEATURES), mask).attention
    assert torch.allclose(attention.sum(dim=1), torch.ones(3), atol=1e-6)
    assert torch.all(attention >= 0) and torch.all(attention[~mask] == 0)


def test_attention_pooling_is_the_weighted_sum_of_slice_features() -> None:
    model = tiny_sequence()
    with torch.inference_mode():
        out = model(torch.randn(2, 9, FEATURES))
        scores = model.attention.w(torch.tanh(model.attention.V(out.slices))).squeeze(-1)
    assert torch.allclose(out.attention, torch.softmax(scores, dim=1), atol=1e-6)
    assert torch.allclose(out.study, (out.attention[..., None] * out.slices).sum(dim=1), atol=1e-6)


def test_stage2_gradients_reach_every_trainable_parameter() -> None:
    model = tiny_sequence().train()
    mask = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    out = model(torch.randn(2, 6, FEATURES), mask)
    targets = torch.zeros(2, 6)
    targets[0, 2] = 1.0
    exam_targets = torch.tensor([[0.0, 0, 0, 0, 1, 1, 0, 0, 1], [1.0, 0, 0, 0, 0, 0, 0, 0, 0]])
    rsna_loss(out.exam, exam_targets, out.image, targets, mask).backward()
    starved = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert starved == []


def test_stage1_gradients_reach_every_trainable_parameter() -> None:
    encoder = tiny_model().encoder.train()
    out = encoder(torch.randn(4, 3, 32, 32))
    exam_targets = torch.tensor([[0.0, 0, 1, 0, 1, 1, 0, 0, 1]]).expand(4, 9)
    slice_loss(out.image, out.exam, torch.tensor([0.0, 1, 1, 0]), exam_targets).backward()
    starved = [n for n, p in encoder.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert starved == []


def test_eval_mode_outputs_are_deterministic() -> None:
    model = tiny_model(dropout=0.3)  # dropout must be off in eval mode
    images = torch.randn(1, 6, 3, 32, 32)
    with torch.inference_mode():
        first, second = model(images), model(images)
    assert torch.equal(first.image, second.image)
    assert torch.equal(first.exam, second.exam)
    assert torch.equal(first.attention, second.attention)


def test_mask_with_padding_before_real_slices_is_refused() -> None:
    with pytest.raises(ValueError, match="real slices must come first"):
        tiny_sequence()(torch.randn(1, 4, FEATURES), torch.tensor([[False, True, True, True]]))


def test_mask_with_an_empty_series_is_refused() -> None:
    with pytest.raises(ValueError, match=r"series \[1\] have no real slice"):
        tiny_sequence()(torch.randn(2, 3, FEATURES), torch.tensor([[True, True, False], [False, False, False]]))


def test_features_of_the_wrong_width_are_refused() -> None:
    with pytest.raises(ValueError, match=f"features \\[B, T, {FEATURES}\\]"):
        tiny_sequence()(torch.randn(1, 4, FEATURES + 1))


def test_registry_builds_the_paper_model_and_the_no_attention_baseline() -> None:
    assert {"pe_cnn_lstm", "pe_cnn_lstm_mean"} <= set(list_models())
    assert model_config("pe_cnn_lstm").backbone == "efficientnet_b0"
    baseline = create_model("pe_cnn_lstm_mean", **TINY_MODEL)
    assert baseline.sequence.attention is None and baseline.config.pooling == "mean"


@pytest.mark.parametrize(
    ("name", "overrides", "message"),
    [
        ("pe_transformer", {}, "unknown model 'pe_transformer'"),
        ("pe_cnn_lstm", {"lstm_size": 3}, "unknown key.*lstm_size"),
        ("pe_cnn_lstm", {"pooling": "sum"}, "pooling='sum'"),
        ("pe_cnn_lstm", {"dense_dim": 0}, "dense_dim=0"),
        ("pe_cnn_lstm", {"backbone": "no_such_net"}, "backbone 'no_such_net'"),
    ],
)
def test_bad_model_requests_are_refused_by_name(name: str, overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        create_model(name, **overrides)
