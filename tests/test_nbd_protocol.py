"""The sans-I/O NBD protocol, fed canned bytes: no sockets, no event loop."""

from __future__ import annotations

import struct
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.nbd.backend import ExportBase
from common.nbd.constants import (
    BASE_ALLOCATION,
    IHAVEOPT,
    MAX_PAYLOAD,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STATE_HOLE,
    STATE_ZERO,
    STRUCTURED_REPLY_MAGIC,
    Cmd,
    CmdFlag,
    Errno,
    Info,
    Opt,
    Rep,
    ReplyType,
    TransmissionFlag,
)
from common.nbd.errors import LocalProtocolError, RemoteProtocolError
from common.nbd.events import (
    NEED_DATA,
    Aborted,
    Disconnect,
    Request,
    StartTLS,
    State,
    TLSMode,
    TransmissionStarted,
)
from common.nbd.protocol import ServerConnection

SIZE = 1 << 20


class MemExport(ExportBase):
    """Metadata only: the protocol layer never calls the I/O methods."""

    def __init__(self, name: str = "disk", *, read_only: bool = False) -> None:
        self.name = name
        self.size = SIZE
        self.read_only = read_only
        self.description = "a test disk"
        self.can_flush = True
        self.can_trim = True
        self.can_write_zeroes = True
        self.can_multi_conn = True
        self.can_cache = True


# --- canned client bytes --------------------------------------------------------------------------


def option(opt: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, opt, len(data)) + data


def go_data(name: str, *infos: int) -> bytes:
    raw = name.encode()
    return struct.pack(">I", len(raw)) + raw + struct.pack(f">H{len(infos)}H", len(infos), *infos)


def meta_data(name: str, *queries: str) -> bytes:
    raw = name.encode()
    out = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    for q in queries:
        out += struct.pack(">I", len(q)) + q.encode()
    return out


def request(
    cmd: int, offset: int = 0, length: int = 0, *, flags: int = 0, handle: int = 7
) -> bytes:
    return struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, handle, offset, length)


def parse_option_replies(data: bytes) -> list[tuple[int, int, bytes]]:
    """(option, reply type, payload) for each option reply in ``data``."""
    out = []
    pos = 0
    while pos < len(data):
        magic, opt, rep, length = struct.unpack_from(">QIII", data, pos)
        assert magic == OPTION_REPLY_MAGIC
        out.append((opt, rep, data[pos + 20 : pos + 20 + length]))
        pos += 20 + length
    return out


def drain(conn: ServerConnection) -> list[object]:
    events: list[object] = []
    while (event := conn.next_event()) is not NEED_DATA:
        events.append(event)
    return events


def sent(conn: ServerConnection) -> bytes:
    return b"".join(conn.data_to_send())


def negotiated(
    *,
    structured: bool = True,
    meta: bool = True,
    read_only: bool = False,
    exports: Sequence[MemExport] | None = None,
) -> ServerConnection:
    """A connection that went through the handshake and is in transmission on ``disk``."""
    items = exports or [MemExport(read_only=read_only)]
    conn = ServerConnection({e.name: e for e in items})
    stream = struct.pack(">I", 3)
    if structured:
        stream += option(Opt.STRUCTURED_REPLY)
        if meta:
            stream += option(Opt.SET_META_CONTEXT, meta_data("disk", BASE_ALLOCATION))
    stream += option(Opt.GO, go_data("disk"))
    conn.receive_data(stream)
    events = drain(conn)
    assert isinstance(events[-1], TransmissionStarted)
    sent(conn)
    return conn


def simple_reply(data: bytes) -> tuple[int, int]:
    magic, error, handle = struct.unpack(">IIQ", data[:16])
    assert magic == SIMPLE_REPLY_MAGIC
    return error, handle


