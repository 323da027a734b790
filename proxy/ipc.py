"""Framed messages from a worker to the supervisor (the status pipe): a pure encoder and an incremental
decoder; no I/O, no processes.

Theory of operation: a pipe is a byte stream, so each message is one frame

    kind (1 byte) | payload length (2 bytes, big-endian) | payload (length bytes)

and nothing is ever inferred from what a payload contains (a boot error's text may hold any byte,
newlines and the bytes of a frame header included). A frame is at most `MAX_FRAME` = PIPE_BUF
bytes (4096 on Linux): POSIX makes a write of at most PIPE_BUF bytes to a pipe atomic, and on a
non-blocking pipe all or nothing (EAGAIN when it does not fit). So the worker, which never blocks
on the pipe, never writes part of a frame: a message is delivered whole or (pipe full: a
supervisor that stopped reading) not at all. The encoder enforces the bound; text payloads are
cut to fit, marked with "…".

The decoder takes whatever one read returned (part of a frame, several frames) and returns the
complete messages in order; it holds at most one incomplete frame. A length above the bound cannot
come from the encoder: the stream is out of step and nothing after it can be trusted, so `feed`
raises `FrameError` (carrying the messages completed before the bad frame), and again on every
later call. Kinds the reader does not know are returned like the others, so that new kinds (stats,
say) can be added on the worker side first and ignored by the supervisor until it knows them.
"""

from __future__ import annotations

import enum
import select
import struct
from dataclasses import dataclass
from typing import Final

_HEADER: Final = struct.Struct(">BH")
HEADER_SIZE: Final = _HEADER.size
MAX_FRAME: Final = min(select.PIPE_BUF, 4096)  # a write of at most PIPE_BUF bytes to a pipe is atomic
MAX_PAYLOAD: Final = MAX_FRAME - HEADER_SIZE
_CUT: Final = "…".encode()


class Kind(enum.IntEnum):
    """Message kinds (one byte on the wire; never reuse a retired number)."""

    READY = 1  # the worker serves its slot
    HEARTBEAT = 2  # the worker's loop is alive (about once a second)
    BOOT_ERROR = 3  # payload: why the worker could not start (UTF-8 text); it exits 3 next
    FATAL = 4  # payload: the error that ends a worker after it reported ready (UTF-8 text); it exits 70 next


class FrameError(ValueError):
    """The byte stream is not a sequence of valid frames; `messages` were complete before the bad frame."""

    def __init__(self, reason: str, messages: list[Message]) -> None:
        super().__init__(reason)
        self.messages = messages


@dataclass(frozen=True, slots=True)
class Message:
    kind: int  # a `Kind` value, or a kind this reader does not know
    payload: bytes = b""

    @property
    def text(self) -> str:
        """The payload as text (invalid UTF-8 replaced)."""
        return self.payload.decode("utf-8", "replace")


def encode(kind: int, payload: bytes = b"") -> bytes:
    """One frame; ValueError if `kind` is not a byte or `payload` exceeds `MAX_PAYLOAD`."""
    if not 0 <= kind <= 0xFF:
        raise ValueError(f"message kind {kind} does not fit in a byte")
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    return _HEADER.pack(kind, len(payload)) + payload


def encode_text(kind: int, text: str) -> bytes:
    """One frame carrying `text` as UTF-8, cut (on a character boundary, marked "…") to fit."""
    data = text.encode("utf-8", "replace")
    if len(data) > MAX_PAYLOAD:
        kept = data[: MAX_PAYLOAD - len(_CUT)].decode("utf-8", "ignore").encode()
        data = kept + _CUT
    return encode(kind, data)


def ready() -> bytes:
    return encode(Kind.READY)


def heartbeat() -> bytes:
    return encode(Kind.HEARTBEAT)


def boot_error(reason: str) -> bytes:
    return encode_text(Kind.BOOT_ERROR, reason)


def fatal(reason: str) -> bytes:
    return encode_text(Kind.FATAL, reason)


class Decoder:
    """Incremental frame decoder: `feed` it every read, in order."""

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        self.max_payload = max_payload
        self._buffer = bytearray()

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held (non-zero at end of stream: the last frame was cut)."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[Message]:
        """The messages completed by `data`, in order; FrameError if the stream is corrupt."""
        buffer = self._buffer
        buffer += data
        messages: list[Message] = []
        start = 0
        while len(buffer) - start >= HEADER_SIZE:
            kind, length = _HEADER.unpack_from(buffer, start)
            if length > self.max_payload:
                del buffer[:start]  # the bad header stays first: every later feed fails too
                reason = f"a frame of kind {kind} announces {length} bytes, more than {self.max_payload}"
                raise FrameError(reason, messages)
            end = start + HEADER_SIZE + length
            if len(buffer) < end:
                break
            messages.append(Message(kind, bytes(buffer[start + HEADER_SIZE : end])))
            start = end
        del buffer[:start]
        return messages
