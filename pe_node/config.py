"""The node's configuration: one YAML file, overridable per key from the environment, validated once and frozen.

Precedence, lowest first: the defaults below (the same values as the shipped ``config.yaml``), the YAML file, then
environment variables named ``PE_NODE__SECTION__KEY`` (``PE_NODE__NODE__PORT=11113``,
``PE_NODE__OUTPUTS__SECONDARY_CAPTURE__MAX_IMAGES=2``); a variable's value is read as YAML, so lists and numbers work
(``PE_NODE__SERIES__MODALITIES='[CT, MR]'``). Relative paths are relative to the folder of the config file (the
working directory when there is none). Anything unknown, mistyped or impossible is refused with a message that
names the key.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

ENV_PREFIX = "PE_NODE__"
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # DICOM AE VR: 16 chars, no backslash or controls


class ConfigError(ValueError):
    """The configuration cannot be used; the message names every bad key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_ae_title(value: str) -> str:
    if not _AE_TITLE.match(value) or not value.strip():
        raise ValueError(f"{value!r} is not a valid AE title (1-16 printable characters, no backslash)")
    return value.strip()


AETitle = Annotated[str, AfterValidator(_check_ae_title)]


class TLSConfig(_Section):
    """DICOM TLS for the listener (DICOM PS3.15 B.1 profile with TLS 1.2 or newer)."""

    certificate: Path
    private_key: Path
    ca_certificates: Path | None = None
    require_client_certificate: bool = False

    @model_validator(mode="after")
    def _client_certs_need_a_ca(self) -> TLSConfig:
        if self.require_client_certificate and self.ca_certificates is None:
            raise ValueError("require_client_certificate needs ca_certificates to verify clients against")
        return self


class NodeConfig(_Section):
    """The DICOM listener: who we are, where we listen, whom we accept, and how much any peer can make it hold.

    A request whose called AE title is not ``ae_title`` is rejected. Memory per association stays near
    ``spool_above_mb`` whatever ``max_dataset_mb`` is: larger datasets go to the storage volume as they arrive.
    """

    ae_title: AETitle = "PE_NODE"
    host: str = "0.0.0.0"
    port: int = Field(11112, ge=1, le=65535)
    allowed_callers: list[str] = Field(default_factory=list)
    max_associations: int = Field(10, ge=1, le=1000)
    max_associations_per_host: int = Field(
        5, ge=1, le=1000, description="associations from one address, and connections from it still negotiating")
    max_pending_connections: int = Field(
        16, ge=1, le=1000, description="connections not yet associated (TLS handshake, A-ASSOCIATE-RQ); more: closed")
    tls: TLSConfig | None = None
    max_pdu_bytes: int = Field(4 * 1024 * 1024, ge=0, description="0 means unlimited")
    max_dataset_mb: float = Field(2048, gt=0, description="also the most a deflated dataset may inflate to")
    max_command_kb: int = Field(4, ge=1, le=1024, description="a DIMSE command set; a C-STORE-RQ's is ~300 bytes")
    spool_above_mb: float = Field(8, ge=0, description="larger datasets are written to a file as they arrive")
    network_timeout_seconds: float = Field(
        60.0, gt=0, description="the longest silence; also the grace of every PDU and message deadline")
    min_receive_kb_per_second: float = Field(
        32, gt=0, description="a PDU or message must average this (KiB/s) once network_timeout_seconds has passed")

    @field_validator("allowed_callers")
    @classmethod
    def _callers(cls, callers: list[str]) -> list[str]:
        """Each entry is ``AET`` or ``AET@host``."""
        checked = []
        for entry in callers:
            aet, _, host = entry.partition("@")
            _check_ae_title(aet)
            if "@" in entry and not host.strip():
                raise ValueError(f"{entry!r}: empty host after '@'")
            checked.append(f"{aet.strip()}@{host.strip()}" if host else aet.strip())
        return checked


class StorageConfig(_Section):
    """Where received instances are kept, and the free-space floor below which C-STORE is refused."""

    path: Path = Path("var/dicom")
    min_free_mb: int = Field(1024, ge=0)


class DatabaseConfig(_Section):
    """SQLAlchemy URL of the job table: SQLite for one process, PostgreSQL to scale out."""

    url: str = "sqlite:///var/pe-node.db"

    @field_validator("url")
    @classmethod
    def _known_backend(cls, url: str) -> str:
        if not url.startswith(("sqlite://", "postgresql://", "postgresql+psycopg://", "postgresql+psycopg2://")):
            raise ValueError(f"{url!r}: only sqlite:// and postgresql:// URLs are supported")
        return url