def structured_error(data: bytes) -> tuple[int, int, str]:
    magic, flags, rtype, handle, _length = struct.unpack_from(">IHHQI", data)
    assert magic == STRUCTURED_REPLY_MAGIC
    assert flags & 1
    assert rtype == ReplyType.ERROR
    error, mlen = struct.unpack_from(">IH", data, 20)
    return error, handle, data[26 : 26 + mlen].decode()


# --- handshake ------------------------------------------------------------------------------------


def test_greeting_is_fixed_newstyle_with_no_zeroes() -> None:
    """The server opens with NBDMAGIC, IHAVEOPT and FIXED_NEWSTYLE|NO_ZEROES, nothing else."""
    conn = ServerConnection({})
    assert sent(conn) == struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 0b11)
    assert conn.state is State.CLIENT_FLAGS


def test_unknown_client_flags_end_the_connection() -> None:
    """Client flags we did not offer are a MUST-disconnect."""
    conn = ServerConnection({})
    conn.receive_data(struct.pack(">I", 1 << 5))
    with pytest.raises(RemoteProtocolError) as err:
        conn.next_event()
    assert err.value.reason == "unknown_client_flags"
    assert conn.state is State.CLOSED


def test_go_sends_info_export_block_size_and_ack() -> None:
    """GO answers INFO_EXPORT (size, flags), the requested BLOCK_SIZE and NAME, then ACK."""
    conn = ServerConnection({"disk": MemExport()})
    sent(conn)
    conn.receive_data(
        struct.pack(">I", 3) + option(Opt.GO, go_data("disk", Info.BLOCK_SIZE, Info.NAME))
    )
    [event] = drain(conn)
    assert isinstance(event, TransmissionStarted)
    assert not event.structured_replies
    replies = parse_option_replies(sent(conn))
    assert [r[1] for r in replies] == [Rep.INFO, Rep.INFO, Rep.INFO, Rep.ACK]
    kind, size, flags = struct.unpack(">HQH", replies[0][2])
    assert (kind, size) == (Info.EXPORT, SIZE)
    assert flags & TransmissionFlag.SEND_FLUSH
    assert flags & TransmissionFlag.SEND_FUA
    assert flags & TransmissionFlag.CAN_MULTI_CONN
    assert not flags & TransmissionFlag.SEND_DF  # no structured replies, so no DF
    assert replies[1][2] == struct.pack(">H", Info.NAME) + b"disk"
    assert struct.unpack(">HIII", replies[2][2]) == (Info.BLOCK_SIZE, 1, 4096, MAX_PAYLOAD)
    assert conn.state is State.TRANSMISSION


@pytest.mark.parametrize(("client_flags", "length"), [(3, 10), (1, 134)])
def test_export_name_reply_honours_no_zeroes(client_flags: int, length: int) -> None:
    """EXPORT_NAME answers size + flags, plus 124 zero bytes unless the client chose NO_ZEROES."""
    conn = ServerConnection({"disk": MemExport()})
    sent(conn)
    conn.receive_data(struct.pack(">I", client_flags) + option(Opt.EXPORT_NAME, b"disk"))
    [event] = drain(conn)
    assert isinstance(event, TransmissionStarted)
    reply = sent(conn)
    assert len(reply) == length
    assert struct.unpack_from(">Q", reply)[0] == SIZE


def test_export_name_of_unknown_export_hangs_up() -> None:
    """EXPORT_NAME cannot carry an error, so an unknown name ends the session."""
    conn = ServerConnection({"disk": MemExport()})
    conn.receive_data(struct.pack(">I", 3) + option(Opt.EXPORT_NAME, b"nope"))
    with pytest.raises(RemoteProtocolError) as err:
        drain(conn)
    assert err.value.reason == "unknown_export"


def test_empty_name_means_the_default_export() -> None:
    """The empty export name resolves to ``default_export``."""
    conn = ServerConnection({"disk": MemExport()}, default_export="disk")
    conn.receive_data(struct.pack(">I", 3) + option(Opt.GO, go_data("")))
    [event] = drain(conn)
    assert isinstance(event, TransmissionStarted)
    assert event.export.name == "disk"


