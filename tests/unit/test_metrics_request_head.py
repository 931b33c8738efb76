"""The two readers the metrics server reads a request head through: one byte budget
for the whole head however it is split, one deadline for all of its reads."""

from __future__ import annotations

import io
import socket
import time

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from echod.metrics.service import (
    MAX_REQUEST,
    BudgetedLines,
    DeadlineSocketReader,
    HeadTooLarge,
    RequestTimeout,
)


class ChunkedRaw(io.RawIOBase):
    """Bytes handed out at most ``chunk`` at a time, as recv() may."""

    def __init__(self, data: bytes, chunk: int) -> None:
        super().__init__()
        self.data, self.chunk = memoryview(data), chunk

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        n = min(len(buffer), self.chunk, len(self.data))
        buffer[:n] = self.data[:n]
        self.data = self.data[n:]
        return n


def read_head(data: bytes, chunk: int) -> list[bytes]:
    lines = BudgetedLines(io.BufferedReader(ChunkedRaw(data, chunk)), MAX_REQUEST)
    head = []
    while (line := lines.readline(65537)) not in (b"\r\n", b""):
        head.append(line)
    return head


def head_of(filler: int) -> bytes:
    return b"GET /metrics HTTP/1.1\r\nX-Filler: " + b"a" * filler + b"\r\n\r\n"


EXACT = MAX_REQUEST - len(head_of(0))  # the filler that makes the head MAX_REQUEST bytes


@given(filler=st.integers(0, 3 * MAX_REQUEST), chunk=st.sampled_from([1, 7, 1000, 1 << 16]))
@example(filler=EXACT, chunk=1000)
@example(filler=EXACT + 1, chunk=1000)
def test_the_budget_is_on_the_head_not_on_the_reads(filler: int, chunk: int) -> None:
    data = head_of(filler)
    if len(data) <= MAX_REQUEST:  # the whole head, its closing empty line included
        assert read_head(data, chunk)[-1].startswith(b"X-Filler: ")
    else:
        with pytest.raises(HeadTooLarge):
            read_head(data, chunk)


def test_the_budget_spans_lines() -> None:
    many = b"GET / HTTP/1.1\r\n" + b"X-A: b\r\n" * 2000 + b"\r\n"  # every line is short
    with pytest.raises(HeadTooLarge):
        read_head(many, 4096)


def test_a_reader_past_its_deadline_times_out_without_waiting() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(b"GET")
        reader = DeadlineSocketReader(ours, time.monotonic() - 1)
        with pytest.raises(RequestTimeout):
            reader.readinto(memoryview(bytearray(16)))


def test_a_silent_client_runs_out_the_deadline_then_data_flows_while_time_is_left() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        silent = DeadlineSocketReader(ours, time.monotonic() + 0.2)
        with pytest.raises(RequestTimeout):
            silent.readinto(memoryview(bytearray(16)))
        theirs.sendall(b"GET / HTTP/1.1\r\n")
        talking = io.BufferedReader(DeadlineSocketReader(ours, time.monotonic() + 30))
        assert talking.readline() == b"GET / HTTP/1.1\r\n"
