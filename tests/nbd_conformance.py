"""NBD conformance checks run by libnbd's Python bindings (Debian's python3-libnbd).

Run with Debian's ``/usr/bin/python3`` (the bindings are not in our virtualenv), one check per
process; ``tests/test_nbd_conformance.py`` starts our servers and runs every check against each:

    /usr/bin/python3 tests/nbd_conformance.py CHECK --uri URI [--model-out FILE] [--seed N]

Each check covers what the NBD project's own test client (``nbd-tester-client``) exercises, plus
what libnbd's clients rely on: the handshake and option haggling, oversize and out-of-range
requests, unaligned I/O, FUA and FLUSH, TRIM and WRITE_ZEROES, BLOCK_STATUS, several connections
at once, and a long pipelined mix of reads and writes checked against an in-memory model of the
disk. Every data check compares bytes; with ``--model-out`` the model is written out so the caller
can compare it with the image on the server's side too.

The server must export ``disk`` (writable, at least 33 MiB so a 32 MiB request fits, as the
default export) and ``ro`` (read-only). Exits non-zero with the failed assertion on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import socket
import ssl
import struct
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import nbd

MiB = 1 << 20
MAX_PAYLOAD = 32 * MiB  # the maximum block size our server advertises
BASE_ALLOCATION = "base:allocation"

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
OPT_EXPORT_NAME, OPT_STARTTLS = 1, 5
REP_ACK, REP_ERR_UNSUP = 1, (1 << 31) + 1
CMD_READ, CMD_WRITE, CMD_DISC = 0, 1, 2
EINVAL = 22


class Target:
    """Where the server under test listens, and how to open handles to it."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        parsed = urlparse(uri)
        self.tls = parsed.scheme.startswith("nbds")
        query = parse_qs(parsed.query)
        self.socket_path = query.get("socket", [""])[0]
        self.certs = query.get("tls-certificates", [""])[0]
        self.host = parsed.hostname or ""
        self.port = parsed.port or 10809

    def uri_for(self, export: str) -> str:
        """This target's URI naming another export."""
        parsed = urlparse(self.uri)
        return f"{parsed.scheme}://{parsed.netloc}/{export}?{parsed.query}"

    def handle(
        self,
        export: str = "disk",
        *,
        structured: bool = True,
        meta: bool = True,
        opt_mode: bool = False,
        strict: bool = True,
    ) -> nbd.NBD:
        """A connected handle (or one stopped in option negotiation with ``opt_mode``)."""
        h = nbd.NBD()
        h.set_request_structured_replies(structured)
        if meta:
            h.add_meta_context(BASE_ALLOCATION)
        h.set_opt_mode(opt_mode)
        h.set_uri_allow_local_file(True)  # tls-certificates=DIR in nbds:// URIs
        if not strict:
            # Let requests a careful client would refuse reach the server: we test its answers.
            h.set_strict_mode(0)
        h.connect_uri(self.uri_for(export))
        return h

    def raw_socket(self) -> socket.socket:
        """A plain socket past the greeting and (for nbds://) STARTTLS, before any option."""
        if self.socket_path:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(self.socket_path)
        else:
            sock = socket.create_connection((self.host, self.port))
        sock.settimeout(10)
        magic, opts, hflags = struct.unpack(">QQH", recv_exactly(sock, 18))
        assert (magic, opts) == (NBDMAGIC, IHAVEOPT), "bad greeting"
        assert hflags & 1, "server must offer fixed newstyle"
        sock.sendall(struct.pack(">I", 1))  # fixed newstyle, but no NO_ZEROES: we want the 124
        if not self.tls:
            return sock
        sock.sendall(struct.pack(">QII", IHAVEOPT, OPT_STARTTLS, 0))
        assert read_option_reply(sock)[:2] == (OPT_STARTTLS, REP_ACK)
        ctx = ssl.create_default_context(cafile=f"{self.certs}/ca-cert.pem")
        ctx.load_cert_chain(f"{self.certs}/client-cert.pem", f"{self.certs}/client-key.pem")
        return ctx.wrap_socket(sock, server_hostname=self.host)


# --- helpers ------------------------------------------------------------------------------------


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    """Read exactly ``n`` bytes or fail."""
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(min(n - len(out), 1 << 20))
        assert chunk, f"server closed the connection with {n - len(out)} bytes unread"
        out += chunk
    return bytes(out)