def test_unknown_options_are_unsupported_and_negotiation_continues() -> None:
    """Unknown options and EXTENDED_HEADERS get ERR_UNSUP; a following GO still works."""
    conn = ServerConnection({"disk": MemExport()})
    sent(conn)
    conn.receive_data(
        struct.pack(">I", 3)
        + option(99, b"whatever")
        + option(Opt.EXTENDED_HEADERS)
        + option(Opt.GO, go_data("nope"))
        + option(Opt.GO, go_data("disk"))
    )
    [event] = drain(conn)
    assert isinstance(event, TransmissionStarted)
    reps = [(o, r) for o, r, _ in parse_option_replies(sent(conn))]
    assert reps[:3] == [
        (99, Rep.ERR_UNSUP),
        (Opt.EXTENDED_HEADERS, Rep.ERR_UNSUP),
        (Opt.GO, Rep.ERR_UNKNOWN),
    ]
    assert reps[-1] == (Opt.GO, Rep.ACK)


def test_list_names_every_export_then_acks() -> None:
    """LIST sends one SERVER reply per export, then ACK."""
    conn = ServerConnection({"a": MemExport("a"), "b": MemExport("b")})
    sent(conn)
    conn.receive_data(struct.pack(">I", 3) + option(Opt.LIST))
    assert drain(conn) == []
    replies = parse_option_replies(sent(conn))
    assert [(r, p) for _, r, p in replies] == [
        (Rep.SERVER, b"\0\0\0\x01a"),
        (Rep.SERVER, b"\0\0\0\x01b"),
        (Rep.ACK, b""),
    ]


def test_abort_is_acknowledged() -> None:
    """ABORT gets ACK and an Aborted event; later input is ignored."""
    conn = ServerConnection({})
    sent(conn)
    conn.receive_data(struct.pack(">I", 3) + option(Opt.ABORT) + b"trailing garbage")
    assert drain(conn) == [Aborted()]
    assert parse_option_replies(sent(conn)) == [(Opt.ABORT, Rep.ACK, b"")]
    assert conn.state is State.CLOSED


def test_bad_option_magic_and_huge_options_end_the_connection() -> None:
    """Garbage where an option header belongs, or a 1 GiB option, is a hard disconnect."""
    conn = ServerConnection({})
    conn.receive_data(struct.pack(">I", 3) + b"GET / HTTP/1.1\r\n\r\n")
    with pytest.raises(RemoteProtocolError) as err:
        drain(conn)
    assert err.value.reason == "bad_option_magic"
    conn = ServerConnection({})
    conn.receive_data(struct.pack(">I", 3) + struct.pack(">QII", IHAVEOPT, Opt.GO, 1 << 30))
    with pytest.raises(RemoteProtocolError) as err:
        drain(conn)
    assert err.value.reason == "option_too_long"


def test_meta_context_needs_structured_replies_and_selects_base_allocation() -> None:
    """SET_META_CONTEXT before STRUCTURED_REPLY is invalid; after it, base:allocation gets id 1."""
    conn = ServerConnection({"disk": MemExport()})
    sent(conn)
    conn.receive_data(
        struct.pack(">I", 3)
        + option(Opt.SET_META_CONTEXT, meta_data("disk", BASE_ALLOCATION))
        + option(Opt.STRUCTURED_REPLY)
        + option(Opt.LIST_META_CONTEXT, meta_data("disk"))
        + option(Opt.SET_META_CONTEXT, meta_data("disk", "x-other:thing", BASE_ALLOCATION))
        + option(Opt.GO, go_data("disk"))
    )
    [event] = drain(conn)
    assert isinstance(event, TransmissionStarted)
    assert event.structured_replies
    assert event.base_allocation
    assert event.transmission_flags & TransmissionFlag.SEND_DF
    replies = [(o, r, p) for o, r, p in parse_option_replies(sent(conn))]
    assert replies[0][:2] == (Opt.SET_META_CONTEXT, Rep.ERR_INVALID)
    assert replies[1][:2] == (Opt.STRUCTURED_REPLY, Rep.ACK)
    assert replies[2] == (Opt.LIST_META_CONTEXT, Rep.META_CONTEXT, b"\0\0\0\0" + b"base:allocation")
    assert replies[3][:2] == (Opt.LIST_META_CONTEXT, Rep.ACK)
    assert replies[4] == (Opt.SET_META_CONTEXT, Rep.META_CONTEXT, b"\0\0\0\x01base:allocation")
    assert replies[5][:2] == (Opt.SET_META_CONTEXT, Rep.ACK)


