"""Security: DICOM TLS with client certificates from a CA made here, and the dataset size limit."""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from pe_node.dicom.scu import Peer, send_files
from tests.dicom_factory import write_ct_series
from tests.integration.conftest import needs_dcmtk
from tests.peers import run_dcmtk

pytestmark = pytest.mark.peer("openssl")


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all made for this test."""
    root = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=pe-node test CA",
            "-keyout", "ca.key", "-out", "ca.crt", cwd=root)
    (root / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN=pe-node {name}", "-keyout", f"{name}.key",
                "-out", f"{name}.csr", cwd=root)
        extra = ["-extfile", "server.ext"] if name == "server" else []
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-days", "2", "-out", f"{name}.crt", *extra, cwd=root)
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=stranger",
            "-keyout", "stranger.key", "-out", "stranger.crt", cwd=root)
    return root


def tls_node(start_node, pki: Path):
    return start_node(node={"tls": {"certificate": str(pki / "server.crt"), "private_key": str(pki / "server.key"),
                                    "ca_certificates": str(pki / "ca.crt"), "require_client_certificate": True}})


def client_context(pki: Path, name: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki / "ca.crt"))
    if name is not None:
        context.load_cert_chain(pki / f"{name}.crt", pki / f"{name}.key")
    return context


def echo(port: int, context: ssl.SSLContext | None) -> bool:
    ae = AE(ae_title="TLSSCU")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 10
    tls = (context, "127.0.0.1") if context is not None else None
    assoc = ae.associate("127.0.0.1", port, ae_title="PE_NODE", tls_args=tls)
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo().Status
    assoc.release()
    return status == 0


def test_tls_with_a_client_certificate_from_the_ca(start_node, pki: Path) -> None:
    node = tls_node(start_node, pki)
    assert echo(node.port, client_context(pki, "client"))
    assert not echo(node.port, client_context(pki, None)), "no client certificate"
    assert not echo(node.port, client_context(pki, "stranger")), "a certificate from another CA"
    assert not echo(node.port, None), "plain TCP on the TLS port"
    assert "TLS handshake" in node.log()


@needs_dcmtk
def test_dcmtk_storescu_over_tls(start_node, pki: Path, tmp_path: Path) -> None:
    node = tls_node(start_node, pki)
    files = write_ct_series(tmp_path / "ct", n_slices=2, size=32)
    result = run_dcmtk("storescu", "+tls", str(pki / "client.key"), str(pki / "client.crt"), "+cf",
                       str(pki / "ca.crt"), "-aec", "PE_NODE", "127.0.0.1", str(node.port), *map(str, files))
    assert result.returncode == 0, result.stderr
    assert len(list((node.root / "dicom").rglob("*.dcm"))) == 2


def test_dataset_over_the_size_limit_is_refused_and_the_association_goes_on(start_node, tmp_path: Path) -> None:
    node = start_node(node={"max_dataset_mb": 0.1})
    small, big = write_ct_series(tmp_path / "small", n_slices=1, size=64) + \
        write_ct_series(tmp_path / "big", n_slices=1, size=512)
    [refused, stored] = send_files([big, small], Peer("PE_NODE", "127.0.0.1", node.port))
    assert refused.status == 0xA700 and "node.max_dataset_mb" in refused.error
    assert stored.status == 0, "the same association carries on"
    assert [p.name for p in (node.root / "dicom").rglob("*.dcm")] == [f"{stored.sop_instance_uid}.dcm"]


