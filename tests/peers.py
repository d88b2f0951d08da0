"""Real peers on loopback for tests and benchmarks: pe-node itself, DCMTK tools, storescp and Orthanc.

Each runs as a separate process on a free port with its own temporary folder, and is stopped at the end.
DCMTK (and Orthanc, which embeds it) get ``TCP_NODELAY=1``, or every C-STORE waits ~40 ms for a delayed ACK.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
PE_NODE = [sys.executable, "-m", "pe_node.cli"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def dcmtk_env() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}


def have(tool: str) -> bool:
    return shutil.which(tool) is not None


def run_dcmtk(tool: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run a DCMTK command line tool with TCP_NODELAY=1; the completed process (never raises on failure)."""
    return subprocess.run([tool, *args], env=dcmtk_env(), capture_output=True, text=True, timeout=timeout)


def wait_for_port(port: int, timeout: float = 30.0, process: subprocess.Popen[Any] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port} after {timeout} s")


def node_config(root: Path, port: int, **sections: dict[str, Any]) -> dict[str, Any]:
    """A pe-node config for a test: everything under ``root``, the given sections merged over the defaults."""
    config: dict[str, Any] = {
        "node": {"ae_title": "PE_NODE", "host": "127.0.0.1", "port": port},
        "storage": {"path": str(root / "dicom"), "min_free_mb": 1},
        "database": {"url": f"sqlite:///{root / 'pe-node.db'}"},
        "series": {"quiet_seconds": 1.0, "min_instances": 5, "sweep_seconds": 0.2},
        "study": {"quiet_seconds": 1.5},
        "worker": {"enabled": False},
        "destinations": [{"name": "outbox", "type": "folder", "path": str(root / "outbox")}],
        "web": {"enabled": True, "host": "127.0.0.1", "port": 0},
        "logging": {"level": "INFO"},
    }
    for name, values in sections.items():
        if isinstance(values, dict) and isinstance(config.get(name), dict):
            config[name] = {**config[name], **values}
        else:
            config[name] = values
    return config