def read_option_reply(sock: socket.socket) -> tuple[int, int, bytes]:
    """(option, reply type, payload) of one option reply."""
    magic, opt, rep, length = struct.unpack(">QIII", recv_exactly(sock, 20))
    assert magic == OPTION_REPLY_MAGIC, f"option reply magic 0x{magic:x}"
    return opt, rep, recv_exactly(sock, length)


def simple_reply(sock: socket.socket, handle: int, payload: int = 0) -> tuple[int, bytes]:
    """Read a simple reply for ``handle``: (error, data); data only when error is 0."""
    magic, error, got = struct.unpack(">IIQ", recv_exactly(sock, 16))
    assert magic == SIMPLE_REPLY_MAGIC, f"reply magic 0x{magic:x}"
    assert got == handle, f"reply to handle {got}, expected {handle}"
    return error, recv_exactly(sock, payload) if payload and not error else b""


def expect_error(errno_name: str, call: Callable[[], object], what: str) -> None:
    """``call`` must fail with the server's ``errno_name``."""
    try:
        call()
    except nbd.Error as exc:
        got = f"{exc.errno} ({exc.string})"
        if exc.errno == errno_name:
            return
    else:
        got = "success"
    raise AssertionError(f"{what}: got {got}, want {errno_name}")


def chunks(size: int, step: int = 8 * MiB) -> Iterator[tuple[int, int]]:
    """(offset, length) pieces covering an export of ``size`` bytes."""
    for offset in range(0, size, step):
        yield offset, min(step, size - offset)


def read_all(h: nbd.NBD) -> bytearray:
    """The whole export, read in pieces."""
    size = h.get_size()
    out = bytearray()
    for offset, length in chunks(size):
        out += h.pread(length, offset)
    return out


def assert_same(model: bytearray, h: nbd.NBD, what: str) -> None:
    """The export holds exactly ``model``; names the first differing offset otherwise."""
    data = read_all(h)
    if data != model:
        first = next(i for i, (a, b) in enumerate(zip(data, model, strict=True)) if a != b)
        raise AssertionError(f"{what}: export differs from the model at byte {first}")


def extents(h: nbd.NBD, length: int, offset: int, flags: int = 0) -> list[tuple[int, int]]:
    """One BLOCK_STATUS reply for base:allocation as (length, flags) pairs."""
    got: list[tuple[int, int]] = []

    def collect(context: str, start: int, entries: list[int], err: object) -> int:
        assert context == BASE_ALLOCATION, context
        assert start == offset, f"extents start at {start}, asked {offset}"
        got.extend(zip(entries[::2], entries[1::2], strict=True))
        return 0

    h.block_status(length, offset, collect, flags)
    return got


class Model:
    """An in-memory copy of the disk, updated as requests succeed."""

    def __init__(self, data: bytearray) -> None:
        self.data = data

    @classmethod
    def start(cls, h: nbd.NBD, args: argparse.Namespace) -> Model:
        """The disk as it is now: the caller's copy of the image if it gave one (saves reading
        it all over NBD; the final comparison reads it all anyway), else read through ``h``."""
        if args.model_in:
            data = bytearray(Path(args.model_in).read_bytes())
            assert len(data) == h.get_size(), "--model-in is not the size of the export"
            return cls(data)
        return cls(read_all(h))

    def write(self, offset: int, data: bytes) -> None:
        self.data[offset : offset + len(data)] = data

    def zero(self, offset: int, length: int) -> None:
        self.data[offset : offset + length] = bytes(length)

    def trimmed(self, offset: int, after: bytes) -> None:
        """Accept what a TRIM left: per byte the old value or zero (the spec leaves it open)."""
        old = self.data[offset : offset + len(after)]
        bad = [i for i, (a, b) in enumerate(zip(after, old, strict=True)) if a not in (0, b)]
        assert not bad, f"trim at {offset} left bytes that are neither old nor zero: {bad[:5]}"
        self.data[offset : offset + len(after)] = after


# --- checks -------------------------------------------------------------------------------------