class SeriesConfig(_Section):
    """When a series counts as complete, which series are routed at all, and what a series must be to be analysed."""

    quiet_seconds: float = Field(5.0, gt=0, le=3600)
    min_instances: int = Field(30, ge=1, description="the fewest slices (instances or frames) a stack may have")
    modalities: list[str] = Field(default_factory=lambda: ["CT"], min_length=1)
    sweep_seconds: float = Field(0.5, gt=0, le=60)
    max_tilt_degrees: float = Field(30.0, ge=0, le=90, description="axial: slice normal this close to the body axis")
    max_matrix: int = Field(2048, ge=16, le=65535, description="Rows and Columns above this: not analysed")
    max_megavoxels: float = Field(700.0, gt=0, description="slices x rows x columns above this: not analysed")


KERNEL_SOFT = [
    "*SOFT*", "*STANDARD*", "*STND*", "*BODY*", "*MEDIASTIN*", "B1*", "B2*", "B3*", "B4*", "BR3*", "BR4*", "BV*",
    "I2*", "I3*", "I4*", "FC0*", "FC1*", "FC2*", "FC4*", "A", "B", "C", "CB", "UB",
]
"""ConvolutionKernel values of soft-tissue/standard kernels (glob patterns, case-insensitive): GE, Siemens, Canon,
Philips names."""
KERNEL_SHARP = [
    "*LUNG*", "*BONE*", "*SHARP*", "*DETAIL*", "*EDGE*", "B5*", "B6*", "B7*", "B8*", "BL*", "BR6*", "BR7*", "I5*",
    "I6*", "I7*", "FC5*", "FC8*", "L", "LA", "D", "E", "YA", "YB", "YC", "YD",
]
"""ConvolutionKernel values of lung/bone/sharp kernels (glob patterns, case-insensitive)."""


class _Rule(_Section):
    """One selection rule; ``rule`` names it (see ``StudyConfig``)."""


class ImageRule(_Rule):
    rule: Literal["image"]


class NotLocalizerRule(_Rule):
    rule: Literal["not_localizer"]


class NotReformatRule(_Rule):
    rule: Literal["not_reformat"]


class VolumeRule(_Rule):
    rule: Literal["volume"]


class AxialRule(_Rule):
    rule: Literal["axial"]


class MinSlicesRule(_Rule):
    rule: Literal["min_slices"]


class ContrastRule(_Rule):
    rule: Literal["contrast"]


class MaxThicknessRule(_Rule):
    rule: Literal["max_thickness"]
    mm: float = Field(3.0, gt=0)
    fallback_mm: float = Field(5.0, gt=0)

    @model_validator(mode="after")
    def _fallback_not_below(self) -> MaxThicknessRule:
        if self.fallback_mm < self.mm:
            raise ValueError(f"fallback_mm ({self.fallback_mm}) must be at least mm ({self.mm})")
        return self


class PreferOriginalRule(_Rule):
    rule: Literal["prefer_original"]


class PreferThinnestRule(_Rule):
    rule: Literal["prefer_thinnest"]


class PreferMostSlicesRule(_Rule):
    rule: Literal["prefer_most_slices"]


class PreferKernelRule(_Rule):
    rule: Literal["prefer_kernel"]
    soft: list[str] = Field(default_factory=lambda: list(KERNEL_SOFT))
    sharp: list[str] = Field(default_factory=lambda: list(KERNEL_SHARP))


SelectionRule = Annotated[
    ImageRule | NotLocalizerRule | NotReformatRule | VolumeRule | AxialRule | MinSlicesRule | ContrastRule
    | MaxThicknessRule | PreferOriginalRule | PreferThinnestRule | PreferMostSlicesRule | PreferKernelRule,
    Field(discriminator="rule"),
]
RULE_NAMES = ("image", "not_localizer", "not_reformat", "volume", "axial", "min_slices", "contrast", "max_thickness",
              "prefer_original", "prefer_thinnest", "prefer_most_slices", "prefer_kernel")


def _default_rules() -> list[SelectionRule]:
    return [
        ImageRule(rule="image"),
        NotLocalizerRule(rule="not_localizer"),
        NotReformatRule(rule="not_reformat"),
        VolumeRule(rule="volume"),
        AxialRule(rule="axial"),
        MinSlicesRule(rule="min_slices"),
        ContrastRule(rule="contrast"),
        MaxThicknessRule(rule="max_thickness"),
        PreferOriginalRule(rule="prefer_original"),
        PreferThinnestRule(rule="prefer_thinnest"),
        PreferMostSlicesRule(rule="prefer_most_slices"),
        PreferKernelRule(rule="prefer_kernel"),
    ]


