"""The evaluation's markdown summary: the numbers of ``metrics.json`` as tables, the figures, and what they mean.

The text about phantoms is included when the evaluated data are the project's synthetic phantoms: numbers on
phantoms say that the pipeline works, not how the model would do on patients.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pe_node.findings import EXAM_LABELS, IMAGE_LABEL

PHANTOM_CAVEATS = """\
## What phantoms cannot tell about real data

These studies are synthetic CTPA phantoms made by `pe-train phantoms`, scored by a model trained on phantoms. The
numbers show what the pipeline learns from phantoms; they say nothing about patients:

- **Two generators, not a hospital.** The training family's held-out phantoms share the model's generator; the
  independent family was built another way, which is the nearest these numbers come to a domain shift. Real data
  vary by scanner, kernel, dose, slice thickness, bolus timing, body habitus and disease far more than two phantom
  constructions differ; the paper's own model scored a study PE AUC of 0.82 on RSPECT validation studies and 0.95 on
  another hospital's test set: the number depends on the data as much as on the model.
- **Idealised emboli.** Phantom clots are clean low-attenuation defects (20-70 HU) in well-defined tubes. Real
  emboli are partial, in-plane, beside mixing artefacts, lymph nodes, partial-volume effects and streaks from dense
  contrast in the superior vena cava, and radiologists disagree on small ones.
- **Labels are exact.** Phantom labels come from what was drawn; RSPECT's come from readers, with their errors and
  disagreements.
- **Few studies.** A test set of tens of studies gives AUCs with wide confidence intervals (a few studies decide
  each rare label), and rare labels (chronic, acute-and-chronic, indeterminate) may be absent.
- **RV/LV and chronicity** are drawn from simple rules (a heart with a ratio, narrowed arteries); their AUCs here do
  not transfer.