def test_meta_context_for_another_export_is_forgotten_on_go() -> None:
    """Contexts selected for export A do not apply when the client then opens export B."""
    conn = ServerConnection({"a": MemExport("a"), "b": MemExport("b")})
    conn.receive_data(
        struct.pack(">I", 3)
        + option(Opt.STRUCTURED_REPLY)
        + option(Opt.SET_META_CONTEXT, meta_data("a", BASE_ALLOCATION))
        + option(Opt.GO, go_data("b"))
    )
    [event] = drain(conn)
    assert isinstance(event, TransmissionStarted)
    assert not event.base_allocation


def test_notls_listener_refuses_starttls_by_policy() -> None:
    """Without TLS configured, STARTTLS gets ERR_POLICY and negotiation continues in clear."""
    conn = ServerConnection({"disk": MemExport()})
    sent(conn)
    conn.receive_data(struct.pack(">I", 3) + option(Opt.STARTTLS) + option(Opt.GO, go_data("disk")))
    [event] = drain(conn)
    assert isinstance(event, TransmissionStarted)
    assert parse_option_replies(sent(conn))[0][:2] == (Opt.STARTTLS, Rep.ERR_POLICY)


def test_forced_tls_refuses_options_until_starttls() -> None:
    """With TLS required: options get ERR_TLS_REQD, STARTTLS is acked, then GO works."""
    conn = ServerConnection({"disk": MemExport()}, tls=TLSMode.REQUIRED)
    sent(conn)
    conn.receive_data(struct.pack(">I", 3) + option(Opt.LIST) + option(Opt.GO, go_data("disk")))
    assert drain(conn) == []
    assert [r for _, r, _ in parse_option_replies(sent(conn))] == [Rep.ERR_TLS_REQD] * 2
    conn.receive_data(option(Opt.STARTTLS))
    assert drain(conn) == [StartTLS()]
    assert parse_option_replies(sent(conn)) == [(Opt.STARTTLS, Rep.ACK, b"")]
    assert conn.state is State.TLS_PENDING
    conn.tls_established()
    conn.receive_data(option(Opt.STARTTLS) + option(Opt.GO, go_data("disk")))
    [event] = drain(conn)
    assert isinstance(event, TransmissionStarted)
    assert parse_option_replies(sent(conn))[0][:2] == (Opt.STARTTLS, Rep.ERR_INVALID)


def test_forced_tls_hangs_up_on_export_name_and_pipelined_starttls() -> None:
    """EXPORT_NAME before TLS, or bytes pipelined behind STARTTLS, end the session."""
    conn = ServerConnection({"disk": MemExport()}, tls=TLSMode.REQUIRED)
    conn.receive_data(struct.pack(">I", 3) + option(Opt.EXPORT_NAME, b"disk"))
    with pytest.raises(RemoteProtocolError) as err:
        drain(conn)
    assert err.value.reason == "tls_required"
    conn = ServerConnection({"disk": MemExport()}, tls=TLSMode.REQUIRED)
    conn.receive_data(struct.pack(">I", 3) + option(Opt.STARTTLS) + b"\x16\x03\x01")
    with pytest.raises(RemoteProtocolError) as err:
        drain(conn)
    assert err.value.reason == "data_after_starttls"
    with pytest.raises(LocalProtocolError):
        conn.tls_established()


