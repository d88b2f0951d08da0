"""The upper-layer parsers a peer's bytes go through (``pe_node.dicom.pdu``): property-based, with pynetdicom and
pydicom as the oracles that encode or decode the same bytes, and the bounds on memory and time of the reader."""

from __future__ import annotations

import io
import struct
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.filereader import data_element_generator
from pydicom.uid import UID
from pynetdicom import pdu as ul_pdu
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    P_DATA,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import PresentationContext

from pe_node.dicom import pdu
from pe_node.dicom.pdu import PduReader, PeerClosed, ProtocolError

PROPERTY = settings(max_examples=60, derandomize=True, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

uids = st.lists(st.integers(0, 10**12), min_size=2, max_size=8).map(lambda parts: ".".join(map(str, parts))).filter(
    lambda uid: len(uid) <= 64)
ae_titles = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="\\"),
                    min_size=1, max_size=16)


class FakeSocket:
    """Serves ``data`` in pieces of the given sizes (then closes), as a socket would after network fragmentation."""

    def __init__(self, data: bytes, pieces: list[int] | None = None) -> None:
        self.data = data
        self.offset = 0
        self.pieces = list(pieces or [])
        self.timeouts: list[float | None] = []

    def recv_into(self, buffer: memoryview, nbytes: int = 0, /) -> int:
        size = min(len(buffer), len(self.data) - self.offset)
        if self.pieces:
            size = min(size, max(1, self.pieces.pop(0)))
        buffer[:size] = self.data[self.offset : self.offset + size]
        self.offset += size
        return size

    def settimeout(self, value: float | None, /) -> None:
        self.timeouts.append(value)


def reader(data: bytes, pieces: list[int] | None = None, buffer_size: int = 64) -> PduReader:
    return PduReader(FakeSocket(data, pieces), timeout=10, min_rate=1024, buffer_size=buffer_size)


def read_pdvs(data: bytes, pieces: list[int] | None = None) -> list[tuple[int, int, bytes]]:
    """Every PDV of one P-DATA-TF PDU, read the way the acceptor reads them."""
    source = reader(data, pieces)
    pdu_type, length = source.pdu_header()
    assert pdu_type == pdu.P_DATA
    return [(cx, control, source.read(size)) for cx, control, size in pdu.pdv_headers(source, length)]


pdvs = st.lists(
    st.tuples(st.integers(1, 255), st.integers(0, 3), st.binary(max_size=40)).filter(
        lambda item: item[2] or item[1] & 0x02), min_size=1, max_size=8)


@PROPERTY
@given(items=pdvs, pieces=st.lists(st.integers(1, 30), max_size=20))
def test_pdvs_read_back_as_pynetdicom_encodes_them(items: list[tuple[int, int, bytes]], pieces: list[int]) -> None:
    primitive = P_DATA()
    primitive.presentation_data_value_list = [[cx, bytes([control]) + data] for cx, control, data in items]
    encoded = ul_pdu.P_DATA_TF()
    encoded.from_primitive(primitive)
    assert read_pdvs(encoded.encode(), pieces) == items


def pdv_body(items: list[tuple[int, int, bytes]]) -> bytes:
    return b"".join(struct.pack(">IBB", len(data) + 2, cx, control) + data for cx, control, data in items)


damaged_bodies = st.one_of(
    st.binary(max_size=200),
    st.tuples(pdvs.map(pdv_body), st.none() | st.integers(0, 400), st.just(b"") | st.binary(max_size=8)).map(
        lambda parts: parts[0][: parts[1]] + parts[2]),
)


@PROPERTY
@given(body=damaged_bodies)
def test_any_pdata_body_reads_as_pynetdicom_decodes_it_or_is_refused(body: bytes) -> None:
    data = struct.pack(">BBI", 4, 0, len(body)) + body
    try:
        ours = read_pdvs(data)
    except ProtocolError:
        return
    decoded = ul_pdu.P_DATA_TF()
    decoded.decode(data)
    theirs = [(item.presentation_context_id, item.presentation_data_value[0], item.presentation_data_value[1:])
              for item in decoded.presentation_data_value_items]
    assert ours == theirs


def test_an_empty_fragment_that_is_not_the_last_is_refused() -> None:
    body = struct.pack(">IBB", 2, 1, 0x00)
    with pytest.raises(ProtocolError, match="empty presentation data value"):
        read_pdvs(struct.pack(">BBI", 4, 0, len(body)) + body)
    assert read_pdvs(struct.pack(">BBI", 4, 0, 6) + struct.pack(">IBB", 2, 1, 0x02)) == [(1, 2, b"")]