def check_handshake(t: Target, args: argparse.Namespace) -> None:
    """Option haggling: LIST, INFO (known, unknown, default name), meta contexts, GO, ABORT,
    structured replies on and off, and the EXPORT_NAME path of old clients."""
    h = t.handle(opt_mode=True)
    assert h.get_protocol() == "newstyle-fixed", h.get_protocol()
    assert h.get_tls_negotiated() == t.tls
    assert h.get_structured_replies_negotiated()
    names: list[str] = []
    h.opt_list(lambda name, _desc: names.append(name) or 0)
    assert sorted(names) == ["disk", "ro"], names
    contexts: list[str] = []
    h.opt_list_meta_context(lambda name: contexts.append(name) or 0)
    assert contexts == [BASE_ALLOCATION], contexts
    h.set_export_name("no-such-export")
    expect_error_opt(h.opt_info, "INFO on an unknown export")
    h.set_export_name("ro")
    h.set_full_info(True)
    h.opt_info()
    assert h.is_read_only()
    assert not h.can_trim()
    assert not h.can_zero()
    h.set_export_name("disk")
    h.opt_go()
    size = h.get_size()
    assert size >= MAX_PAYLOAD + MiB, f"export of {size} bytes is too small for these checks"
    assert h.get_canonical_export_name() == "disk"
    assert not h.is_read_only()
    for flag in ("can_flush", "can_fua", "can_trim", "can_zero", "can_df", "can_cache"):
        assert getattr(h, flag)() == (flag not in args.without), flag
    assert not h.can_fast_zero()  # our exports cannot promise it, so they must not claim it
    assert h.can_meta_context(BASE_ALLOCATION)
    assert h.get_block_size(nbd.SIZE_MINIMUM) == 1
    assert h.get_block_size(nbd.SIZE_PREFERRED) == 4096
    assert h.get_block_size(nbd.SIZE_MAXIMUM) == MAX_PAYLOAD
    h.pwrite(b"handshake", 0)
    assert h.pread(9, 0) == b"handshake"
    h.shutdown()

    # The empty name is the default export.
    h = t.handle("", opt_mode=True)
    h.opt_go()
    assert h.get_size() == size
    assert h.pread(9, 0) == b"handshake"
    h.shutdown()

    # ABORT ends negotiation cleanly.
    h = t.handle(opt_mode=True)
    h.opt_abort()
    assert h.aio_is_closed(), "ABORT did not end the session cleanly"

    # Simple replies only: data still flows, BLOCK_STATUS is not available.
    h = t.handle(structured=False, meta=False)
    assert not h.get_structured_replies_negotiated()
    assert not h.can_meta_context(BASE_ALLOCATION)
    h.pwrite(b"simple", 4096)
    assert h.pread(6, 4096) == b"simple"
    h.shutdown()

    # A client without NBD_FLAG_C_FIXED_NEWSTYLE / NO_ZEROES can only send EXPORT_NAME, and
    # gets the 124 bytes of padding after it (libnbd reads them or the handshake fails).
    if not t.tls:  # STARTTLS needs fixed newstyle; the raw check covers EXPORT_NAME over TLS
        h = nbd.NBD()
        h.set_uri_allow_local_file(True)
        h.set_handshake_flags(0)
        h.connect_uri(t.uri_for("disk"))
        assert h.get_protocol() == "newstyle", h.get_protocol()  # i.e. EXPORT_NAME was used
        assert h.get_size() == size
        assert h.pread(9, 0) == b"handshake"
        h.shutdown()


def expect_error_opt(call: Callable[[], object], what: str) -> None:
    """An option request the server must refuse (libnbd reports it as an error)."""
    try:
        call()
    except nbd.Error:
        return
    raise AssertionError(f"{what}: the server accepted it")