# --- transmission ---------------------------------------------------------------------------------


def test_write_request_carries_its_payload() -> None:
    """A WRITE becomes one Request whose data is exactly the payload, however it is split."""
    conn = negotiated()
    stream = request(Cmd.WRITE, 4096, 5, flags=CmdFlag.FUA, handle=42) + b"hello"
    stream += request(Cmd.READ, 0, 512, handle=43)
    events = []
    for i in range(len(stream)):  # one byte at a time
        conn.receive_data(stream[i : i + 1])
        for event in drain(conn):
            assert isinstance(event, Request)
            events.append((event.cmd, event.flags, event.handle, event.offset, event.length))
            if event.cmd == Cmd.WRITE:
                assert event.data is not None
                assert bytes(event.data) == b"hello"
    assert events == [(Cmd.WRITE, CmdFlag.FUA, 42, 4096, 5), (Cmd.READ, 0, 43, 0, 512)]


def test_read_replies_simple_and_structured() -> None:
    """Simple READ replies are header + data; structured ones one OFFSET_DATA chunk with DONE."""
    simple = negotiated(structured=False)
    header, data = simple.reply_read(9, 4096, b"abc")
    assert simple_reply(header) == (0, 9)
    assert data == b"abc"
    structured = negotiated()
    header, data = structured.reply_read(9, 4096, b"abc")
    assert struct.unpack(">IHHQIQ", header) == (
        STRUCTURED_REPLY_MAGIC,
        1,
        ReplyType.OFFSET_DATA,
        9,
        8 + 3,
        4096,
    )
    header, data = structured.reply_read(9, 0, b"")
    assert struct.unpack(">IHHQI", header) == (STRUCTURED_REPLY_MAGIC, 1, ReplyType.NONE, 9, 0)


@pytest.mark.parametrize("structured", [False, True])
def test_out_of_range_requests_are_refused_here(structured: bool) -> None:
    """Past the end READ, TRIM, BLOCK_STATUS, CACHE are EINVAL, WRITE and WRITE_ZEROES ENOSPC."""
    conn = negotiated(structured=structured)
    conn.receive_data(
        request(Cmd.READ, SIZE - 1, 2, handle=1)
        + request(Cmd.WRITE, SIZE, 3, handle=2)
        + b"xyz"
        + request(Cmd.TRIM, SIZE - 512, 1024, handle=3)
        + request(Cmd.WRITE_ZEROES, SIZE - 512, 1024, handle=4)
        + request(Cmd.CACHE, SIZE, 1, handle=5)
        + request(Cmd.BLOCK_STATUS, SIZE - 1, 2, handle=6)
        + request(Cmd.FLUSH, handle=7)
    )
    [event] = drain(conn)
    assert isinstance(event, Request)
    assert event.cmd == Cmd.FLUSH
    expected = [
        (Errno.EINVAL, 1),
        (Errno.ENOSPC, 2),
        (Errno.EINVAL, 3),
        (Errno.ENOSPC, 4),
        (Errno.EINVAL, 5),
        (Errno.EINVAL, 6),
    ]
    out = conn.data_to_send()
    if structured:
        assert [structured_error(b)[:2] for b in out] == expected
    else:
        assert [simple_reply(b) for b in out] == expected


def test_read_only_exports_refuse_writes_with_eperm() -> None:
    """WRITE, TRIM and WRITE_ZEROES on a read-only export are EPERM; READ still works."""
    conn = negotiated(read_only=True, structured=False)
    conn.receive_data(
        request(Cmd.WRITE, 0, 2, handle=1)
        + b"hi"
        + request(Cmd.TRIM, 0, 512, handle=2)
        + request(Cmd.WRITE_ZEROES, 0, 512, handle=3)
        + request(Cmd.READ, 0, 512, handle=4)
    )
    [event] = drain(conn)
    assert isinstance(event, Request)
    assert event.cmd == Cmd.READ
    assert [simple_reply(b) for b in conn.data_to_send()] == [
        (Errno.EPERM, 1),
        (Errno.EPERM, 2),
        (Errno.EPERM, 3),
    ]