class StudyConfig(_Section):
    """Which series of a study is analysed (``pe_node.pipeline.selection``), once the study is quiet.

    ``rules`` apply in order. The first seven drop a candidate stack that fails them, the reason shown in the
    status: ``image`` (a CT image, not a dose report, secondary capture, presentation state or other object),
    ``not_localizer``, ``not_reformat`` (no MPR, MIP, MinIP, projection or curved reformat, no DERIVED\\SECONDARY),
    ``volume`` (full geometry: a position for every slice or frame, one matrix, no gaps), ``axial``
    (series.max_tilt_degrees), ``min_slices`` (series.min_instances), ``contrast`` (when some series of the study
    names a contrast agent, those that name none are out), ``max_thickness`` (at most ``mm``, or, when no stack is
    that thin, the thinnest up to ``fallback_mm``). The ``prefer_*`` rules then rank what is left, each breaking the
    ties of the one before: ORIGINAL over DERIVED, thinnest, most slices, a soft-tissue kernel over an unknown one
    over a lung/sharp one. ``analyse: best`` analyses the first; ``all`` analyses every stack left, each with its
    own report.
    """

    quiet_seconds: float = Field(8.0, gt=0, le=86400)
    analyse: Literal["best", "all"] = "best"
    rules: list[SelectionRule] = Field(default_factory=_default_rules, min_length=1)


class ModelConfig(_Section):
    """The checkpoint the worker loads, and where it runs."""

    checkpoint: Path = Path("models/pe-demo.pt")
    device: str = "auto"
    batch_size: int = Field(32, ge=1, le=1024)

    @field_validator("device")
    @classmethod
    def _device(cls, device: str) -> str:
        return check_device(device)


def check_device(device: str) -> str:
    """A torch device setting as the config accepts it: auto (CUDA when present), cpu, cuda or cuda:N."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise ValueError(f"{device!r}: use auto, cpu, cuda or cuda:N")
    return device


class WorkerConfig(_Section):
    """The job worker: whether ``serve`` runs one, and how jobs are leased."""

    enabled: bool = True
    lease_seconds: float = Field(600, ge=5)
    max_attempts: int = Field(3, ge=1, le=100)
    poll_seconds: float = Field(0.5, gt=0, le=60)


class FolderDestination(_Section):
    type: Literal["folder"]
    name: str = Field(min_length=1)
    path: Path


class DicomDestination(_Section):
    type: Literal["dicom"]
    name: str = Field(min_length=1)
    ae_title: AETitle
    host: str
    port: int = Field(ge=1, le=65535)
    calling_ae_title: AETitle | None = None


class DicomWebDestination(_Section):
    type: Literal["dicomweb"]
    name: str = Field(min_length=1)
    url: str = Field(pattern=r"^https?://")
    headers: dict[str, str] = Field(default_factory=dict)


Destination = Annotated[FolderDestination | DicomDestination | DicomWebDestination, Field(discriminator="type")]


class SecondaryCaptureConfig(_Section):
    enabled: bool = True
    max_images: int = Field(4, ge=1, le=64)
    for_negative: bool = False


class OutputsConfig(_Section):
    """Which result objects a finished job produces."""

    structured_report: bool = True
    secondary_capture: SecondaryCaptureConfig = SecondaryCaptureConfig()
    key_object_selection: bool = False
    presentation_state: bool = True


class DeliveryConfig(_Section):
    """Retries of result objects that a destination did not take: exponential backoff, then give up."""

    initial_backoff_seconds: float = Field(10, gt=0)
    max_backoff_seconds: float = Field(900, gt=0)
    give_up_after_hours: float = Field(24, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> DeliveryConfig:
        if self.max_backoff_seconds < self.initial_backoff_seconds:
            raise ValueError("max_backoff_seconds must be at least initial_backoff_seconds")
        return self


class RetentionConfig(_Section):
    days: float = Field(7, gt=0)


class WebConfig(_Section):
    """The read-only status page, /metrics (Prometheus) and /healthz of this process."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535, description="0 picks a free port")