def check_raw(t: Target, _args: argparse.Namespace) -> None:
    """What nbd-tester-client does by hand: an unknown option gets ERR_UNSUP and negotiation goes
    on, EXPORT_NAME answers size, flags and 124 zero bytes, READs of 1 MiB, 1 MiB + 14 and
    2 MiB + 28 succeed, a READ over the maximum and an unknown command get EINVAL without losing
    the connection, an oversize WRITE is answered (EINVAL) only after its last payload byte, and
    DISC closes the connection."""
    sock = t.raw_socket()
    sock.sendall(struct.pack(">QII", IHAVEOPT, 0x7654321, 4) + b"\0\0\0\0")
    opt, rep, _ = read_option_reply(sock)
    assert (opt, rep) == (0x7654321, REP_ERR_UNSUP), (hex(opt), hex(rep))
    sock.sendall(struct.pack(">QII", IHAVEOPT, OPT_EXPORT_NAME, 4) + b"disk")
    size, tflags = struct.unpack(">QH", recv_exactly(sock, 10))
    assert size >= MAX_PAYLOAD + MiB, size
    assert tflags & 1, tflags  # HAS_FLAGS
    assert recv_exactly(sock, 124) == bytes(124)

    def request(cmd: int, handle: int, offset: int, length: int) -> None:
        sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, cmd, handle, offset, length))

    for handle, length in enumerate((MiB, MiB + 14, 2 * MiB + 28), start=1):
        request(CMD_READ, handle, handle, length)
        error, data = simple_reply(sock, handle, length)
        assert error == 0, f"READ of {length} bytes failed with {error}"
        assert len(data) == length
    request(CMD_READ, 10, 0, MAX_PAYLOAD + 1)
    assert simple_reply(sock, 10, MAX_PAYLOAD + 1)[0] == EINVAL
    request(42, 11, 0, 0)
    assert simple_reply(sock, 11)[0] == EINVAL
    # An oversize WRITE is answered only once all of its payload is sent, never before.
    request(CMD_WRITE, 15, 0, MAX_PAYLOAD + 1)
    sock.sendall(bytes(MAX_PAYLOAD))
    sock.settimeout(0.2)
    with contextlib.suppress(TimeoutError):
        early = sock.recv(16)
        raise AssertionError(f"reply to an oversize WRITE before its last byte: {early!r}")
    sock.settimeout(10)
    sock.sendall(b"\0")
    assert simple_reply(sock, 15)[0] == EINVAL
    request(CMD_WRITE, 12, 4096, 5)
    sock.sendall(b"raw!!")
    assert simple_reply(sock, 12)[0] == 0
    request(CMD_READ, 13, 4096, 5)
    assert simple_reply(sock, 13, 5) == (0, b"raw!!")
    request(CMD_DISC, 14, 0, 0)
    sock.settimeout(5)
    # A TLS close without close_notify (a reset, an SSL error) still is a close.
    with contextlib.suppress(ConnectionResetError, ssl.SSLError):
        assert sock.recv(1) == b"", "server sent data after DISC"
    sock.close()


def check_limits(t: Target, args: argparse.Namespace) -> None:
    """Oversize and out-of-range requests get the spec's errors and the connection stays usable:
    WRITE over the maximum EINVAL (answered after its payload), READ over the maximum EINVAL;
    past the end READ, TRIM, BLOCK_STATUS and CACHE EINVAL, WRITE and WRITE_ZEROES ENOSPC; bad
    flags EINVAL; every write to a read-only export EPERM."""
    h = t.handle(strict=False)
    size = h.get_size()
    model = Model.start(h, args)
    biggest = random.Random(7).randbytes(MAX_PAYLOAD)
    h.pwrite(biggest, 0)  # exactly the maximum is fine
    model.write(0, biggest)
    assert h.pread(MAX_PAYLOAD, 0) == biggest
    expect_error("EINVAL", lambda: h.pwrite(b"x" * (MAX_PAYLOAD + 4096), 0), "oversize WRITE")
    expect_error("EINVAL", lambda: h.pread(MAX_PAYLOAD + 1, 0), "oversize READ")
    expect_error("EINVAL", lambda: h.pread(2, size - 1), "READ past the end")
    expect_error("ENOSPC", lambda: h.pwrite(b"ab", size - 1), "WRITE past the end")
    expect_error("EINVAL", lambda: h.trim(4096, size - 512), "TRIM past the end")
    expect_error("ENOSPC", lambda: h.zero(4096, size - 512), "WRITE_ZEROES past the end")
    expect_error("EINVAL", lambda: h.cache(2, size - 1), "CACHE past the end")
    expect_error("EINVAL", lambda: extents(h, 2, size - 1), "BLOCK_STATUS past the end")
    expect_error("EINVAL", lambda: h.pread(1, 0, nbd.CMD_FLAG_NO_HOLE), "READ with NO_HOLE")
    expect_error("EINVAL", lambda: h.trim(1, 0, nbd.CMD_FLAG_REQ_ONE), "TRIM with REQ_ONE")
    expect_error("EINVAL", lambda: h.zero(1, 0, nbd.CMD_FLAG_FAST_ZERO), "unadvertised FAST_ZERO")
    # Exactly up to the end is in range.
    h.pwrite(b"end", size - 3)
    model.write(size - 3, b"end")
    assert h.pread(3, size - 3) == b"end"
    assert_same(model.data, h, "after the refused requests")
    h.shutdown()
    write_model(args, model)

    ro = t.handle("ro", strict=False)
    before = ro.pread(4096, 0)
    expect_error("EPERM", lambda: ro.pwrite(b"no", 0), "WRITE to a read-only export")
    expect_error("EPERM", lambda: ro.trim(4096, 0), "TRIM of a read-only export")
    expect_error("EPERM", lambda: ro.zero(4096, 0), "WRITE_ZEROES of a read-only export")
    assert ro.pread(4096, 0) == before
    ro.shutdown()