def test_a_claimed_length_allocates_nothing_up_front() -> None:
    source = reader(struct.pack(">BBI", 1, 0, 1 << 30) + b"x" * 100, buffer_size=1 << 16)
    tracemalloc.start()
    try:
        _, length = source.pdu_header()
        with pytest.raises(PeerClosed, match="mid-PDU"):
            source.read(length)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"{peak} bytes for a PDU that claimed 1 GiB and brought 100 bytes"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class SlowSocket(FakeSocket):
    """One byte per receive, each after ``seconds`` of the fake clock."""

    def __init__(self, data: bytes, clock: Clock, seconds: float) -> None:
        super().__init__(data, [1] * len(data))
        self.clock = clock
        self.seconds = seconds

    def recv_into(self, buffer: memoryview, nbytes: int = 0, /) -> int:
        assert self.timeouts[-1] is not None and self.timeouts[-1] > 0, "every wait is bounded"
        self.clock.now += self.seconds
        return super().recv_into(buffer, nbytes)


def test_a_trickled_pdu_is_cut_off_at_its_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr(pdu.time, "monotonic", clock)
    sock = SlowSocket(struct.pack(">BBI", 4, 0, 1000) + b"\x00" * 1000, clock, seconds=1.0)
    source = PduReader(sock, timeout=5, min_rate=1024)
    started = clock.now
    with pytest.raises(ProtocolError, match="a PDU took longer than 5 s"):
        _, length = source.pdu_header()
        source.read(length)
    assert clock.now - started <= 7, "cut off at the PDU deadline, not after the whole PDU"
    assert max(t for t in sock.timeouts if t is not None) <= 5


def test_a_steady_sender_is_not_cut_off(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr(pdu.time, "monotonic", clock)
    body = b"\x00" * 4000
    sock = SlowSocket(struct.pack(">BBI", 4, 0, len(body)) + body, clock, seconds=0.0005)  # 2 kB/s, 2 s in all
    source = PduReader(sock, timeout=1, min_rate=1024)
    _, length = source.pdu_header()
    assert source.read(length) == body


@st.composite
def store_commands(draw: st.DrawFn) -> tuple[bytes, C_STORE]:
    primitive = C_STORE()
    primitive.MessageID = draw(st.integers(0, 65535))
    primitive.AffectedSOPClassUID = UID(draw(uids))
    primitive.AffectedSOPInstanceUID = UID(draw(uids))
    primitive.Priority = draw(st.sampled_from([0, 1, 2]))
    if draw(st.booleans()):
        primitive.MoveOriginatorApplicationEntityTitle = draw(ae_titles)
        primitive.MoveOriginatorMessageID = draw(st.integers(0, 65535))
    primitive.DataSet = io.BytesIO(b"\x00")
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    raw = encode(message.command_set, True, True)
    assert raw is not None
    return raw, primitive


@PROPERTY
@given(command=store_commands())
def test_a_pynetdicom_command_set_parses_to_its_values(command: tuple[bytes, C_STORE]) -> None:
    raw, primitive = command
    fields = pdu.parse_command(raw)
    assert pdu.command_us(fields, 0x0100) == 0x0001
    assert pdu.command_us(fields, 0x0110) == primitive.MessageID
    assert pdu.command_us(fields, 0x0800) != pdu.NO_DATASET
    assert pdu.command_uid(fields, 0x0002) == primitive.AffectedSOPClassUID
    assert pdu.command_uid(fields, 0x1000) == primitive.AffectedSOPInstanceUID


@PROPERTY
@given(command=store_commands(), cut=st.integers(0, 400), junk=st.binary(max_size=16))
def test_any_command_bytes_parse_as_pydicom_reads_them_or_are_refused(command: tuple[bytes, C_STORE], cut: int,
                                                                      junk: bytes) -> None:
    raw = command[0][:cut] + junk
    try:
        fields = pdu.parse_command(raw)
    except ProtocolError:
        return
    elements = list(data_element_generator(io.BytesIO(raw), True, True))
    assert all(element.tag.group == 0 for element in elements)
    assert {element.tag.element: element.value for element in elements} == fields


@st.composite
def association_requests(draw: st.DrawFn) -> A_ASSOCIATE:
    request = A_ASSOCIATE()
    request.application_context_name = UID("1.2.840.10008.3.1.1.1")
    request.calling_ae_title = draw(ae_titles)
    request.called_ae_title = draw(ae_titles)
    contexts = []
    for number in draw(st.lists(st.integers(0, 127), min_size=1, max_size=6, unique=True)):
        context = PresentationContext()
        context.context_id = 2 * number + 1
        context.abstract_syntax = UID(draw(uids))
        context.transfer_syntax = [UID(ts) for ts in draw(st.lists(uids, min_size=1, max_size=3))]
        contexts.append(context)
    request.presentation_context_definition_list = contexts
    length = MaximumLengthNotification()
    length.maximum_length_received = draw(st.integers(0, 2**32 - 1))
    class_uid = ImplementationClassUIDNotification()
    class_uid.implementation_class_uid = UID(draw(uids))
    roles = []
    for uid in draw(st.lists(uids, max_size=3, unique=True)):
        role = SCP_SCU_RoleSelectionNegotiation()
        role.sop_class_uid = UID(uid)
        role.scu_role, role.scp_role = draw(st.booleans()), True
        roles.append(role)
    request.user_information = [length, class_uid, *roles]
    return request


def encoded_rq(request: A_ASSOCIATE) -> bytes:
    rq = ul_pdu.A_ASSOCIATE_RQ()
    rq.from_primitive(request)
    return bytes(rq.encode())


@PROPERTY
@given(request=association_requests())
def test_a_pynetdicom_association_request_parses_to_its_values(request: A_ASSOCIATE) -> None:
    parsed = pdu.parse_associate_rq(encoded_rq(request)[6:])
    assert parsed.protocol_version == 1
    assert (parsed.calling_ae_title, parsed.called_ae_title) == (request.calling_ae_title.strip(),
                                                                 request.called_ae_title.strip())
    assert parsed.application_context == "1.2.840.10008.3.1.1.1"
    assert [(cx.context_id, cx.abstract_syntax, list(cx.transfer_syntaxes)) for cx in parsed.contexts] == [
        (cx.context_id, cx.abstract_syntax, cx.transfer_syntax) for cx in request.presentation_context_definition_list]
    assert parsed.roles == {
        str(item.sop_class_uid): (item.scu_role, item.scp_role)
        for item in request.user_information if isinstance(item, SCP_SCU_RoleSelectionNegotiation)}


@PROPERTY
@given(request=association_requests(), flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)),
                                                       min_size=1, max_size=4))
