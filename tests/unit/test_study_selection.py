"""Stacks and selection rules: which series of a whole study is analysed, why the others are not, and the same
volume read from classic slices and from one Enhanced CT instance."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from pe_node.config import Config, PreferKernelRule, SeriesConfig, StudyConfig, load_config
from pe_node.findings import NotAnalysed, NotAnalysedReason
from pe_node.pipeline.selection import choose, explain, kernel_class
from pe_node.pipeline.series import ImageTooLarge, SeriesError, load_series, load_stack
from pe_node.pipeline.stacks import Stack, read_image, stacks_of
from tests.dicom_factory import make_ct_dataset, phantom_volume
from tests.study_factory import write_enhanced, write_study

RULES = Config().study.rules
LIMITS = SeriesConfig(min_instances=10)


@pytest.fixture(scope="module")
def volume() -> np.ndarray:
    return phantom_volume(n_slices=48, size=32, seed=5)


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory, volume: np.ndarray):
    return write_study(tmp_path_factory.mktemp("study"), volume)


def stacks(files: list[Path]) -> list[Stack]:
    return stacks_of([image for image in map(read_image, files) if image is not None])


def study_stacks(study, names=None) -> dict[str, list[Stack]]:
    return {name: stacks(files) for name, files in study.series.items() if names is None or name in names}


def by_uid(study, choice) -> dict[str, str]:
    names = {uid: name for name, uid in study.series_uids.items()}
    return {names[stack.series_instance_uid]: reason.detail for stack, reason in choice.dropped}


def test_the_thin_cta_is_chosen_and_every_other_series_has_its_reason(study) -> None:
    found = study_stacks(study)
    choice = choose([s for group in found.values() for s in group], RULES, LIMITS)
    assert [s.series_instance_uid for s in choice.ranked] == [study.series_uids["cta"]]
    reasons = by_uid(study, choice)
    assert reasons["topogram"] == "a localizer (ORIGINAL\\PRIMARY\\LOCALIZER)"
    assert {reason.reason for _, reason in choice.dropped} == {
        NotAnalysedReason.NOT_CT_IMAGES, NotAnalysedReason.NO_CONTRAST, NotAnalysedReason.TOO_THICK}
    assert reasons["precontrast"].startswith("no contrast (no ContrastBolusAgent, where series 3 (1.25 mm, 48 slices)")
    assert reasons["cta_thick"] == "a 3.75 mm reconstruction, thicker than 3 mm"
    assert reasons["mpr"] == "a reformat (DERIVED\\SECONDARY\\REFORMATTED)"
    assert reasons["dose"] == "not a CT image (X-Ray Radiation Dose SR Storage)"
    thick = found["cta_thick"][0]
    assert explain(thick, choice, choice.ranked, {}) == (
        "a 3.75 mm reconstruction, thicker than 3 mm; series 3 (1.25 mm, 48 slices) was analysed")


def test_without_a_thin_series_the_thinnest_up_to_the_fallback_is_chosen(study) -> None:
    found = study_stacks(study, ("precontrast", "cta_thick", "mpr"))
    choice = choose([s for group in found.values() for s in group], RULES, LIMITS)
    assert [s.series_instance_uid for s in choice.ranked] == [study.series_uids["cta_thick"]]


def test_the_rules_are_the_configured_ones_in_their_order(study, tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("study:\n  rules:\n    - {rule: image}\n    - {rule: not_localizer}\n"
                    "    - {rule: prefer_most_slices}\n")
    rules = load_config(path, environ={}).study.rules
    found = study_stacks(study, ("precontrast", "cta", "cta_thick", "mpr"))
    choice = choose([s for group in found.values() for s in group], rules, LIMITS)
    assert [s.series_instance_uid for s in choice.ranked][:2] == [study.series_uids["cta"], study.series_uids["mpr"]]
    thick = found["cta_thick"][0]
    assert explain(thick, choice, choice.ranked[:1], {}).startswith("fewer slices (16);"), "the rule it lost on"
    with pytest.raises(ValueError, match=r"rules\.0\.max_thickness\n.*fallback_mm \(2\.0\) must be at least mm"):
        StudyConfig.model_validate({"rules": [{"rule": "max_thickness", "mm": 3, "fallback_mm": 2}]})


def test_a_soft_tissue_kernel_wins_over_a_lung_kernel(tmp_path: Path, volume: np.ndarray) -> None:
    lung = write_study(tmp_path / "a", volume, series=("cta",))
    soft = write_study(tmp_path / "b", volume, series=("cta",), study_uid=lung.study_instance_uid)
    for path in lung.series["cta"]:
        ds = pydicom.dcmread(path)
        ds.ConvolutionKernel, ds.SeriesNumber = "LUNG", 1
        ds.save_as(path)
    candidates = stacks(lung.series["cta"]) + stacks(soft.series["cta"])
    choice = choose(candidates, RULES, LIMITS)
    assert choice.best is not None and choice.best.series_instance_uid == soft.series_uids["cta"]
    assert explain(candidates[0], choice, choice.ranked, {}).startswith("kernel LUNG;")
    rule = PreferKernelRule(rule="prefer_kernel")
    assert [kernel_class(k, rule) for k in ("B30f", "STANDARD", "FC13", "B70f", "LUNG", "XYZ", "")] == [
        0, 0, 0, 2, 2, 1, 1]


def test_two_reconstructions_in_one_series_are_two_stacks_never_interleaved(tmp_path: Path,
                                                                             volume: np.ndarray) -> None:
    series_uid, study_uid = "1.2.826.0.1.3680043.10.1.1", "1.2.826.0.1.3680043.10.1.2"
    files = []
    for thickness, kernel in ((1.25, "STANDARD"), (1.25, "LUNG")):
        for k, hu in enumerate(volume):
            ds = make_ct_dataset(hu if kernel == "STANDARD" else hu // 2, position=(0.0, 0.0, k * 1.25),
                                 study_uid=study_uid, series_uid=series_uid, instance_number=len(files) + 1,
                                 slice_thickness=thickness)
            ds.ConvolutionKernel = kernel
            path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
    found = stacks(files)
    assert len(found) == 2 and {len(s.slices) for s in found} == {48}
    assert {s.kernel for s in found} == {"STANDARD", "LUNG"} and all(not s.problems for s in found)
    choice = choose(found, RULES, LIMITS)
    assert choice.best is not None and choice.best.kernel == "STANDARD"
    assert np.array_equal(load_stack(choice.best, LIMITS).hu, volume)
    with pytest.raises(SeriesError, match="holds 2 stacks, not one volume"):
        load_series(tmp_path)


def test_two_passes_over_the_same_range_split_by_acquisition(tmp_path: Path, volume: np.ndarray) -> None:
    files = []
    for acquisition in (1, 2):
        for k, hu in enumerate(volume[:20]):
            ds = make_ct_dataset(hu, position=(0.0, 0.0, k * 1.25), study_uid="1.2.3", series_uid="1.2.3.4",
                                 instance_number=len(files) + 1)
            ds.AcquisitionNumber = acquisition
            path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
    found = stacks(files)
    assert [len(s.slices) for s in found] == [20, 20] and all(not s.problems for s in found)


def test_a_sequential_scan_numbering_each_acquisition_stays_one_stack(tmp_path: Path, volume: np.ndarray) -> None:
    files = []
    for k, hu in enumerate(volume[:24]):
        ds = make_ct_dataset(hu, position=(0.0, 0.0, k * 1.25), study_uid="1.2.3", series_uid="1.2.3.5",
                             instance_number=k + 1)
        ds.AcquisitionNumber = k // 4 + 1  # one rotation covers four slices
        path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    [stack] = stacks(files)
    assert len(stack.slices) == 24 and not stack.problems


def test_enhanced_ct_loads_the_same_volume_as_the_classic_series(tmp_path: Path, study, volume: np.ndarray) -> None:
    path = write_enhanced(tmp_path / "enhanced.dcm", volume, study_uid=study.study_instance_uid,
                          series_uid="1.2.826.0.1.3680043.10.9.9")
    [enhanced] = stacks([path])
    assert enhanced.multiframe and not enhanced.problems and enhanced.contrast_agent == "Omnipaque 350"
    multi = load_stack(enhanced, LIMITS)
    classic = load_series(study.series["cta"])
    assert np.array_equal(multi.hu, classic.hu)
    assert [s.position for s in multi.slices] == pytest.approx([s.position for s in classic.slices])
    assert [s.frame for s in multi.slices] == list(range(48, 0, -1))  # stored reversed, read by position
    assert multi.pixel_spacing == classic.pixel_spacing and multi.slice_spacing == pytest.approx(1.25)
    assert "PerFrameFunctionalGroupsSequence" not in multi.header
    assert list(multi.header.ImagePositionPatient) == pytest.approx(list(classic.header.ImagePositionPatient))
    choice = choose([enhanced, *stacks(study.series["cta_thick"])], RULES, LIMITS)
    assert choice.best is enhanced


def test_enhanced_ct_without_frame_positions_is_not_a_volume(tmp_path: Path, volume: np.ndarray) -> None:
    path = write_enhanced(tmp_path / "e.dcm", volume, study_uid="1.2.3", series_uid="1.2.3.7", positions=False)
    [stack] = stacks([path])
    choice = choose([stack], RULES, LIMITS)
    assert choice.ranked == []
    assert choice.dropped[0][1].reason is NotAnalysedReason.UNREADABLE
    assert choice.dropped[0][1].detail.startswith(
        "not a volume: e.dcm frame 1: missing or malformed ImagePositionPatient")


def test_frames_all_at_one_position_are_not_a_volume(tmp_path: Path, volume: np.ndarray) -> None:
    path = write_enhanced(tmp_path / "cine.dcm", volume, study_uid="1.2.3", series_uid="1.2.3.8",
                          frame_order=[0] * len(volume))
    [stack] = stacks([path])
    assert "48 frames at 1 positions: not one volume" in "; ".join(stack.problems)
    assert choose([stack], RULES, LIMITS).ranked == []


def test_a_huge_matrix_is_refused_before_any_pixel_is_allocated(tmp_path: Path) -> None:
    ds = make_ct_dataset(np.zeros((4, 4), dtype=np.int16), position=(0.0, 0.0, 0.0), study_uid="1.2.3",
                         series_uid="1.2.3.9")
    ds.Rows = ds.Columns = 65535  # tiny pixel data claiming 4 gigapixels
    path = tmp_path / "huge.dcm"
    ds.save_as(path, enforce_file_format=True)
    [stack] = stacks([path])
    choice = choose([stack], RULES, SeriesConfig(min_instances=1))
    assert choice.dropped[0][1] == NotAnalysed(NotAnalysedReason.IMAGE_TOO_LARGE,
                                               "image too large: 65535 x 65535 pixels (series.max_matrix 2048)")
    with pytest.raises(ImageTooLarge, match="65535 x 65535"):
        load_stack(stack, SeriesConfig(min_instances=1))
    many = SeriesConfig(min_instances=1, max_megavoxels=0.001)
    small = stacks([tmp_path / "huge.dcm"])[0]
    small.slices = [s for s in small.slices]
    with pytest.raises(ImageTooLarge, match="megavoxels"):
        load_stack(small, many.model_copy(update={"max_matrix": 65535}))


def test_enhanced_ct_keeps_padding_below_the_rescale_intercept(tmp_path: Path, volume: np.ndarray) -> None:
    padded = volume.copy()
    padded[:, :3, :3] = -2048  # scanners pad outside the reconstructed circle with -2048 HU or less
    path = write_enhanced(tmp_path / "padded.dcm", padded, study_uid="1.2.3", series_uid="1.2.3.10")
    [stack] = stacks([path])
    assert np.array_equal(load_stack(stack, LIMITS).hu, padded)


def test_a_deflated_header_is_read_without_inflating_what_follows_it(tmp_path: Path) -> None:
    import tracemalloc

    from pydicom.uid import DeflatedExplicitVRLittleEndian

    from pe_node.pipeline.stacks import read_header

    ds = make_ct_dataset(np.full((2048, 2048), -1000, dtype=np.int16), position=(0.0, 0.0, 0.0), study_uid="1.2.3",
                         series_uid="1.2.3.11")
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    plain = tmp_path / "plain.dcm"
    ds.save_as(plain, enforce_file_format=True)
    tracemalloc.start()
    header = read_header(plain)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert header.SOPInstanceUID == ds.SOPInstanceUID and header.Rows == 2048 and "PixelData" not in header
    assert peak < 4 << 20, f"reading the header took {peak >> 20} MB: the 8 MB of pixel data were inflated"
    ds.add_new(0x00091010, "OB", bytes(80 << 20))  # a private blob of 80 MB before the pixel data
    bomb = tmp_path / "bomb.dcm"
    ds.save_as(bomb, enforce_file_format=True)
    with pytest.raises(ValueError, match="header is over 64 MB"):
        read_header(bomb)
