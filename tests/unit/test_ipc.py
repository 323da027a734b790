"""The status pipe's framing (proxy.ipc), without processes: any split of the byte stream decodes to
the same messages, payloads are opaque bytes, and every size is bounded."""

from __future__ import annotations

import os
import select

import pytest

from proxy import ipc
from proxy.ipc import Decoder, FrameError, Kind, Message
from proxy.worker import StatusPipe

TRICKY = "RuntimeError: Redis is unreachable\nR.E\x00\x01\x00\x00\x03 ünïcødé ✓"


def stream() -> tuple[bytes, list[Message]]:
    """A stream of every kind of message (payloads with newlines, NULs, header-like bytes) and its decoding."""
    frames = [
        ipc.heartbeat(),
        ipc.boot_error(TRICKY),
        ipc.ready(),
        ipc.encode(Kind.HEARTBEAT),
        ipc.fatal("line one\nline two"),
        ipc.encode(200, b"\x03\x00\x05future kind"),
        ipc.boot_error(""),
    ]
    expected = [
        Message(Kind.HEARTBEAT),
        Message(Kind.BOOT_ERROR, TRICKY.encode()),
        Message(Kind.READY),
        Message(Kind.HEARTBEAT),
        Message(Kind.FATAL, b"line one\nline two"),
        Message(200, b"\x03\x00\x05future kind"),
        Message(Kind.BOOT_ERROR),
    ]
    return b"".join(frames), expected


def test_one_read_with_several_messages() -> None:
    data, expected = stream()
    decoder = Decoder()
    assert decoder.feed(data) == expected
    assert decoder.pending == 0
    assert decoder.feed(b"") == []


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 64])
def test_any_split_of_the_stream_gives_the_same_messages(size: int) -> None:
    data, expected = stream()
    decoder = Decoder()
    got: list[Message] = []
    for start in range(0, len(data), size):
        got += decoder.feed(data[start : start + size])
    assert got == expected
    assert decoder.pending == 0


def test_every_cut_point_of_a_frame_waits_for_the_rest() -> None:
    frame = ipc.boot_error(TRICKY)
    for cut in range(len(frame)):
        decoder = Decoder()
        assert decoder.feed(frame[:cut]) == []
        assert decoder.pending == cut
        assert decoder.feed(frame[cut:]) == [Message(Kind.BOOT_ERROR, TRICKY.encode())]
        assert decoder.pending == 0


def test_payload_text_is_data_not_a_message() -> None:
    """The bug the framing fixes: a boot error containing "R" (the old ready byte) is one boot error."""
    (message,) = Decoder().feed(ipc.boot_error("RuntimeError: Redis is down"))
    assert message.kind == Kind.BOOT_ERROR and message.kind != Kind.READY
    assert message.text == "RuntimeError: Redis is down"


def test_frames_fit_in_one_atomic_pipe_write() -> None:
    assert ipc.MAX_FRAME <= select.PIPE_BUF
    assert len(ipc.encode(Kind.BOOT_ERROR, b"x" * ipc.MAX_PAYLOAD)) == ipc.MAX_FRAME
    with pytest.raises(ValueError):
        ipc.encode(Kind.BOOT_ERROR, b"x" * (ipc.MAX_PAYLOAD + 1))
    with pytest.raises(ValueError):
        ipc.encode(256)


@pytest.mark.parametrize("filler", ["x", "é", "✓", "𝄞"])
def test_long_text_is_cut_on_a_character_boundary(filler: str) -> None:
    frame = ipc.boot_error("Traceback: " + filler * 10_000)
    assert len(frame) <= ipc.MAX_FRAME
    (message,) = Decoder().feed(frame)
    assert message.text.startswith("Traceback: " + filler)
    assert message.text.endswith("…")
    assert "\ufffd" not in message.text, "no character cut in half"
    assert ipc.boot_error("short").endswith(b"short")


def test_unencodable_text_is_replaced_not_raised() -> None:
    (message,) = Decoder().feed(ipc.boot_error("bad surrogate \udc80 here"))
    assert message.text == "bad surrogate ? here"


def test_an_oversized_length_is_a_corrupt_stream() -> None:
    decoder = Decoder()
    bad = bytes([Kind.BOOT_ERROR]) + (ipc.MAX_PAYLOAD + 1).to_bytes(2, "big")
    with pytest.raises(FrameError) as info:
        decoder.feed(ipc.ready() + ipc.heartbeat() + bad + b"x" * 10)
    assert info.value.messages == [Message(Kind.READY), Message(Kind.HEARTBEAT)], "what came before is kept"
    with pytest.raises(FrameError):  # out of step for good: no resynchronisation on garbage
        decoder.feed(ipc.ready())


def test_buffered_bytes_stay_bounded() -> None:
    decoder = Decoder(max_payload=16)
    assert decoder.feed(ipc.encode(Kind.FATAL, b"0123456789abcdef")[:-1]) == []
    assert decoder.pending == ipc.HEADER_SIZE + 15
    with pytest.raises(FrameError):
        Decoder(max_payload=16).feed(ipc.encode(Kind.FATAL, b"0123456789abcdefX"))


def test_worker_end_never_blocks_raises_or_tears_a_frame() -> None:
    """The worker's StatusPipe on a real pipe nobody reads: writes fail whole once it is full (frames are
    at most PIPE_BUF, so each write is all or nothing), and never raise, not even once the reader is gone."""
    read_fd, write_fd = os.pipe()
    try:
        status = StatusPipe(write_fd)
        assert not status.serving
        status.boot_error("first " + "x" * 10_000)  # cut to one frame
        for _ in range(200):  # 200 frames of ~4 KiB: far more than a pipe holds
            status.fatal("E" * 5000)
        status.ready()
        assert status.serving, "ready() is remembered even when the supervisor could not be told"
        os.set_blocking(read_fd, False)
        decoder = Decoder()
        got: list[Message] = []
        while True:
            try:
                chunk = os.read(read_fd, 1000)
            except BlockingIOError:
                break
            got += decoder.feed(chunk)
        assert decoder.pending == 0, "no frame was written in part"
        assert got[0].kind == Kind.BOOT_ERROR and got[0].text.startswith("first x")
        assert len(got) > 2 and all(m.kind == Kind.FATAL and len(m.payload) == ipc.MAX_PAYLOAD for m in got[1:])
        os.close(read_fd)
        read_fd = -1
        status.heartbeat(10.0)  # EPIPE: swallowed
        status.fatal("supervisor gone")
    finally:
        for fd in (read_fd, write_fd):
            if fd >= 0:
                os.close(fd)


def test_worker_heartbeats_at_most_once_a_second() -> None:
    read_fd, write_fd = os.pipe()
    try:
        status = StatusPipe(write_fd)
        for now in (100.0, 100.2, 100.9, 101.0, 101.5, 102.1):
            status.heartbeat(now)
        status.ready()
        os.set_blocking(read_fd, False)
        assert [m.kind for m in Decoder().feed(os.read(read_fd, 4096))] == [Kind.HEARTBEAT] * 3 + [Kind.READY]
    finally:
        os.close(read_fd)
        os.close(write_fd)
