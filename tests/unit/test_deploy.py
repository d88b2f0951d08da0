"""deploy/: what cannot run here (Docker) is parsed and checked; systemd units are verified by systemd-analyze."""

from __future__ import annotations

import configparser
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from pe_node.cli import _parser
from pe_node.config import load_config

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, arguments = line.partition(" ")
            pairs.append((instruction.upper(), arguments.strip()))
    return pairs


def test_dockerfile_runs_on_cuda_as_an_unprivileged_user() -> None:
    steps = dockerfile()
    instructions = [i for i, _ in steps]
    assert steps[0][0] == "FROM" and re.match(r"nvidia/cuda:[\d.]+-(cudnn-)?runtime-ubuntu", steps[0][1])
    users = [args for i, args in steps if i == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert instructions.index("USER") < instructions.index("ENTRYPOINT")
    entrypoint = dict(steps)["ENTRYPOINT"]
    assert '"pe-node"' in entrypoint
    assert "11112" in dict(steps)["EXPOSE"]
    assert "/healthz" in dict(steps)["HEALTHCHECK"]
    run = " ".join(args for i, args in steps if i == "RUN")
    makefile = (DEPLOY.parent / "Makefile").read_text()
    pins = re.search(r"TORCH := (.*)", makefile).group(1)
    assert pins in run, "the image pins torch like the Makefile"
    for source in (args.split()[0] for i, args in steps if i == "COPY"):
        assert (DEPLOY.parent / source).exists(), f"COPY {source}: no such path in the repository"


def test_container_config_is_valid() -> None:
    config = load_config(DEPLOY / "config.docker.yaml", environ={})
    assert config.web.host == "0.0.0.0" and str(config.storage.path).startswith("/var/lib/pe-node")


def test_production_example_config_is_valid() -> None:
    config = load_config(DEPLOY / "config.production.yaml", environ={})
    assert config.node.tls is not None and config.node.tls.require_client_certificate
    assert config.database.url.startswith("postgresql")


def test_compose_services_and_their_settings_are_valid() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "orthanc", "receiver", "worker"} <= set(services)
    parser = _parser()
    for name in ("receiver", "worker"):
        service = services[name]
        assert service["build"]["dockerfile"] == "deploy/Dockerfile"
        assert (DEPLOY / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
        parser.parse_args(service["command"])  # a pe-node command line that exists
        assert service["depends_on"]["postgres"]["condition"] == "service_healthy"
        environ = {k: str(v) for k, v in service["environment"].items()}
        config = load_config(DEPLOY / "config.docker.yaml", environ=environ)  # every PE_NODE__ key is known
        assert config.database.url.startswith("postgresql+psycopg://") and "@postgres:" in config.database.url
        assert config.destinations[0].host == "orthanc"
    assert services["receiver"]["command"] == ["serve", "--no-worker"]
    assert services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert services["postgres"]["healthcheck"]["test"][1] == "pg_isready"


@pytest.mark.parametrize("unit", ["pe-node.service", "pe-node-worker@.service"])
def test_systemd_units_run_pe_node_gracefully(unit: str) -> None:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(DEPLOY / "systemd" / unit)
    service = parser["Service"]
    command = shlex.split(service["ExecStart"])
    assert command[0].endswith("/bin/pe-node")
    _parser().parse_args(command[1:])
    assert service["User"] == "pe-node" and service["KillSignal"] == "SIGTERM"
    assert int(service["TimeoutStopSec"]) >= 60 and service["Restart"] == "on-failure"
    assert service["ProtectSystem"] == "strict" and "/var/lib/pe-node" in service["ReadWritePaths"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_finds_nothing_but_the_absent_install() -> None:
    units = [str(p) for p in (DEPLOY / "systemd").glob("*.service")]
    result = subprocess.run(["systemd-analyze", "verify", *units], capture_output=True, text=True)
    problems = [line for line in (result.stdout + result.stderr).splitlines()
                if line.strip() and "is not executable: No such file or directory" not in line]
    assert problems == []