def check_unaligned(t: Target, args: argparse.Namespace) -> None:
    """Writes, zeroes and trims of odd sizes at odd offsets, across 512 B, 4 KiB and 64 KiB
    boundaries, read back byte for byte (also by reads of other odd ranges)."""
    h = t.handle()
    model = Model.start(h, args)
    rng = random.Random(args.seed)
    base = 5 * MiB
    cases = [(base + 1, 1), (base + 511, 2), (base + 4095, 4098), (base + 65535, 65538)]
    cases += [(base + MiB + rng.randrange(65536), rng.randrange(1, 200_000)) for _ in range(20)]
    for offset, length in cases:
        data = rng.randbytes(length)
        h.pwrite(data, offset)
        model.write(offset, data)
        assert h.pread(length, offset) == data, f"read back {length} at {offset}"
    for offset, length in [(base + 3, 1000), (base + 65000, 1500), (base + 4097, 70_000)]:
        h.zero(length, offset)
        model.zero(offset, length)
        assert h.pread(length, offset) == bytes(length)
    h.trim(9999, base + 2 * MiB + 7)
    model.trimmed(base + 2 * MiB + 7, h.pread(9999, base + 2 * MiB + 7))
    for _ in range(50):
        offset = base + rng.randrange(3 * MiB)
        length = rng.randrange(1, 100_000)
        assert h.pread(length, offset) == model.data[offset : offset + length]
    assert_same(model.data, h, "after unaligned I/O")
    h.shutdown()
    write_model(args, model)


def check_fua_flush(t: Target, args: argparse.Namespace) -> None:
    """FUA on WRITE, TRIM and WRITE_ZEROES, and FLUSH with writes in flight, as the tester
    client's flush test interleaves them; every write is read back (on a second connection)."""
    h = t.handle()
    model = Model.start(h, args)
    rng = random.Random(args.seed)
    base = 9 * MiB
    cookies = []
    for i in range(256):  # 1 KiB writes, FUA on every 16th + 3, FLUSH on every 16th + 11
        data = rng.randbytes(1024)
        flags = nbd.CMD_FLAG_FUA if i % 16 == 3 else 0
        cookies.append(
            h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), base + i * 1024, flags=flags)
        )
        model.write(base + i * 1024, data)
        if i % 16 == 11:
            cookies.append(h.aio_flush())
    wait_all(h, cookies)
    h.zero(65536, base + MiB, nbd.CMD_FLAG_FUA)
    model.zero(base + MiB, 65536)
    h.trim(65536, base + 2 * MiB, nbd.CMD_FLAG_FUA)
    model.trimmed(base + 2 * MiB, h.pread(65536, base + 2 * MiB))
    h.pwrite(b"fua", base + 3 * MiB, nbd.CMD_FLAG_FUA)
    model.write(base + 3 * MiB, b"fua")
    h.flush()
    other = t.handle()
    assert_same(model.data, other, "after FUA writes and flushes")
    other.shutdown()
    h.shutdown()
    write_model(args, model)