class NodeProcess:
    """``pe-node serve`` (or another pe-node command) in a subprocess with a config written under ``root``."""

    def __init__(self, root: Path, config: dict[str, Any], args: Sequence[str] = ("serve",)) -> None:
        self.root = root
        self.config = config
        self.config_path = root / "config.yaml"
        self.args = list(args)
        self.log_path = root / f"pe-node-{self.args[0]}.log"
        self.process: subprocess.Popen[bytes] | None = None
        root.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(config))

    @property
    def port(self) -> int:
        return int(self.config["node"]["port"])

    def start(self, wait: bool = True) -> NodeProcess:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [*PE_NODE, *self.args, "--config", str(self.config_path)], stdout=log, stderr=log, cwd=REPO
        )
        if wait and self.args[0] == "serve":
            wait_for_port(self.port, process=self.process)
        return self

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait (SIGKILL after ``timeout``); the exit code."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.send_signal(signal.SIGCONT)  # a stopped process acts on SIGTERM only once it runs again
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return int(self.process.returncode)

    def kill(self) -> None:
        """kill -9: no chance to clean up."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def web_url(self) -> str:
        """The base URL of this process's status page (the port is picked at start)."""
        found = wait_until(lambda: re.search(r"status page, /metrics and /healthz on (http://\S+/)", self.log()),
                           timeout=30, what="the web server's address in the log")
        return found.group(1)

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Another pe-node command against the same config (status, check, resend...)."""
        return subprocess.run([*PE_NODE, *args, "--config", str(self.config_path)], capture_output=True, text=True,
                              timeout=timeout, cwd=REPO)

    def cli_send(self, *paths: Path, calling: str = "TESTSCU") -> subprocess.CompletedProcess[str]:
        """``pe-node send PATH... --to PE_NODE@127.0.0.1:PORT`` into this node."""
        to = f"{self.config['node']['ae_title']}@127.0.0.1:{self.port}"
        return subprocess.run([*PE_NODE, "send", *map(str, paths), "--to", to, "--aet", calling],
                              capture_output=True, text=True, timeout=120, cwd=REPO)

    def status(self) -> dict[str, Any]:
        result = self.cli("status", "--json")
        if result.returncode != 0:
            raise RuntimeError(f"pe-node status failed: {result.stderr}")
        return json.loads(result.stdout)

    def __enter__(self) -> NodeProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def kill_mid_job(workers: Sequence[NodeProcess], database_url: str,
                 timeout: float = 120) -> tuple[NodeProcess, int, int]:
    """kill -9 the first of ``workers`` seen holding a running job, inside that job. Returns (that worker, the job's
    id, its attempts).

    The worker is stopped (SIGSTOP) and given a moment for a COMMIT it had already sent to land before its job is
    read again, so it cannot finish the job between the check and the kill; if it had finished, it is resumed
    (SIGCONT) and the wait goes on. The database, not the status page, is polled: a status request can take longer
    than a job.
    """
    from sqlalchemy import create_engine, text

    by_pid = {str(worker.process.pid): worker for worker in workers if worker.process is not None}
    running = text("SELECT id, lease_owner FROM jobs WHERE state = 'running'")
    held = text("SELECT attempts FROM jobs WHERE id = :id AND state = 'running' AND lease_owner = :owner")
    engine = create_engine(database_url)

    def still_held(job_id: int, owner: str) -> int | None:
        with engine.connect() as connection:
            return connection.execute(held, {"id": job_id, "owner": owner}).scalar()

    def frozen_in_a_job() -> tuple[NodeProcess, int, int, str] | None:
        with engine.connect() as connection:
            jobs = connection.execute(running).all()
        for job_id, owner in jobs:
            worker = by_pid.get(str(owner).rpartition(":")[2])
            if worker is None:
                continue
            worker.process.send_signal(signal.SIGSTOP)
            try:
                _wait_stopped(worker.process.pid)
                time.sleep(0.2)
                attempts = still_held(job_id, owner)
            except BaseException:
                worker.process.send_signal(signal.SIGCONT)
                raise
            if attempts is not None:
                return worker, job_id, attempts, owner
            worker.process.send_signal(signal.SIGCONT)
        return None

    try:
        worker, job_id, attempts, owner = wait_until(frozen_in_a_job, timeout=timeout, interval=0.005,
                                                     what="a job running on a worker")
        worker.kill()
        assert still_held(job_id, owner) == attempts, "the job was no longer running on the worker it was killed in"
    finally:
        engine.dispose()
    return worker, job_id, attempts


def _wait_stopped(pid: int, timeout: float = 10.0) -> None:
    """Wait until every thread of ``pid`` is stopped (state T in /proc): SIGSTOP is delivered asynchronously."""
    deadline = time.monotonic() + timeout
    tasks = Path(f"/proc/{pid}/task")
    while time.monotonic() < deadline:
        states = []
        for task in tasks.iterdir():
            try:
                states.append((task / "stat").read_text().rpartition(")")[2].split()[0])
            except (FileNotFoundError, ProcessLookupError):
                continue
        if states and all(state in ("T", "t") for state in states):
            return
        time.sleep(0.002)
    raise TimeoutError(f"process {pid} not stopped after {timeout} s")

class StoreSCP:
    """DCMTK storescp writing every received instance to ``folder``."""

    def __init__(self, folder: Path, port: int | None = None, ae_title: str = "STORESCP",
                 options: Sequence[str] = ()) -> None:
        self.folder = folder
        self.port = port or free_port()
        self.ae_title = ae_title
        self.options = list(options)
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> StoreSCP:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            ["storescp", *self.options, "--aetitle", self.ae_title, "--output-directory", str(self.folder),
             str(self.port)],
            env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, process=self.process)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.process is not None
        self.process.terminate()
        self.process.wait(10)


class Orthanc:
    """An Orthanc PACS with its own storage, DICOM port and REST port."""

    DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")

    def __init__(self, root: Path, dicom_port: int | None = None, ae_title: str = "ORTHANC",
                 modalities: dict[str, list[Any]] | None = None, dicomweb: bool = False) -> None:
        self.root = root
        self.dicomweb = dicomweb
        self.dicom_port = dicom_port or free_port()
        self.http_port = free_port()
        self.ae_title = ae_title
        self.modalities = modalities or {}
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Orthanc:
        self.root.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "pe-node-test-pacs",
            "StorageDirectory": str(self.root / "storage"),
            "IndexDirectory": str(self.root / "index"),
            "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "DicomModalities": self.modalities,
            "StorageCompression": False,
            "Plugins": [str(self.DICOMWEB_PLUGIN)] if self.dicomweb else [],
            "DicomWeb": {"Enable": self.dicomweb, "Root": "/dicom-web/"},
        }
        config_path = self.root / "orthanc.json"
        config_path.write_text(json.dumps(config))
        log = (self.root / "orthanc.log").open("ab")
        self.process = subprocess.Popen(["Orthanc", str(config_path)], env=dcmtk_env(), stdout=log, stderr=log)
        wait_for_port(self.dicom_port, process=self.process)
        wait_for_port(self.http_port, process=self.process)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(20)

    @property
    def dicomweb_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/dicom-web"

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as response:
            return json.loads(response.read())

    def post(self, path: str, body: bytes | str, content_type: str = "application/json", method: str = "POST") -> Any:
        data = body.encode() if isinstance(body, str) else body
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=data, method=method,
                                         headers={"Content-Type": content_type})
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = response.read()
        return json.loads(answer) if answer.strip() else None

    def upload(self, dicom: bytes) -> None:
        """Store one DICOM file through the REST API, as a PACS holds the studies it routes."""
        status = self.post("/instances", dicom, content_type="application/dicom").get("Status")
        if status not in ("Success", "AlreadyStored"):
            raise RuntimeError(f"Orthanc did not store the instance: {status}")

    def put_modality(self, name: str, parameters: list[Any]) -> None:
        """Declare a DICOM modality ([AET, host, port]) that Orthanc can send studies to."""
        self.post(f"/modalities/{name}", json.dumps(parameters), method="PUT")

    def __enter__(self) -> Orthanc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_until(predicate: Any, timeout: float = 30.0, interval: float = 0.1, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; that value, or TimeoutError."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what} not reached after {timeout} s")



def postgres_bin() -> Path | None:
    """The folder of the newest installed PostgreSQL server binaries (Debian keeps them off PATH)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parent.parent.name))
    return found[-1].parent if found else None