def test_a_damaged_association_request_is_parsed_or_refused_never_crashes(
        request: A_ASSOCIATE, flips: list[tuple[int, int]]) -> None:
    body = bytearray(encoded_rq(request)[6:])
    for position, value in flips:
        body[position % len(body)] = value
    try:
        parsed = pdu.parse_associate_rq(bytes(body))
    except ProtocolError:
        return
    assert all(cx.context_id % 2 for cx in parsed.contexts)
    assert all(len(uid) <= 64 for cx in parsed.contexts for uid in (cx.abstract_syntax or "", *cx.transfer_syntaxes))


def test_unknown_items_and_sub_items_are_skipped() -> None:
    request = A_ASSOCIATE()
    request.application_context_name = UID("1.2.840.10008.3.1.1.1")
    request.calling_ae_title, request.called_ae_title = "SCU", "PE_NODE"
    context = PresentationContext()
    context.context_id, context.abstract_syntax, context.transfer_syntax = 1, UID("1.2.3"), [UID("1.2.840.10008.1.2")]
    request.presentation_context_definition_list = [context]
    length = MaximumLengthNotification()
    length.maximum_length_received = 16384
    request.user_information = [length]
    body = encoded_rq(request)[6:]
    unknown = struct.pack(">BBH", 0x3F, 0, 3) + b"abc"
    variable = body[68:]
    user_at = variable.index(b"\x50\x00")
    user_length = struct.unpack(">H", variable[user_at + 2 : user_at + 4])[0]
    user = variable[user_at + 4 : user_at + 4 + user_length] + struct.pack(">BBH", 0x5F, 0, 2) + b"zz"
    rebuilt = body[:68] + unknown + variable[:user_at] + struct.pack(">BBH", 0x50, 0, len(user)) + user
    parsed = pdu.parse_associate_rq(rebuilt)
    assert [(cx.context_id, cx.abstract_syntax) for cx in parsed.contexts] == [(1, "1.2.3")]


def test_stream_hands_over_what_arrived_in_pieces() -> None:
    data = bytes(range(256)) * 40
    source = reader(data, pieces=[7, 300, 1, 2000], buffer_size=512)
    received = bytearray()
    source.stream(len(data), received.extend)
    assert bytes(received) == data
