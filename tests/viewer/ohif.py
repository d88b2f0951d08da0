"""The OHIF Viewer on loopback for tests: what a radiologist sees of a study in Orthanc.

``OHIFServer(orthanc)`` serves the prebuilt OHIF app of ``tests/viewer/node_modules/@ohif/app/dist`` (installed by
``make test-setup``: ``npm ci`` here) on a free port, and proxies ``/dicom-web/`` on the same origin to Orthanc's
DICOMweb plugin (``Orthanc(..., dicomweb=True)``), so the browser needs no CORS. ``/app-config.js`` is written here
(``APP_CONFIG``); every other path that is not a file of dist/ is OHIF's ``index.html`` (a single-page app:
``/viewer`` is a client-side route).

``view_study(server, study_uid, out_dir, sr_series_uid=...)`` runs ``view-study.mjs``: puppeteer-core drives
/usr/bin/chromium (headless, no network but loopback) to ``/viewer?StudyInstanceUIDs=<uid>``, double-clicks the SR's
thumbnail in the study browser (answering "continue tracking measurements?" with yes), waits until OHIF is done
with it and writes ``result.json`` and screenshots into ``out_dir``; the :class:`ViewerResult` holds what tests
assert on. ``annotation_pixels(png)`` finds the annotation-coloured pixels of a screenshot.

``store(orthanc, datasets)`` puts DICOM objects into Orthanc. A test using the harness carries
``pytest.mark.peer("ohif", "orthanc", "orthanc-dicomweb", "chromium")`` (tests/peers.py: skipped without them,
failed under CI=true).
"""

from __future__ import annotations

import http.client
import io
import json
import mimetypes
import os
import shutil
import signal
import subprocess
import threading
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import Dataset

from tests.peers import Orthanc, wait_until

VIEWER = Path(__file__).resolve().parent
NODE_MODULES = VIEWER / "node_modules"
DIST = NODE_MODULES / "@ohif" / "app" / "dist"
SCRIPT = VIEWER / "view-study.mjs"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"

# OHIF 3.13's window.config for Orthanc 1.10 with its DICOMweb plugin 1.7 (Debian bookworm): one dicomweb data source
# whose roots are this origin's /dicom-web (the proxy below). WADO-RS for images and thumbnails; no wadouri, no
# 'singlepart' (Orthanc answers frames and metadata multipart, as OHIF asks by default); BulkDataURIs are followed
# (Orthanc writes them with the request's Host, which the proxy passes on). No study-list search by include fields.
# No dialogs over the viewer: the investigational-use notice, the CPU-rendering and cross-origin warnings are off.
APP_CONFIG = """\
// Written by tests/viewer/ohif.py: OHIF reads Orthanc's DICOMweb through the same origin (/dicom-web).
window.config = {
  name: 'pe-node tests',
  routerBasename: '/',
  extensions: [],
  modes: [],
  customizationService: {},
  showStudyList: true,
  maxNumberOfWebWorkers: 2,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  investigationalUseDialog: { option: 'never' },
  showErrorDetails: 'always',
  maxNumRequests: { interaction: 100, thumbnail: 10, prefetch: 10 },
  defaultDataSourceName: 'orthanc',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'orthanc',
      configuration: {
        friendlyName: 'Orthanc (pe-node tests)',
        name: 'orthanc',
        wadoUriRoot: '/dicom-web',
        qidoRoot: '/dicom-web',
        wadoRoot: '/dicom-web',
        qidoSupportsIncludeField: false,
        supportsReject: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        dicomUploadEnabled: false,
        omitQuotationForMultipartRequest: true,
        bulkDataURI: { enabled: true },
      },
    },
  ],
};
"""


class OHIFServer:
    """OHIF's dist/ and ``orthanc``'s DICOMweb root (proxied) on one loopback origin, in a thread."""

    def __init__(self, orthanc: Orthanc, dist: Path = DIST, app_config: str = APP_CONFIG) -> None:
        self.orthanc = orthanc
        self.dist = dist
        self.app_config = app_config.encode()
        self.failed: list[str] = []
        """``STATUS METHOD PATH`` of every proxied request Orthanc did not answer with 2xx (to explain failures)."""
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._server is not None, "not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> OHIFServer:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="ohif-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> OHIFServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