def check_trim_zero(t: Target, args: argparse.Namespace) -> None:
    """TRIM leaves old data or zeroes, WRITE_ZEROES with and without NO_HOLE reads back as zeroes,
    FAST_ZERO is neither advertised nor accepted, and zeroed ranges never report data they do
    not have."""
    h = t.handle(strict=False)
    model = Model.start(h, args)
    rng = random.Random(args.seed)
    base = 13 * MiB
    data = rng.randbytes(2 * MiB)
    h.pwrite(data, base)
    model.write(base, data)
    h.trim(MiB, base)
    model.trimmed(base, h.pread(MiB, base))
    h.zero(256 * 1024, base + MiB)  # may punch a hole
    h.zero(256 * 1024, base + MiB + 256 * 1024, nbd.CMD_FLAG_NO_HOLE)  # must stay allocated
    model.zero(base + MiB, 512 * 1024)
    assert h.pread(512 * 1024, base + MiB) == bytes(512 * 1024)
    for length, flags in extents(h, 512 * 1024, base + MiB):
        assert length > 0
        assert flags & ~(nbd.STATE_HOLE | nbd.STATE_ZERO) == 0, (length, flags)
    assert not h.can_fast_zero()
    untouched = h.pread(4096, base + MiB + 512 * 1024)
    expect_error(
        "EINVAL", lambda: h.zero(4096, base + MiB + 512 * 1024, nbd.CMD_FLAG_FAST_ZERO), "FAST_ZERO"
    )
    assert h.pread(4096, base + MiB + 512 * 1024) == untouched
    h.zero(0, base)  # zero-length requests are accepted and change nothing
    h.trim(0, base)
    assert_same(model.data, h, "after trims and zeroes")
    h.shutdown()
    write_model(args, model)


def check_block_status(t: Target, args: argparse.Namespace) -> None:
    """base:allocation extents start at the request's offset, never describe more than asked,
    REQ_ONE gives one extent, ZERO extents read as zeroes, and written data is never a hole."""
    h = t.handle()
    size = h.get_size()
    model = Model.start(h, args)
    offset = 0
    while offset < size:  # walk the whole disk as nbdcopy does
        got = extents(h, size - offset, offset)
        assert got, f"no extent at {offset}"
        assert sum(n for n, _ in got) <= size - offset, got[:4]
        for length, flags in got:
            assert length > 0, got[:4]
            if flags & nbd.STATE_ZERO:
                assert model.data[offset : offset + length] == bytes(length), f"zero at {offset}"
            offset += length
    for start, length in [(1000, 5000), (size - 4097, 4097), (7 * MiB + 3, 1)]:
        got = extents(h, length, start)
        assert got, f"no extent at {start}"
        assert sum(n for n, _ in got) <= length, (start, got)
        one = extents(h, length, start, nbd.CMD_FLAG_REQ_ONE)
        assert len(one) == 1, one
        assert one[0][0] <= length, one
    spot = 20 * MiB + 12345
    h.pwrite(b"data", spot)
    model.write(spot, b"data")
    h.flush()
    [(length, flags)] = extents(h, 4, spot, nbd.CMD_FLAG_REQ_ONE)
    assert not flags & nbd.STATE_ZERO, f"written data reported as zero ({flags})"
    h.shutdown()
    write_model(args, model)


def check_multi_conn(t: Target, args: argparse.Namespace) -> None:
    """CAN_MULTI_CONN is advertised, and honoured: four connections write at once, a FLUSH on
    one covers them all, and every connection reads what the others wrote."""
    handles = [t.handle() for _ in range(4)]
    # Clients open several connections only when this is advertised; our exports share one
    # descriptor (a flush covers every connection), so they all must advertise it.
    assert all(h.can_multi_conn() for h in handles), "CAN_MULTI_CONN is not advertised"
    model = Model.start(handles[0], args)
    rng = random.Random(args.seed)
    base = 24 * MiB
    pending: list[tuple[nbd.NBD, list[int]]] = []
    for i, h in enumerate(handles):
        cookies = []
        for j in range(32):
            offset = base + (j * len(handles) + i) * 8192 + rng.randrange(100)
            data = rng.randbytes(8192 - 100)
            cookies.append(h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), offset))
            model.write(offset, data)
        pending.append((h, cookies))
    for h, cookies in pending:
        wait_all(h, cookies)
    handles[0].flush()
    end = base + 32 * len(handles) * 8192
    for i, h in enumerate(handles):
        got = h.pread(end - base, base)
        assert got == model.data[base:end], f"connection {i} does not see the others' writes"
    assert_same(model.data, handles[-1], "across connections")
    for h in handles:
        h.shutdown()
    write_model(args, model)


