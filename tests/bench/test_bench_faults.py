"""The fault suite cannot rot: its partition proxy cuts and heals a real MQTT link, and its
quickest scenario (kill -9 of a gateway, mid-round) runs end to end on a real fleet.

No timings are asserted; waits are bounded only so a hang fails instead of blocking.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from fedgate.broker import RunningBroker

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str) -> ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


_load("counting_proxy")  # partition_proxy builds on it (bench/ is not on sys.path here)
pp = _load("partition_proxy")

CONNECT = bytes([0x10, 0x0F]) + b"\x00\x04MQTT\x04\x02\x00\x3c" + b"\x00\x03p-1"  # 3.1.1, keep-alive 60
CONNACK = b"\x20\x02\x00\x00"
PINGREQ, PINGRESP = b"\xc0\x00", b"\xd0\x00"


def _recv(sock: socket.socket, n: int) -> bytes:
    got = b""
    while len(got) < n:
        chunk = sock.recv(n - len(got))
        assert chunk, f"connection closed after {len(got)} of {n} bytes"
        got += chunk
    return got


def _silent(sock: socket.socket, seconds: float) -> bool:
    """Nothing arrives and nothing closes for ``seconds``."""
    sock.settimeout(seconds)
    try:
        sock.recv(1)  # a byte, or b"" for a close: not silent
    except TimeoutError:
        return True
    finally:
        sock.settimeout(10)
    return False


def test_partition_holds_bytes_both_ways_without_closing_and_heal_delivers_them(
        mosquitto: RunningBroker) -> None:
    proxy = pp.PartitionProxy(mosquitto.port).start()
    try:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
            sock.sendall(CONNECT)
            assert _recv(sock, 4) == CONNACK
            proxy.partition()
            assert proxy.partitioned
            sock.sendall(PINGREQ)
            assert _silent(sock, 1.0)  # no answer, no close: the link is silent
            # a connection made during the partition is accepted but reaches nothing
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as late:
                late.sendall(CONNECT.replace(b"p-1", b"p-2"))
                assert _silent(late, 0.5)
                proxy.heal()
                assert _recv(late, 4) == CONNACK
            assert _recv(sock, 2) == PINGRESP  # the held ping went through on healing
        assert proxy.accepted == 2
    finally:
        proxy.stop()


@pytest.mark.slow
@pytest.mark.broker
def test_quick_gateway_kill_runs_end_to_end_and_loses_nothing(tmp_path: Path) -> None:
    if shutil.which("mosquitto") is None:
        pytest.skip("mosquitto is not on PATH")
    out = tmp_path / "faults.json"
    results = tmp_path / "RESULTS_faults.md"
    done = subprocess.run(
        [sys.executable, "bench/bench_faults.py", "--quick", "--scenarios", "gateway-kill",
         "--out", str(out), "--results", str(results)],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    [result] = json.loads(out.read_text())["results"]
    assert result["scenario"] == "gateway-kill" and not result["error"]
    [shot] = result["injections"]
    assert shot["recovered_round"] > shot["round"]  # a full round after the gateway came back
    assert result["updates_sent"] > 0 and result["rounds_committed"] >= shot["recovered_round"]
    # the figures the task asks for: nothing lost when a gateway is killed. Only rounds from
    # the fault on are the fault's doing: at start-up a gateway that turns ready just as
    # round 1 is announced may answer it too late (a race recorded in RESULTS_faults.md)
    assert result["rounds_missing"] == [] and result["rounds_rerun"] == []
    assert [u for u in result["updates_lost"] if u[1] >= shot["round"]] == []
    assert result["lineages"] == 1
    assert "| gateway-kill |" in done.stdout and "| gateway-kill |" in results.read_text()