_TYPES = {".js": "text/javascript", ".mjs": "text/javascript", ".wasm": "application/wasm", ".json": "application/json"}


def _handler(server: OHIFServer) -> type[BaseHTTPRequestHandler]:
    dist = server.dist.resolve()
    index = (dist / "index.html").read_bytes()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            if self.path.startswith("/dicom-web/"):
                self._proxy()
            elif self.path.split("?")[0] == "/app-config.js":
                self._send(200, "text/javascript", server.app_config)
            else:
                self._static()

        def _static(self) -> None:
            relative = self.path.split("?")[0].split("#")[0].lstrip("/")
            path = (dist / relative).resolve()
            if relative and path.is_relative_to(dist) and path.is_file():
                kind = _TYPES.get(path.suffix) or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
                self._send(200, kind, path.read_bytes())
            elif Path(relative).suffix in (".js", ".css", ".wasm", ".map", ".png", ".ico", ".json", ".woff2"):
                self._send(404, "text/plain", b"not found")
            else:  # a client-side route of the single-page app (/viewer, /): the app itself
                self._send(200, "text/html; charset=utf-8", index)

        def _proxy(self) -> None:
            # Orthanc writes the URLs in its answers (RetrieveURL, BulkDataURI) with the request's Host: ours.
            headers = {name: value for name, value in self.headers.items()
                       if name.lower() in ("accept", "range", "host")}
            connection = http.client.HTTPConnection("127.0.0.1", server.orthanc.http_port, timeout=60)
            try:
                connection.request("GET", self.path, headers=headers)
                response = connection.getresponse()
                body = response.read()
            except OSError as error:
                server.failed.append(f"502 GET {self.path} ({error})")
                self._send(502, "text/plain", str(error).encode())
                return
            finally:
                connection.close()
            if not 200 <= response.status < 300:
                server.failed.append(f"{response.status} GET {self.path}")
            self._send(response.status, response.getheader("Content-Type", "application/octet-stream"), body)

        def _send(self, status: int, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_HEAD = do_GET  # noqa: N815

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
            pass

    return Handler


def store(orthanc: Orthanc, datasets: Sequence[Dataset]) -> None:
    """Store ``datasets`` into ``orthanc`` (REST: POST /instances), as a PACS receives the node's results."""
    # Orthanc listens a moment before its REST API answers (it resets connections while its plugins start).
    wait_until(lambda: _answers(orthanc), timeout=30, interval=0.1, what="Orthanc's REST API")
    for dataset in datasets:
        buffer = io.BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        post = urllib.request.Request(f"http://127.0.0.1:{orthanc.http_port}/instances", data=buffer.getvalue(),
                                      headers={"Content-Type": "application/dicom"}, method="POST")
        with urllib.request.urlopen(post, timeout=30) as response:
            status = json.loads(response.read()).get("Status")
        if status not in ("Success", "AlreadyStored"):
            raise RuntimeError(f"Orthanc did not store {dataset.SOPInstanceUID}: {status}")


def _answers(orthanc: Orthanc) -> bool:
    try:
        return bool(orthanc.get("/system"))
    except OSError:
        return False


@dataclass
class ViewerResult:
    """What ``view-study.mjs`` saw of one study; ``raw`` is its whole result.json (see the script's header)."""

    console_errors: list[str]
    """console.error messages, then uncaught exceptions and unhandled promise rejections (message, first frame)."""
    measurement_labels: list[str]
    """The rows of the measurements panel, one text each: "<n> <label> <values...>", as OHIF shows them."""
    screenshots: dict[str, Path]
    """name -> PNG: ``page`` (the whole window) and ``viewport`` (the active viewport) after opening the SR; ``ct``
    (the CT slice before the SR, when one was asked for)."""
    viewport_box: dict[str, float] | None
    """The active viewport's box in ``page`` (x, y, width, height; CSS pixels are screenshot pixels)."""
    canvas_box: dict[str, float] | None
    """The box of the active viewport's image canvas in ``page``; None when it has none (a black, empty viewport)."""
    sr_opened: bool
    """Whether the SR's thumbnail was found and double-clicked."""
    hydrated: bool
    """Whether OHIF turned the SR into measurements (tracked, listed in the panel, drawn by their tools)."""
    error: str | None
    """Why the script stopped early (a timeout, no SR in the study), or None."""
    raw: dict[str, Any] = field(repr=False)
    server_failures: list[str] = field(default_factory=list)
    """Proxied DICOMweb requests Orthanc did not answer with 2xx (``STATUS GET PATH``)."""


def view_study(
    server: OHIFServer,
    study_uid: str,
    out_dir: Path,
    *,
    sr_series_uid: str | None = None,
    ct_series_uid: str | None = None,
    ct_sop_uid: str | None = None,
    jump_to_row: int | None = None,
    timeout: float = 90.0,
) -> ViewerResult:
    """Load ``study_uid`` in OHIF and open its SR series (``sr_series_uid``, else the first SR display set).

    With ``ct_series_uid`` that CT series' slice ``ct_sop_uid`` (default: the middle one) is shown first and
    screenshot as ``ct``: the same slice without the SR's annotations. ``jump_to_row`` clicks that row of the
    measurements panel after opening the SR (OHIF then shows the finding's slice). Screenshots and result.json go to
    ``out_dir``. Raises RuntimeError when the script gives no result; a study that shows errors is a result.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    request = {
        "url": f"{server.url}/viewer?StudyInstanceUIDs={study_uid}",
        "outDir": str(out_dir),
        "srSeriesUid": sr_series_uid,
        "ctSeriesUid": ct_series_uid,
        "ctSopUid": ct_sop_uid,
        "jumpToRow": jump_to_row,
        "chromium": CHROMIUM,
        "timeoutMs": int(timeout * 1000),
    }
    result_path = out_dir / "result.json"
    result_path.unlink(missing_ok=True)
    # Its own process group: if the script hangs past its own bound, Chromium goes with it.
    process = subprocess.Popen(
        ["node", str(SCRIPT), json.dumps(request)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        cwd=VIEWER, env={**os.environ, "PUPPETEER_SKIP_DOWNLOAD": "1"}, start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout + 30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        raise RuntimeError(f"view-study.mjs did not finish in {timeout + 30} s: {output[-4000:]}") from None
    (out_dir / "view-study.log").write_text(output)
    if not result_path.is_file():
        raise RuntimeError(f"view-study.mjs failed ({process.returncode}): {output[-4000:]}")
    raw = json.loads(result_path.read_text())
    viewport = raw.get("viewport") or {}
    return ViewerResult(
        console_errors=[*raw["consoleErrors"], *raw["pageErrors"]],
        measurement_labels=raw["measurementRows"],
        screenshots={name: out_dir / file for name, file in raw["screenshots"].items() if file},
        viewport_box=raw.get("viewportBox"),
        canvas_box=viewport.get("canvasBox"),
        sr_opened=bool(raw.get("srOpened")),
        hydrated=bool((raw.get("sr") or {}).get("isHydrated")),
        error=raw.get("error"),
        raw=raw,
        server_failures=list(server.failed),
    )


def annotation_pixels(png: Path, box: dict[str, float] | None = None) -> np.ndarray:
    """(row, column) of the pixels of ``png`` (within ``box``, if given) in a cornerstone annotation colour.

    Annotations are drawn yellow (rgb 255, 255, 0), selected ones green (0, 255, 0); a CT image is grey and OHIF's
    overlays are white or blue, so "green channel high, blue channel low" picks the annotations alone.
    """
    from PIL import Image

    rgb = np.asarray(Image.open(png).convert("RGB")).astype(int)
    mask = (rgb[..., 1] > 180) & (rgb[..., 2] < 100)
    if box is not None:
        inside = np.zeros_like(mask)
        top, left = max(int(box["y"]), 0), max(int(box["x"]), 0)
        inside[top : int(box["y"] + box["height"]), left : int(box["x"] + box["width"])] = True
        mask &= inside
    return np.argwhere(mask)