def check_mixed(t: Target, args: argparse.Namespace) -> None:
    """A long pipelined mix of READ, WRITE (some FUA), TRIM, WRITE_ZEROES, FLUSH and CACHE at
    random (often unaligned) places, up to 16 in flight on non-overlapping ranges, checked
    against the model after every batch and as a whole at the end."""
    h = t.handle()
    size = h.get_size()
    model = Model.start(h, args)
    rng = random.Random(args.seed)
    weights = [30, 40, 8, 10, 6, 6 if h.can_cache() else 0]
    for _batch in range(args.batches):
        busy: list[tuple[int, int]] = []
        ops: list[tuple[int, str, int, int, object]] = []
        for _ in range(rng.randrange(1, 17)):
            length = rng.choice([1, 512, 4096, 65536, rng.randrange(1, 300_000)])
            offset = rng.randrange(size - length)
            if rng.random() < 0.5:
                offset -= offset % 4096
            if any(offset < end and start < offset + length for start, end in busy):
                continue
            busy.append((offset, offset + length))
            kind = rng.choices(["read", "write", "trim", "zero", "flush", "cache"], weights)[0]
            if kind == "read":
                buf = nbd.Buffer(length)
                ops.append((h.aio_pread(buf, offset), kind, offset, length, buf))
            elif kind == "write":
                data = rng.randbytes(length)
                flags = nbd.CMD_FLAG_FUA if rng.random() < 0.2 else 0
                cookie = h.aio_pwrite(
                    nbd.Buffer.from_bytearray(bytearray(data)), offset, flags=flags
                )
                ops.append((cookie, kind, offset, length, data))
            elif kind == "trim":
                ops.append((h.aio_trim(length, offset), kind, offset, length, None))
            elif kind == "zero":
                flags = nbd.CMD_FLAG_NO_HOLE if rng.random() < 0.5 else 0
                ops.append((h.aio_zero(length, offset, flags=flags), kind, offset, length, None))
            elif kind == "flush":
                ops.append((h.aio_flush(), kind, 0, 0, None))
            else:
                ops.append((h.aio_cache(length, offset), kind, offset, length, None))
        wait_all(h, [op[0] for op in ops])
        for _cookie, kind, offset, length, payload in ops:
            if kind == "read":
                assert isinstance(payload, nbd.Buffer)
                got = payload.to_bytearray()
                assert got == model.data[offset : offset + length], f"READ {length} at {offset}"
            elif kind == "write":
                assert isinstance(payload, bytes)
                model.write(offset, payload)
            elif kind == "zero":
                model.zero(offset, length)
            elif kind == "trim":
                model.trimmed(offset, h.pread(length, offset))
    h.flush()
    assert_same(model.data, h, "after the mixed sequence")
    h.shutdown()
    write_model(args, model)


def wait_all(h: nbd.NBD, cookies: list[int]) -> None:
    """Run the handle until every command is answered; raise the first command's error."""
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for cookie in cookies:
        h.aio_command_completed(cookie)


def write_model(args: argparse.Namespace, model: Model) -> None:
    """Hand the model to the caller, which compares it with the image on the server's side."""
    if args.model_out:
        Path(args.model_out).write_bytes(model.data)


CHECKS: dict[str, Callable[[Target, argparse.Namespace], None]] = {
    "handshake": check_handshake,
    "raw": check_raw,
    "limits": check_limits,
    "unaligned": check_unaligned,
    "fua_flush": check_fua_flush,
    "trim_zero": check_trim_zero,
    "block_status": check_block_status,
    "multi_conn": check_multi_conn,
    "mixed": check_mixed,
}


def main() -> int:
    """Run one check; a failure raises (non-zero exit, the assertion on stderr)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("check", choices=sorted(CHECKS))
    parser.add_argument("--uri", required=True, help="nbd+unix:///disk?socket=... or nbds://...")
    parser.add_argument("--model-in", help="the image as it is before the check (else read)")
    parser.add_argument("--model-out", help="write the final model of the disk here")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--without",
        action="append",
        default=[],
        help="a capability (can_cache, ...) the export must not claim; repeatable",
    )
    parser.add_argument("--batches", type=int, default=300, help="batches of the mixed check")
    args = parser.parse_args()
    CHECKS[args.check](Target(args.uri), args)
    print(f"{args.check}: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