class LoggingConfig(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    json_format: bool = Field(False, alias="json")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Config(_Section):
    """The whole node configuration (DESIGN.md "config.yaml")."""

    node: NodeConfig = NodeConfig()
    storage: StorageConfig = StorageConfig()
    database: DatabaseConfig = DatabaseConfig()
    series: SeriesConfig = SeriesConfig()
    study: StudyConfig = StudyConfig()
    model: ModelConfig = ModelConfig()
    worker: WorkerConfig = WorkerConfig()
    destinations: list[Destination] = Field(default_factory=lambda: _default_destinations())
    outputs: OutputsConfig = OutputsConfig()
    delivery: DeliveryConfig = DeliveryConfig()
    retention: RetentionConfig = RetentionConfig()
    web: WebConfig = WebConfig()
    logging: LoggingConfig = LoggingConfig()

    @field_validator("destinations")
    @classmethod
    def _unique_names(cls, destinations: list[Any]) -> list[Any]:
        names = [d.name for d in destinations]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"destination names must be unique, repeated: {', '.join(duplicates)}")
        return destinations

    def resolve_paths(self, base: Path) -> Config:
        """A copy with every relative path made absolute against ``base``."""
        data = self.model_dump(by_alias=True)
        for section, key in (("storage", "path"), ("model", "checkpoint")):
            data[section][key] = _absolute(data[section][key], base)
        if data["node"]["tls"]:
            for key in ("certificate", "private_key", "ca_certificates"):
                if data["node"]["tls"][key] is not None:
                    data["node"]["tls"][key] = _absolute(data["node"]["tls"][key], base)
        for dest in data["destinations"]:
            if dest["type"] == "folder":
                dest["path"] = _absolute(dest["path"], base)
        data["database"]["url"] = _absolute_sqlite_url(data["database"]["url"], base)
        return Config.model_validate(data)


def _default_destinations() -> list[Destination]:
    return [FolderDestination(type="folder", name="outbox", path=Path("var/outbox"))]


def _absolute(path: Path, base: Path) -> Path:
    path = Path(path).expanduser()
    return path if path.is_absolute() else (base / path).resolve()


def _absolute_sqlite_url(url: str, base: Path) -> str:
    prefix = "sqlite:///"
    if not url.startswith(prefix) or url == "sqlite://" or url.startswith("sqlite:///:memory:"):
        return url
    path = url[len(prefix) :]
    return prefix + str(_absolute(Path(path), base))


def load_config(path: Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Read, override and validate the configuration; raise ConfigError naming every bad key."""
    environ = os.environ if environ is None else environ
    data: dict[str, Any] = {}
    base = Path.cwd()
    if path is not None:
        path = Path(path)
        base = path.resolve().parent
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(loaded).__name__}")
        data = loaded or {}
    data = _apply_environment(data, environ)
    source = str(path) if path is not None else "configuration"
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None
    return config.resolve_paths(base)


def _apply_environment(data: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """Overlay ``PE_NODE__SECTION__KEY`` variables onto the loaded mapping."""
    merged: dict[str, Any] = {k: v for k, v in data.items()}
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX):
            continue
        keys = [part.lower() for part in name[len(ENV_PREFIX) :].split("__")]
        if not all(keys):
            raise ConfigError(f"{name}: empty key in environment variable name")
        try:
            value = yaml.safe_load(environ[name])
        except yaml.YAMLError as exc:
            raise ConfigError(f"{name}: value is not valid YAML: {exc}") from None
        target = merged
        for depth, key in enumerate(keys[:-1]):
            node = target.get(key)
            if node is None:
                node = target[key] = {}
            elif isinstance(node, dict):
                node = target[key] = dict(node)
            else:
                raise ConfigError(f"{name}: {'.'.join(keys[: depth + 1])} is not a section")
            target = node
        target[keys[-1]] = value
    return merged


def _describe(exc: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration"]
    for error in exc.errors():
        location = [str(part) for part in error["loc"] if not _is_union_tag(part)]
        key = ".".join(location) or "(top level)"
        if error["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key{_suggestion(location)}")
        else:
            given = error.get("input")
            shown = "" if isinstance(given, dict | list) else f" (got {given!r})"
            lines.append(f"  {key}: {error['msg']}{shown}")
    return "\n".join(lines)


def _is_union_tag(part: Any) -> bool:
    return isinstance(part, str) and part in ("folder", "dicom", "dicomweb", *RULE_NAMES)


def _suggestion(location: list[str]) -> str:
    """'did you mean ...' for a misspelt key, from the fields of its section."""
    model: type[BaseModel] | None = Config
    for part in location[:-1]:
        if model is None or part.isdigit():
            return ""
        field = model.model_fields.get(part)
        annotation = getattr(field, "annotation", None)
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
        if model is None and field is not None:
            model = next(
                (a for a in getattr(annotation, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)),
                None,
            )
    if model is None:
        return ""
    close = difflib.get_close_matches(location[-1], list(model.model_fields), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