def test_oversized_requests_are_einval_and_the_stream_stays_in_sync() -> None:
    """A WRITE over the maximum is skipped, not buffered, and refused only after its payload."""
    conn = negotiated(structured=False)
    big = MAX_PAYLOAD + 1
    conn.receive_data(request(Cmd.READ, 0, big, handle=1) + request(Cmd.WRITE, 0, big, handle=2))
    assert drain(conn) == []
    assert [simple_reply(b) for b in conn.data_to_send()] == [(Errno.EINVAL, 1)]
    chunk = bytes(1 << 20)
    remaining = big
    while remaining > 1:
        n = min(remaining - 1, len(chunk))
        conn.receive_data(chunk[:n])
        assert drain(conn) == []
        remaining -= n
        # libnbd drops a connection whose reply arrives before the request was fully sent.
        assert conn.data_to_send() == [], f"replied with {remaining} payload bytes unsent"
        assert conn.buffered == 0
    conn.receive_data(b"\0" + request(Cmd.FLUSH, handle=3))
    [event] = drain(conn)
    assert isinstance(event, Request)
    assert event.handle == 3
    assert [simple_reply(b) for b in conn.data_to_send()] == [(Errno.EINVAL, 2)]
    assert conn.buffered == 0


def test_unknown_commands_bad_flags_and_missing_contexts_are_einval() -> None:
    """Unknown commands, flags not valid for a command and BLOCK_STATUS without a context."""
    conn = negotiated(meta=False)
    conn.receive_data(
        request(42, handle=1)
        + request(Cmd.READ, 0, 512, flags=CmdFlag.NO_HOLE, handle=2)
        + request(Cmd.BLOCK_STATUS, 0, 512, handle=3)
        + request(Cmd.WRITE_ZEROES, 0, 512, flags=CmdFlag.FAST_ZERO, handle=4)
    )
    assert drain(conn) == []
    errors = [structured_error(b) for b in conn.data_to_send()]
    assert [(e, h) for e, h, _ in errors] == [(Errno.EINVAL, h) for h in (1, 2, 3, 4)]
    assert "not supported" in errors[0][2]


def test_bad_request_magic_ends_the_connection() -> None:
    """Garbage in the transmission phase cannot be resynchronised: hard disconnect."""
    conn = negotiated()
    conn.receive_data(b"\xde\xad\xbe\xef" + bytes(24))
    with pytest.raises(RemoteProtocolError) as err:
        conn.next_event()
    assert err.value.reason == "bad_request_magic"
    assert conn.state is State.CLOSED
    assert conn.next_event() is NEED_DATA


def test_disc_ends_transmission() -> None:
    """NBD_CMD_DISC is an event and nothing after it is parsed."""
    conn = negotiated()
    conn.receive_data(request(Cmd.DISC) + request(Cmd.READ, 0, 1))
    assert drain(conn) == [Disconnect()]


def test_block_status_reply_is_clipped_to_the_request() -> None:
    """Extents are clipped to the request, empty ones dropped; REQ_ONE keeps only the first."""
    conn = negotiated()
    reply = conn.reply_block_status(5, 1000, [(0, 0), (600, 0), (600, STATE_HOLE)], req_one=False)
    _magic, _flags, rtype, handle, length = struct.unpack_from(">IHHQI", reply)
    assert (rtype, handle, length) == (ReplyType.BLOCK_STATUS, 5, 4 + 16)
    assert struct.unpack_from(">5I", reply, 20) == (1, 600, 0, 400, STATE_HOLE)
    reply = conn.reply_block_status(5, 1000, [(10, STATE_ZERO), (990, 0)], req_one=True)
    assert struct.unpack_from(">3I", reply, 20) == (1, 10, STATE_ZERO)
    reply = conn.reply_block_status(5, 1000, [], req_one=False)
    assert struct.unpack_from(">3I", reply, 20) == (1, 1000, 0)


