"""Config: defaults, YAML, environment overrides, and refusals that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from pe_node.config import ConfigError, DicomDestination, load_config

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_shipped_config_is_valid_and_matches_design() -> None:
    config = load_config(REPO / "config.yaml", environ={})
    assert config.node.ae_title == "PE_NODE" and config.node.port == 11112
    assert config.series.quiet_seconds == 5 and config.series.min_instances == 30
    assert config.database.url == f"sqlite:///{REPO / 'var' / 'pe-node.db'}"
    assert config.model.checkpoint == REPO / "models" / "pe-demo.pt"
    assert config.destinations[0].name == "outbox"


def test_defaults_without_a_file_equal_the_shipped_file() -> None:
    shipped = load_config(REPO / "config.yaml", environ={})
    embedded = load_config(None, environ={})
    assert embedded.node == shipped.node and embedded.series == shipped.series and embedded.worker == shipped.worker


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "storage: {path: data/dicom}\ndatabase: {url: 'sqlite:///db/x.db'}\n"), {})
    assert config.storage.path == tmp_path / "data" / "dicom"
    assert config.database.url == f"sqlite:///{tmp_path / 'db' / 'x.db'}"


def test_environment_overrides_any_key_with_yaml_values(tmp_path: Path) -> None:
    environ = {
        "PE_NODE__NODE__PORT": "11999",
        "PE_NODE__SERIES__MODALITIES": "[CT, MR]",
        "PE_NODE__OUTPUTS__SECONDARY_CAPTURE__MAX_IMAGES": "2",
        "PE_NODE__DESTINATIONS": "[{type: dicom, name: pacs, ae_title: PACS, host: 127.0.0.1, port: 4242}]",
    }
    config = load_config(write(tmp_path, "node: {port: 104}\n"), environ)
    assert config.node.port == 11999
    assert config.series.modalities == ["CT", "MR"]
    assert config.outputs.secondary_capture.max_images == 2
    assert isinstance(config.destinations[0], DicomDestination) and config.destinations[0].port == 4242


@pytest.mark.parametrize(
    ("text", "environ", "message"),
    [
        ("node: {prot: 104}\n", {}, "node.prot: unknown key (did you mean 'port'?)"),
        ("seires: {}\n", {}, "seires: unknown key (did you mean 'series'?)"),
        ("node: {port: 70000}\n", {}, "node.port: Input should be less than or equal to 65535"),
        ("node: {port: eleven}\n", {}, "node.port: Input should be a valid integer"),
        ("series: {quiet_seconds: -1}\n", {}, "series.quiet_seconds: Input should be greater than 0"),
        ("node: {ae_title: 'WAY_TOO_LONG_AE_TITLE'}\n", {}, "node.ae_title"),
        ("node: {allowed_callers: ['CT@']}\n", {}, "node.allowed_callers"),
        ("model: {device: gpu}\n", {}, "model.device"),
        ("database: {url: 'mysql://x'}\n", {}, "database.url"),
        ("destinations: [{type: dicom, name: p, ae_title: P, host: h}]\n", {}, "destinations.0.port: Field required"),
        ("destinations: [{type: ftp, name: p}]\n", {}, "destinations.0"),
        ("", {"PE_NODE__WORKER__MAX_ATTEMPS": "2"}, "worker.max_attemps: unknown key (did you mean 'max_attempts'?)"),
        ("node: [1, 2]\n", {}, "node"),
    ],
)
def test_bad_config_is_refused_naming_the_key(tmp_path: Path, text: str, environ: dict[str, str],
                                               message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text), environ)
    assert message in str(caught.value)


def test_duplicate_destination_names_are_refused(tmp_path: Path) -> None:
    text = "destinations: [{type: folder, name: a, path: x}, {type: folder, name: a, path: y}]\n"
    with pytest.raises(ConfigError, match="repeated: a"):
        load_config(write(tmp_path, text), {})


def test_missing_or_malformed_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yaml", {})
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "node: {port: [\n"), {})


def test_config_is_frozen() -> None:
    config = load_config(None, environ={})
    with pytest.raises(ValidationError, match="frozen"):
        config.node.port = 1  # type: ignore[misc]


def test_allowed_callers_accept_aet_and_aet_at_host(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "node: {allowed_callers: [CT1, ' PACS @10.0.0.5']}\n"), {})
    assert config.node.allowed_callers == ["CT1", "PACS@10.0.0.5"]