Real use means training on the RSNA-STR RSPECT data set with the same commands and evaluating on data from other
sites. These weights are for demonstration only and not for clinical use.
"""


def _number(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _interval(bounds: list[float] | None, digits: int = 3, signed: bool = False) -> str:
    if bounds is None:
        return "n/a"
    sign = "+" if signed else ""
    return f"{bounds[0]:{sign}.{digits}f} to {bounds[1]:{sign}.{digits}f}"


def _signed(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:+.{digits}f}"


def _bootstrap_section(metrics: dict[str, Any]) -> list[str]:
    """How sure the numbers are: the full model against each baseline on the same bootstrap resamples."""
    boot = metrics.get("bootstrap")
    if not boot or not boot["full_against"]:
        return []
    level = round(boot["level"] * 100)
    lines = [
        "## The full model against the baselines",
        "",
        f"Paired over {boot['resamples']} bootstrap resamples of the studies (positive studies drawn from the "
        f"positives, the others from the others; the same resamples for every model), {level} % intervals:",
        "",
        f"| baseline | study PE AUC, full minus baseline | {level} % CI | resamples with the full model ahead "
        f"| RSNA log loss, full minus baseline | {level} % CI |",
        "|---|---|---|---|---|---|",
    ]
    for name, result in boot["full_against"].items():
        ahead = "n/a" if result["share_full_ahead"] is None else f"{result['share_full_ahead']:.0%}"
        lines.append(
            f"| {metrics['models'][name]['title']} | {_signed(result['study_pe_auc_difference'])} "
            f"| {_interval(result['study_pe_auc_difference_ci'], signed=True)} | {ahead} "
            f"| {_signed(result['rsna_log_loss_difference'], 4)} "
            f"| {_interval(result['rsna_log_loss_difference_ci'], 4, signed=True)} |"
        )
    lines += ["", "An interval that holds 0 means that this test set does not tell the two models apart.", ""]
    return lines


def _reading_section(metrics: dict[str, Any]) -> list[str]:
    """What pe-node's reports would say of the studies: readings per kind of study, sensitivity, specificity."""
    intervals = metrics.get("bootstrap", {}).get("models", {})
    lines = [
        "## What pe-node would report",
        "",
        "pe-node's report reads an exam *present* when its highest image probability is above 0.5 (the RSNA rule), "
        "*absent* when `negative_exam_for_pe` is above 0.5 and `indeterminate` is not, and *undetermined* otherwise, "
        "and gives the PE probability of `pe_node.reporting.outcome.exam_probability`. Read so:",
        "",
        "| model | positive read present (sensitivity) | 95 % CI | negative read absent (specificity) | 95 % CI "
        "| negative read present | read undetermined: negative / positive / indeterminate "
        "| AUC of the reported PE probability | 95 % CI |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, result in metrics["models"].items():
        reading, bounds = result["node_reading"], intervals.get(name, {})
        counts = reading["readings"]
        kinds = ("negative", "positive", "indeterminate")
        totals = {kind: sum(counts[kind].values()) for kind in kinds}
        undetermined = " / ".join(str(counts[kind]["undetermined"]) for kind in kinds)
        lines.append(
            f"| {result['title']} | {_number(reading['sensitivity'])} | {_interval(bounds.get('sensitivity'))} "
            f"| {_number(reading['specificity'])} | {_interval(bounds.get('specificity'))} "
            f"| {counts['negative']['present']} of {totals['negative']} "
            f"| {undetermined} "
            f"| {_number(reading['reported_pe_auc'])} | {_interval(bounds.get('reported_pe_auc'))} |"
        )
    return lines + [""]


KIND_TITLES = {"acute": "acute PE only", "chronic": "chronic PE only", "acute_and_chronic": "acute and chronic PE"}
"""The kinds of positive study of ``training.evaluation.evaluate.by_kind``, as the report names them."""


def _kind_section(metrics: dict[str, Any]) -> list[str]:
    """Where each model finds PE and where it misses: the numbers of ``by_kind`` for each kind of positive study."""
    models = {name: result for name, result in metrics["models"].items() if result.get("by_kind")}
    if not models:
        return []
    kinds = [kind for kind in KIND_TITLES if any(kind in r["by_kind"] for r in models.values())]
    header = "| positive studies | " + " | ".join(r["title"] for r in models.values()) + " |"
    rule = "|---|" + "---|" * len(models)

    def row(kind: str, cell: Callable[[dict[str, Any]], str]) -> str:
        count = next(r["by_kind"][kind]["studies"] for r in models.values() if kind in r["by_kind"])
        return (f"| {KIND_TITLES[kind]} ({count}) | "
                + " | ".join(cell(r["by_kind"][kind]) if kind in r["by_kind"] else "n/a" for r in models.values())
                + " |")

    lines = [
        "## By kind of positive study",
        "",
        "Each kind of positive study (by its `chronic_pe` and `acute_and_chronic_pe` labels) against every study "
        "without PE. The study PE AUC of the whole set is these AUCs weighted by each kind's share of the positive "
        "studies, so a kind with a low AUC shows how much of the whole it costs.",
        "",
        "Study PE AUC:",
        "",
        header, rule, *(row(kind, lambda k: _number(k["study_pe_auc"])) for kind in kinds),
        "",
        "Read present by pe-node's report:",
        "",
        header, rule, *(row(kind, lambda k: f"{k['read_present']} of {k['studies']}") for kind in kinds),
        "",
        "Image AUC of their PE slices against every slice of the studies without PE:",
        "",
        header, rule, *(row(kind, lambda k: _number(k["image_auc"])) for kind in kinds),
        "",
    ]
    return lines


def _label_table(title: str, models: dict[str, Any], key: str) -> list[str]:
    """A markdown section: one row per label (the nine exam labels, then the image level), one column per model."""
    lines = [f"## {title}", "", "| label | " + " | ".join(r["title"] for r in models.values()) + " |",
             "|---|" + "---|" * len(models)]
    for label in (*EXAM_LABELS, IMAGE_LABEL):
        lines.append(f"| {label} | " + " | ".join(_number(r[key][label]) for r in models.values()) + " |")
    return lines


def _families_section(metrics: dict[str, Any]) -> list[str]:
    """Both phantom families side by side: the numbers that say whether the model learned emboli or one family."""
    other = metrics.get("independent")
    if other is None:
        return []
    lines = [
        "## Both phantom families side by side",
        "",
        "The training family's held-out studies come from the generator the model trained on (other seeds); the "
        "independent family is an evaluation-only construction (`pe-train phantoms --family independent`) that no "
        "training, selection or threshold ever saw: its numbers are the ones that say something about data the model "
        "was not fitted to. Read present: a slice above 0.5 (the RSNA rule, pe-node's report); detection by "
        "location counts the positive studies with emboli there that read present.",
        "",
        "| model | family | studies (positive) | study PE AUC | 95 % CI | sensitivity at specificity >= 0.90 | 95 % CI "
        "| read present (sensitivity) | read absent (specificity) | central | left | right |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in metrics["models"]:
        for family in (metrics, other):
            result = family["models"][name]
            bounds = family.get("bootstrap", {}).get("models", {}).get(name, {})
            split = family["data"]["splits"].get(family["split"], {})
            reading = result["node_reading"]
            located = " | ".join(
                f"{found['detected']} of {found['studies']}" if found["studies"] else "n/a"
                for found in result["by_location"].values())
            lines.append(
                f"| {result['title']} | {family['family']} | {family['studies']} ({split.get('positive', 0)}) "
                f"| {_number(result['study_pe_auc'])} | {_interval(bounds.get('study_pe_auc'))} "
                f"| {_number(result['sensitivity_at_specificity']['sensitivity'])} "
                f"| {_interval(bounds.get('sensitivity_at_specificity'))} "
                f"| {_number(reading['sensitivity'])} | {_number(reading['specificity'])} | {located} |")
    return lines + [""]


def _location_section(metrics: dict[str, Any]) -> list[str]:
    """Detection by where the emboli lie, for every model."""
    if not any(result.get("by_location") for result in metrics["models"].values()):
        return []
    lines = ["## Detection by location", "",
             "Positive studies with emboli at each place (their RSPECT labels `central_pe`, `leftsided_pe`, "
             "`rightsided_pe`) that pe-node's report reads present (a slice above 0.5):", "",
             "| model | central | left | right |", "|---|---|---|---|"]
    for result in metrics["models"].values():
        cells = [f"{found['detected']} of {found['studies']}" if found["studies"] else "n/a"
                 for found in result.get("by_location", {}).values()]
        lines.append(f"| {result['title']} | " + " | ".join(cells) + " |")
    return lines + [""]


def _set_sections(metrics: dict[str, Any]) -> list[str]:
    """The models table and every section of one evaluated set."""
    models = metrics["models"]
    split = metrics["data"]["splits"].get(metrics["split"], {})
    lines = [
        f"{metrics['studies']} studies of split `{metrics['split']}` from `{metrics['data']['source']}`: "
        f"{split.get('negative', 0)} negative, {split.get('positive', 0)} positive, "
        f"{split.get('indeterminate', 0)} indeterminate; {split.get('slices', 0)} slices, "
        f"{split.get('positive_slices', 0)} with PE."
        + (" The data are synthetic phantoms." if metrics["data"]["phantoms"] else ""),
        "",
        "## Models",
        "",
        "| model | study PE AUC | 95 % CI | RSNA weighted log loss | 95 % CI | study PE accuracy "
        "| mean exam-label accuracy | image accuracy | studies breaking the label rules (before fix) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    intervals = metrics.get("bootstrap", {}).get("models", {})
    for name, result in models.items():
        consistency = result["consistency"]
        bounds = intervals.get(name, {})
        lines.append(
            f"| {result['title']} | {_number(result['study_pe_auc'])} | {_interval(bounds.get('study_pe_auc'))} "
            f"| {_number(result['rsna_log_loss'], 4)} | {_interval(bounds.get('rsna_log_loss'), 4)} "
            f"| {_number(result['study_pe_accuracy'])} | {_number(result['mean_label_accuracy'])} "
            f"| {_number(result['accuracy'][IMAGE_LABEL])} "
            f"| {consistency['studies_breaking_rules_before']} of {consistency['studies']} |"
        )
    constant = metrics["constant_baseline"]["rsna_log_loss"]
    lines += [
        f"| Constant prediction (training prevalences) | 0.5 by definition | | {_number(constant, 4)} | | | | | |",
        "",
        "The study PE score is the study head's (1 - p(negative)) (1 - p(indeterminate)) for the two CNN-LSTMs and "
        "the highest image probability for the CNN alone. The RSNA weighted log loss is the competition metric over "
        "the whole set, on the label-consistent outputs (every model's outputs pass the RSNA checker after "
        "`make_consistent`: "
        + ", ".join(f"{r['consistency']['studies_breaking_rules_after']} left" for r in models.values())
        + "). Accuracy is at a threshold of 0.5."
        + (f" The intervals are {round(metrics['bootstrap']['level'] * 100)} % percentile intervals over "
           f"{metrics['bootstrap']['resamples']} bootstrap resamples of the studies." if "bootstrap" in metrics
           else ""),
        "",
    ]
    lines += _bootstrap_section(metrics)
    lines += _reading_section(metrics)
    lines += _location_section(metrics)
    lines += _kind_section(metrics)
    lines += _label_table("AUC per label", models, "auc")
    lines += ["", "n/a: the label has only one class among these studies.", ""]
    lines += _label_table("Accuracy per label (threshold 0.5)", models, "accuracy")
    return lines


def write_report(path: Path, metrics: dict[str, Any]) -> Path:
    """Write the markdown summary of an evaluation's ``metrics`` (as in metrics.json): both families side by side
    when the evaluation had the independent one, then every section of each set."""
    lines = ["# Evaluation report", ""]
    lines += _families_section(metrics)
    other = metrics.get("independent")
    if other is not None:
        lines += ["# The training family's held-out studies", ""]
    lines += _set_sections(metrics)
    if other is not None:
        lines += ["", "# The independent, evaluation-only family", ""]
        lines += _set_sections(other)
    lines += ["", "## Figures", ""]
    lines += [f"![{name}]({name})" for name in metrics["figures"]]
    lines += ["", PHANTOM_CAVEATS if metrics["data"]["phantoms"] else ""]
    path.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return path
