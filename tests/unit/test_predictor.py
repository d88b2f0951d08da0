"""The Predictor: a whole series in, consistent findings, attention, CAMs and timings out; the fast path's accuracy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from torch import nn

from pe_node.findings import EXAM_LABELS
from pe_node.located import peak_slices
from pe_node.model import (
    Predictor,
    PreprocessConfig,
    check,
    cpu_has_fast_bf16,
    plan_crop,
    preprocess_slices,
)
from pe_node.model.checkpoint import file_sha256
from pe_node.model.predictor import cam_indices
from pe_node.pipeline.series import CTSeries, SliceRef, load_series
from tests.dicom_factory import phantom_volume
from tests.tiny_models import TINY_PREPROCESS, tiny_model


def synthetic_series(n_slices: int, size: int = 64) -> CTSeries:
    hu = phantom_volume(n_slices=n_slices, size=size)
    ct_image = "1.2.840.10008.5.1.4.1.1.2"
    slices = [SliceRef(f"1.2.3.{k}", ct_image, Path(f"{k}.dcm"), float(k), k) for k in range(n_slices)]
    return CTSeries("1.2.3", "1.2.3.4", slices, hu, (0.7, 0.7), 1.0, (1, 0, 0, 0, 1, 0), pydicom.Dataset())


def with_random_batchnorm(seed: int = 0) -> nn.Module:
    model = tiny_model(seed)
    generator = torch.Generator().manual_seed(seed)
    for sub in model.modules():
        if isinstance(sub, nn.BatchNorm2d):
            sub.running_mean.copy_(torch.randn(sub.num_features, generator=generator) * 0.1)
            sub.running_var.copy_(torch.rand(sub.num_features, generator=generator) + 0.5)
    return model


def test_prediction_has_every_output_in_slice_order(tiny_checkpoint: Path, ct_series_dir: Path) -> None:
    series = load_series(ct_series_dir)
    prediction = Predictor.from_checkpoint(tiny_checkpoint, device="cpu").predict(series, cam_slices=2)
    assert prediction.series_instance_uid == series.series_instance_uid
    assert prediction.sop_instance_uids == series.sop_instance_uids
    assert list(prediction.exam) == list(EXAM_LABELS)
    assert prediction.image.shape == (40,) and prediction.image.dtype == np.float32
    assert prediction.attention.shape == (40,)
    assert prediction.attention.sum() == pytest.approx(1.0, abs=1e-5)
    assert np.isfinite(prediction.image).all() and all(np.isfinite(list(prediction.exam.values())))
    assert set(prediction.timings) == {"preprocess", "stage1", "stage2", "cam", "total"}
    assert prediction.timings["total"] >= prediction.timings["stage1"] > 0
    assert prediction.model["sha256"] == file_sha256(tiny_checkpoint)
    assert prediction.model["name"] == "pe_cnn_lstm" and prediction.model["checkpoint"] == str(tiny_checkpoint)


def test_exam_probabilities_pass_the_consistency_rules(tiny_checkpoint: Path) -> None:
    predictor = Predictor.from_checkpoint(tiny_checkpoint, device="cpu")
    for seed in range(4):
        torch.manual_seed(seed)
        predictor.model.sequence.exam_head.bias.data.normal_(0, 3)  # push labels to both sides of 0.5
        prediction = predictor.predict(synthetic_series(8))
        assert check(prediction.exam, prediction.image) == []


def test_cams_come_for_the_top_slices_at_slice_size(tiny_checkpoint: Path) -> None:
    series = synthetic_series(12, size=80)
    prediction = Predictor.from_checkpoint(tiny_checkpoint, device="cpu").predict(series, cam_slices=3)
    score = prediction.image * prediction.attention
    assert sorted(prediction.cams) == sorted(np.argsort(-score, kind="stable")[:3].tolist())
    for cam in prediction.cams.values():
        assert cam.shape == (80, 80) and cam.dtype == np.float32
        assert cam.min() >= 0.0 and cam.max() <= 1.0


def test_cam_slices_are_the_key_slices_and_the_peak_of_every_finding() -> None:
    image = np.array([0.1, 0.7, 0.9, 0.6, 0.1, 0.1, 0.2, 0.55, 0.8, 0.1])
    attention = np.array([0.3, 0.05, 0.05, 0.2, 0.0, 0.0, 0.0, 0.05, 0.05, 0.05])
    assert cam_indices(2, image, attention) == [3, 2, 8], "key slices 3 and 2, then the second finding's peak"
    assert cam_indices(0, image, attention) == [], "no maps asked for, none made"
    assert cam_indices([5, 1], image, attention) == [5, 1]


def test_predict_maps_the_peak_slice_of_each_finding(tiny_checkpoint: Path) -> None:
    predictor = Predictor.from_checkpoint(tiny_checkpoint, device="cpu")
    predictor.model.sequence.image_head.bias.data.fill_(4.0)  # every slice positive: one finding
    prediction = predictor.predict(synthetic_series(10), cam_slices=1)
    peaks = peak_slices(prediction.image)
    assert len(peaks) == 1 and set(peaks) <= set(prediction.cams) and 1 <= len(prediction.cams) <= 2


def test_cams_for_chosen_slices_through_a_body_crop() -> None:
    model = tiny_model()
    predictor = Predictor(model, PreprocessConfig(size=64, crop="body"), device="cpu")
    prediction = predictor.predict(synthetic_series(6, size=96), cam_slices=[4, 1])
    assert sorted(prediction.cams) == [1, 4]
    assert all(cam.shape == (96, 96) for cam in prediction.cams.values())


def test_cam_slices_outside_the_series_are_refused(tiny_checkpoint: Path) -> None:
    with pytest.raises(ValueError, match=r"cam_slices \[7\]: outside the series' 5 slices"):
        Predictor.from_checkpoint(tiny_checkpoint, device="cpu").predict(synthetic_series(5), cam_slices=[0, 7])


def test_batches_do_not_change_the_result(tiny_checkpoint: Path) -> None:
    series = synthetic_series(10)
    one = Predictor.from_checkpoint(tiny_checkpoint, device="cpu", batch_size=3).predict(series)
    other = Predictor.from_checkpoint(tiny_checkpoint, device="cpu", batch_size=10).predict(series)
    assert np.allclose(one.image, other.image, atol=1e-5)
    assert np.allclose(one.attention, other.attention, atol=1e-6)


def test_eval_outputs_are_deterministic(tiny_checkpoint: Path) -> None:
    predictor = Predictor.from_checkpoint(tiny_checkpoint, device="cpu")
    series = synthetic_series(9)
    first, second = predictor.predict(series, cam_slices=1), predictor.predict(series, cam_slices=1)
    assert np.array_equal(first.image, second.image) and first.exam == second.exam
    assert np.array_equal(first.attention, second.attention)
    assert all(np.array_equal(first.cams[k], second.cams[k]) for k in first.cams)


def test_fast_fp32_path_matches_the_plain_path() -> None:
    """The fp32 fast path (ONNX Runtime where installed, else channels_last + folded batch norm): the same numbers
    as the plain path up to float rounding (1e-4)."""
    model = with_random_batchnorm()
    hu = phantom_volume(n_slices=6, size=64)
    plain = Predictor(model, TINY_PREPROCESS, device="cpu", fast=False)
    fast = Predictor(model, TINY_PREPROCESS, device="cpu", fast=True, precision="fp32")
    assert plain.engine == "torch"
    assert torch.allclose(fast.embed(hu), plain.embed(hu), atol=1e-4, rtol=1e-4)


def test_fp32_fast_path_on_the_cpu_runs_in_onnx_runtime_and_predicts_alike() -> None:
    pytest.importorskip("onnxruntime")
    model = with_random_batchnorm()
    series = synthetic_series(8)
    fast = Predictor(model, TINY_PREPROCESS, device="cpu", fast=True, precision="fp32")
    plain = Predictor(model, TINY_PREPROCESS, device="cpu", fast=False)
    assert fast.engine == "onnxruntime" and fast.model_info()["engine"] == "onnxruntime"
    a, b = fast.predict(series, cam_slices=2), plain.predict(series, cam_slices=2)
    assert np.abs(a.image - b.image).max() < 1e-4
    assert max(abs(a.exam[k] - b.exam[k]) for k in EXAM_LABELS) < 1e-4
    assert set(a.cams) == set(b.cams)


def test_bf16_fast_path_matches_fp32_within_tolerance() -> None:
    """bf16 autocast + channels_last vs plain fp32 on the same inputs.

    Tolerance: slice embeddings have cosine similarity > 0.99, and image and exam probabilities differ by < 0.05.
    """
    model = with_random_batchnorm()
    series = synthetic_series(4)
    preprocess = PreprocessConfig(size=32)  # bf16 is emulated, hence slow, on CPUs without native support
    plain = Predictor(model, preprocess, device="cpu", fast=False)
    fast = Predictor(model, preprocess, device="cpu", fast=True, precision="bf16")
    assert fast.precision == "bf16" and plain.precision == "fp32"
    cosine = torch.cosine_similarity(fast.embed(series.hu), plain.embed(series.hu), dim=1)
    assert float(cosine.min()) > 0.99
    a, b = fast.predict(series), plain.predict(series)
    assert np.abs(a.image - b.image).max() < 0.05
    assert max(abs(a.exam[k] - b.exam[k]) for k in EXAM_LABELS) < 0.05


def test_auto_precision_uses_bf16_on_the_cpu_only_where_it_is_native() -> None:
    predictor = Predictor(tiny_model(), TINY_PREPROCESS, device="cpu")
    assert predictor.precision == ("bf16" if cpu_has_fast_bf16() else "fp32")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "batch_size 0"),
        ({"precision": "int8"}, "precision 'int8'"),
        ({"precision": "bf16", "fast": False}, "fp32 only"),
        ({"precision": "fp16", "device": "cpu"}, "only on CUDA"),
        ({"device": "tpu"}, "device 'tpu'"),
    ],
)
def test_bad_options_are_refused_by_name(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Predictor(tiny_model(), TINY_PREPROCESS, **{"device": "cpu", **kwargs})


def test_embeddings_are_the_encoder_on_the_shared_preprocessing_and_can_train_stage2() -> None:
    model = tiny_model()
    hu = phantom_volume(n_slices=5, size=96)
    preprocess = PreprocessConfig(size=64, crop="body")
    embeddings = Predictor(model, preprocess, device="cpu", fast=False, batch_size=2).embed(hu)
    with torch.no_grad():
        expected = model.encoder.embed(preprocess_slices(hu, preprocess, box=plan_crop(hu, preprocess)))
    assert torch.allclose(embeddings, expected, atol=1e-5)
    assert not embeddings.is_inference()
    model.sequence.train()
    model.sequence(embeddings[None]).exam.sum().backward()
    assert model.sequence.exam_head.weight.grad is not None


def test_embeddings_of_preprocessed_input_equal_those_of_the_series() -> None:
    model = with_random_batchnorm()
    hu = phantom_volume(n_slices=7, size=96)
    preprocess = PreprocessConfig(size=64, crop="body")
    predictor = Predictor(model, preprocess, device="cpu", batch_size=3)
    images = preprocess_slices(hu, preprocess, box=plan_crop(hu, preprocess))
    assert torch.equal(predictor.embed_inputs(images), predictor.embed(hu))  # the same engine, bit for bit
    with pytest.raises(ValueError, match=r"\[n, 3, S, S\]"):
        predictor.embed_inputs(images[:, :1])