# --- properties -----------------------------------------------------------------------------------


def _canned_session() -> tuple[bytes, list[tuple[int, int, int, int, bytes | None]]]:
    stream = struct.pack(">I", 3) + option(Opt.STRUCTURED_REPLY) + option(Opt.GO, go_data("disk"))
    expected: list[tuple[int, int, int, int, bytes | None]] = []
    for i in range(20):
        payload = bytes([i]) * (i * 37 % 600 + 1)
        stream += request(Cmd.WRITE, i * 4096, len(payload), handle=i) + payload
        expected.append((Cmd.WRITE, i, i * 4096, len(payload), payload))
        stream += request(Cmd.READ, i * 512, 512, handle=100 + i)
        expected.append((Cmd.READ, 100 + i, i * 512, 512, None))
    return stream, expected


def _large_session() -> tuple[bytes, list[tuple[int, int, int, int, bytes | None]]]:
    stream = struct.pack(">I", 3) + option(Opt.GO, go_data("disk"))
    expected: list[tuple[int, int, int, int, bytes | None]] = []
    for i, size in enumerate((70_000, 300_000, 65_536, 1_000_000, 90_000)):
        payload = bytes([i + 1]) * size
        stream += request(Cmd.WRITE, 0, size, handle=i) + payload
        expected.append((Cmd.WRITE, i, 0, size, payload))
        stream += request(Cmd.FLUSH, handle=50 + i)
        expected.append((Cmd.FLUSH, 50 + i, 0, 0, None))
    return stream, expected


def _feed_in_pieces(
    stream: bytes, cuts: list[int]
) -> list[tuple[int, int, int, int, bytes | None]]:
    """Feed ``stream`` through get_buffer/buffer_updated in pieces of the given sizes."""
    conn = ServerConnection({"disk": MemExport()})
    got: list[tuple[int, int, int, int, bytes | None]] = []
    pos = 0
    for size in [*cuts, len(stream)]:
        chunk = stream[pos : pos + size]
        pos += len(chunk)
        while chunk:
            view = conn.get_buffer(len(chunk))
            n = min(len(view), len(chunk))
            view[:n] = chunk[:n]
            conn.buffer_updated(n)
            chunk = chunk[n:]
            for event in drain(conn):
                if isinstance(event, Request):
                    data = bytes(event.data) if event.data is not None else None
                    got.append((event.cmd, event.handle, event.offset, event.length, data))
    return got


@settings(max_examples=60, deadline=None)
@given(cuts=st.lists(st.integers(min_value=1, max_value=700), max_size=40))
def test_any_split_of_the_input_yields_the_same_events(cuts: list[int]) -> None:
    """TCP may split the stream anywhere: the events never depend on where."""
    stream, expected = _canned_session()
    assert _feed_in_pieces(stream, cuts) == expected


@settings(max_examples=30, deadline=None)
@given(cuts=st.lists(st.integers(min_value=1, max_value=400_000), max_size=12))
def test_large_writes_survive_any_split(cuts: list[int]) -> None:
    """Large WRITEs (bounded reads, rewinds, compaction, growth) arrive intact however split."""
    stream, expected = _large_session()
    assert _feed_in_pieces(stream, cuts) == expected


@settings(max_examples=200, deadline=None)
@given(garbage=st.binary(max_size=300), in_transmission=st.booleans())
def test_garbage_only_ever_raises_remote_protocol_errors(
    garbage: bytes, in_transmission: bool
) -> None:
    """Whatever a client sends, the protocol answers, waits or raises RemoteProtocolError."""
    conn = negotiated() if in_transmission else ServerConnection({"disk": MemExport()})
    conn.receive_data(garbage)
    try:
        drain(conn)
    except RemoteProtocolError:
        assert conn.state is State.CLOSED
