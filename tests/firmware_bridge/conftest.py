"""Helpers for the field-bus tests: free ports, waiting on conditions, a simulator fixture."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator

import pytest

from firmware_bridge.simulator import SimulatorServer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(cond: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``cond`` until true; fails the test (not a timing assertion) if it never is."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.fixture
def sim() -> Iterator[SimulatorServer]:
    server = SimulatorServer()
    yield server
    server.close()
