"""Which stack of a study to analyse: the ordered selection rules of ``study.rules`` (``pe_node.config.StudyConfig``).

Rules that require something drop the stacks that fail them, in the order given; the first rule a stack fails is
its reason. Rules that prefer something rank what is left, each breaking the ties of the one before; the order of
the series in the study (series number, then stack) breaks the last ties. ``choose`` returns the ranking and the
reasons; ``explain`` turns a stack's fate into the sentence ``pe-node status`` shows ("a 3.75 mm reconstruction;
series 3 (1.25 mm, 120 slices) was analysed").
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from pydicom.uid import UID

from pe_node.config import (
    MaxThicknessRule,
    PreferKernelRule,
    SelectionRule,
    SeriesConfig,
)
from pe_node.findings import MAX_DETAIL, NotAnalysed, NotAnalysedReason
from pe_node.pipeline.series import size_problem
from pe_node.pipeline.stacks import Stack
from pe_node.pipeline.suitability import SuitabilityRules, axial_check, slice_count_check, spacing_check

#: SOP classes the model reads: classic CT, Enhanced CT and Legacy Converted Enhanced CT images.
CT_IMAGE_CLASSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.2",
    "1.2.840.10008.5.1.4.1.1.2.1",
    "1.2.840.10008.5.1.4.1.1.2.2",
})
LOCALIZER_TYPES = frozenset({"LOCALIZER", "SCOUT", "TOPOGRAM", "SURVIEW", "SCANOGRAM"})
#: ImageType values of reformats and projections (classic CT's value 3, Enhanced CT's derived pixel contrast).
#: Enhanced CT's "VOLUME" (the image flavor of any volume acquisition) is not one of them.
REFORMAT_TYPES = frozenset({
    "MPR", "REFORMATTED", "CURVED", "CPR", "MIP", "MINIP", "MIN IP", "MAX IP", "MAXIP", "MAX_IP", "MIN_IP",
    "PROJECTION IMAGE", "VOLUME_RENDER", "VOLUME RENDERING", "3D", "SSD",
})


Preference = Callable[[Stack], tuple[float | int, ...]]
"""A prefer rule as a sort key of stacks: smaller is better."""


@dataclass(frozen=True)
class Choice:
    """The stacks left after the required rules, best first, and each dropped stack with why."""

    ranked: list[Stack]
    dropped: list[tuple[Stack, NotAnalysed]]
    preferences: list[tuple[str, Preference]] = field(default_factory=list)

    @property
    def best(self) -> Stack | None:
        return self.ranked[0] if self.ranked else None

    def why(self, stack: Stack) -> NotAnalysed | None:
        return next((reason for dropped, reason in self.dropped if dropped is stack), None)


def choose(stacks: Sequence[Stack], rules: Sequence[SelectionRule], series: SeriesConfig) -> Choice:
    """Apply ``rules`` in order to ``stacks`` (all the stacks of one study)."""
    remaining = sorted(stacks, key=_study_order)
    dropped: list[tuple[Stack, NotAnalysed]] = []
    preferences: list[tuple[str, Preference]] = []
    suitability = SuitabilityRules.of(series)
    for rule in rules:
        if rule.rule.startswith("prefer_"):
            preferences.append((rule.rule, _preference(rule)))
            continue
        kept = []
        for stack, reason in _required(rule, remaining, series, suitability):
            if reason is None:
                kept.append(stack)
            else:
                dropped.append((stack, reason))
        remaining = kept
    ranked = sorted(remaining, key=lambda s: tuple(key(s) for _, key in preferences))
    return Choice(ranked, dropped, preferences)


def explain(stack: Stack, choice: Choice, analysed: Sequence[Stack], failures: Mapping[Stack, NotAnalysed]) -> str:
    """Why ``stack`` was not analysed: its dropping rule, its failed check, or the better stack, and what was."""
    reason = choice.why(stack) or failures.get(stack)
    text = reason.detail if reason is not None else (_lost_to(stack, analysed[0], choice) if analysed else
                                                     "ranked lower")
    tail = f"{analysed[0].describe()} was analysed" if analysed else "no series of the study could be analysed"
    return f"{text}; {tail}"


def _study_order(stack: Stack) -> tuple[int, str, str]:
    return (stack.series_number if stack.series_number is not None else 1 << 30, stack.series_instance_uid,
            stack.key)


def _required(rule: SelectionRule, stacks: list[Stack], series: SeriesConfig, suitability: SuitabilityRules
              ) -> list[tuple[Stack, NotAnalysed | None]]:
    """Each stack with why ``rule`` drops it, or None when it passes."""
    if isinstance(rule, MaxThicknessRule):
        return _thickness(rule, stacks)
    if rule.rule == "contrast":
        named = next((s for s in stacks if s.contrast_agent), None)
        if named is None:  # no header says: the pixel check after loading decides
            return [(s, None) for s in stacks]
        return [(s, None if s.contrast_agent else NotAnalysed(
            NotAnalysedReason.NO_CONTRAST,
            f"no contrast (no ContrastBolusAgent, where {named.describe()} names {named.contrast_agent})"))
            for s in stacks]
    if rule.rule == "volume":
        return [(s, _volume(s, series, suitability)) for s in stacks]
    if rule.rule == "axial":
        return [(s, axial_check(s.orientation, suitability) if s.orientation else None) for s in stacks]
    if rule.rule == "min_slices":
        return [(s, slice_count_check(len(s.slices), suitability)) for s in stacks]
    kind = _KINDS[rule.rule]
    return [(s, NotAnalysed(NotAnalysedReason.NOT_CT_IMAGES, text) if (text := kind(s)) else None) for s in stacks]


def _image(stack: Stack) -> str | None:
    if stack.sop_class_uid in CT_IMAGE_CLASSES:
        return None
    name = UID(stack.sop_class_uid).name if stack.sop_class_uid else "no SOP class"
    return f"not a CT image ({name})"


def _not_localizer(stack: Stack) -> str | None:
    return f"a localizer ({_joined(stack.image_type)})" if LOCALIZER_TYPES.intersection(stack.image_type) else None


def _not_reformat(stack: Stack) -> str | None:
    return f"a reformat ({_joined(stack.image_type)})" if REFORMAT_TYPES.intersection(stack.image_type) else None


_KINDS: dict[str, Callable[[Stack], str | None]] = {
    "image": _image,
    "not_localizer": _not_localizer,
    "not_reformat": _not_reformat,
}


def _volume(stack: Stack, series: SeriesConfig, suitability: SuitabilityRules) -> NotAnalysed | None:
    """Full geometry, a size the node reads, and regular spacing: what makes the stack one volume."""
    if stack.problems:
        return NotAnalysed(NotAnalysedReason.UNREADABLE, f"not a volume: {'; '.join(stack.problems)}"[:MAX_DETAIL])
    too_large = size_problem(stack, series)
    if too_large is not None:
        return NotAnalysed(NotAnalysedReason.IMAGE_TOO_LARGE, too_large)
    positions = stack.positions()
    return spacing_check(positions, suitability) if positions is not None else None


def _thickness(rule: MaxThicknessRule, stacks: list[Stack]) -> list[tuple[Stack, NotAnalysed | None]]:
    """At most ``mm``; when no stack is that thin, the ones up to ``fallback_mm`` stay (the thinnest wins later)."""
    def thickness(stack: Stack) -> float:
        return stack.thickness or float("inf")

    limit = rule.mm if any(thickness(s) <= rule.mm for s in stacks) else rule.fallback_mm
    return [(s, None if thickness(s) <= limit else NotAnalysed(
        NotAnalysedReason.TOO_THICK, f"a {thickness(s):.3g} mm reconstruction, thicker than {limit:g} mm"))
        for s in stacks]


def _preference(rule: SelectionRule) -> Preference:
    """A sort key (smaller is better) for a prefer rule."""
    if rule.rule == "prefer_original":
        return lambda s: (0 if s.image_type[:1] == ("ORIGINAL",) else 1,)
    if rule.rule == "prefer_thinnest":
        return lambda s: (round(s.thickness or float("inf"), 2),)
    if rule.rule == "prefer_most_slices":
        return lambda s: (-len(s.slices),)
    assert isinstance(rule, PreferKernelRule)
    return lambda s: (kernel_class(s.kernel, rule),)


def kernel_class(kernel: str, rule: PreferKernelRule) -> int:
    """0 a soft-tissue/standard kernel, 1 unknown, 2 a lung/bone/sharp kernel (by ``rule``'s glob patterns)."""
    name = kernel.strip().upper()
    if not name:
        return 1
    if any(fnmatch.fnmatchcase(name, pattern.upper()) for pattern in rule.soft):
        return 0
    if any(fnmatch.fnmatchcase(name, pattern.upper()) for pattern in rule.sharp):
        return 2
    return 1


def _lost_to(stack: Stack, best: Stack, choice: Choice) -> str:
    """The first configured preference on which ``stack`` ranks below ``best``, in words."""
    for name, key in choice.preferences:
        if key(stack) > key(best):
            return _LOST[name](stack)
    return "ranked lower"


_LOST: dict[str, Callable[[Stack], str]] = {
    "prefer_original": lambda s: f"derived ({_joined(s.image_type[:3])})",
    "prefer_thinnest": lambda s: f"a {s.thickness:.3g} mm reconstruction" if s.thickness else "slice thickness unknown",
    "prefer_most_slices": lambda s: f"fewer slices ({len(s.slices)})",
    "prefer_kernel": lambda s: f"kernel {s.kernel or 'unknown'}",
}


def _joined(values: Sequence[str]) -> str:
    """A multi-valued attribute as DICOM writes it (backslashes between the values)."""
    return "\\".join(values)