class PostgresServer:
    """A throw-away PostgreSQL cluster on a free port (run as the postgres user when we are root)."""

    def __init__(self) -> None:
        binaries = postgres_bin()
        if binaries is None:
            raise RuntimeError("PostgreSQL server binaries not found")
        self.bin = binaries
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="pe-node-pg-"))
        self.data = self.root / "data"
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            shutil.chown(self.root, "postgres", "postgres")

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        command = ["runuser", "-u", "postgres", "--", *args] if self._as_postgres else list(args)
        return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)

    def start(self) -> PostgresServer:
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=on -c max_connections=200"
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", options, "-l", str(self.root / "log"),
                  "-w", "start")
        return self

    def create_database(self, name: str) -> str:
        """A new empty database; its SQLAlchemy URL."""
        self._run(str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name)
        return self.url(name)

    def url(self, name: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        try:
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


#: The real peers the tests start, each with how to tell it is installed. ``make test`` installs them all; a test
#: that needs one carries ``pytest.mark.peer(name, ...)``. Without the peer the test is skipped, or, under
#: ``CI=true``, fails: a CI run that silently skipped its peers would prove nothing.
PEERS: dict[str, tuple[str, Any]] = {
    "dcmtk": ("DCMTK (storescu, dsrdump, dcmp2pgm)", lambda: have("storescu")),
    "dicom3tools": ("dicom3tools (dciodvfy)", lambda: have("dciodvfy")),
    "orthanc": ("Orthanc", lambda: have("Orthanc")),
    "orthanc-dicomweb": ("Orthanc's DICOMweb plugin", lambda: Orthanc.DICOMWEB_PLUGIN.exists()),
    "postgresql": ("PostgreSQL", lambda: postgres_bin() is not None),
    "chromium": ("Chromium", lambda: _chromium() is not None),
    "openssl": ("openssl", lambda: have("openssl")),
    "ohif": ("the OHIF Viewer and puppeteer-core npm packages with Node.js (make test-setup: npm ci in tests/viewer)",
             lambda: have("node") and (REPO / "tests/viewer/node_modules/@ohif/app/dist/index.html").is_file()
             and (REPO / "tests/viewer/node_modules/puppeteer-core/package.json").is_file()),
}


def missing_peers(names: Sequence[str]) -> list[str]:
    """The descriptions of the peers among ``names`` that are not installed; unknown names are an error."""
    unknown = [name for name in names if name not in PEERS]
    if unknown:
        raise ValueError(f"unknown peers {unknown}; known: {sorted(PEERS)}")
    return [PEERS[name][0] for name in names if not PEERS[name][1]()]


def on_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")
