"""The shipped units work under their own constraints (tests/unit_sandbox.py runs them).

The bridge runs as ``fedgate-bridge`` against a real pymodbus device and fills its store; a
reader under the edge unit's constraints (user ``fedgate``, the bridge's folder read-only,
``MemoryMax=1G``) reads that store while the bridge writes and after it stopped. The bridge
reports READY only once its first poll cycle is in the store. Needs root (mounts, cgroups,
system users), like the CI machine.
"""

from __future__ import annotations

import dataclasses
import grp
import json
import os
import pwd
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fedcore.samples import connect
from firmware_bridge.simulator import (
    Fault,
    SimulatedDevice,
    SimulatedTurbine,
    SimulatorServer,
    wind_bridge_toml,
)

from .firmware_bridge.conftest import free_port, wait_for
from .unit_sandbox import (
    Cgroup,
    CgroupLayout,
    SandboxError,
    UnitFile,
    UnitSandbox,
    find_cgroup,
    parse_bytes,
    parse_seconds,
    read_memory_limit,
)

ROOT = Path(__file__).resolve().parents[1]
BRIDGE_UNIT = ROOT / "systemd" / "fedgate-bridge.service"
EDGE_UNIT = ROOT / "systemd" / "fedgate-edge.service"
STORE = "/var/lib/fedgate-bridge/samples.db"  # the path both units agree on
SIGNALS = 9  # signals of the wind turbine map: one poll writes 9 samples

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="the unit sandbox needs root (mounts, cgroups, system users)"
)

# Runs under the edge unit: reports who it is, then answers "read" lines on stdin with the
# store as seen through one long-lived and one fresh read-only connection.
READER = r"""
import json, os, sys
sys.path.insert(0, sys.argv[2])
from fedcore.samples import connect
from unit_sandbox import cgroup_of, read_memory_limit

store = sys.argv[1]
def attempt(action):
    try:
        action()
        return "allowed"
    except OSError as exc:
        return exc.strerror

hello = {
    "uid": os.getuid(), "groups": sorted(os.getgroups()),
    "memory_limit": read_memory_limit(cgroup_of(os.getpid())),
    "create_in_store_folder": attempt(lambda: open(os.path.dirname(store) + "/x", "w")),
    "chmod_store": attempt(lambda: os.chmod(store, 0o666)),
}
print(json.dumps(hello), flush=True)
held = None
for line in sys.stdin:
    if line.strip() != "read":
        break
    fresh = connect(store, readonly=True)
    held = held or connect(store, readonly=True)
    count = "SELECT count(*) FROM samples"
    rows = "SELECT count(DISTINCT ts) FROM samples"
    print(json.dumps({"fresh": fresh.execute(count).fetchone()[0],
                      "held": held.execute(count).fetchone()[0],
                      "rows": fresh.execute(rows).fetchone()[0]}), flush=True)
    fresh.close()
"""


# ---- pure: unit files and cgroup discovery ----------------------------------------------------


def test_unit_files_parse_into_the_constraints_they_declare() -> None:
    bridge, edge = UnitFile.parse(BRIDGE_UNIT), UnitFile.parse(EDGE_UNIT)
    assert bridge.exec_start[:4] == ("/usr/bin/env", "fedgate", "bridge", "run")
    assert (bridge.user, bridge.state_directories, bridge.state_directory_mode) == (
        "fedgate-bridge",
        ("fedgate-bridge",),
        0o750,
    )
    assert bridge.protect_system == "strict" and bridge.private_tmp and bridge.no_new_privileges
    assert edge.user == "fedgate" and edge.memory_max == 1 << 30
    assert bridge.group in edge.supplementary_groups  # the agent may read the bridge's store
    assert edge.read_only_paths == ("-/var/lib/fedgate-bridge",)
    assert "SystemCallFilter" in edge.ignored  # seccomp is not applied by the sandbox


def test_time_spans_and_sizes_read_as_systemd_reads_them() -> None:
    assert parse_seconds("1h 30min") == 5400 and parse_seconds("500ms") == 0.5
    assert parse_seconds("20") == 20 and parse_seconds("infinity") == float("inf")
    assert parse_bytes("1G") == 1 << 30 and parse_bytes("512M") == 512 << 20
    assert parse_bytes("infinity") is None
    with pytest.raises(SandboxError):
        parse_seconds("soon")


def test_the_memory_cgroup_is_found_on_hybrid_and_unified_hosts() -> None:
    hybrid_mounts = (
        "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"
        "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n"
    )
    hybrid = find_cgroup(hybrid_mounts, "4:memory:/ci/job\n0::/ci/job\n")
    assert (hybrid.version, str(hybrid.directory)) == (1, "/sys/fs/cgroup/memory/ci/job")
    assert hybrid.limit_file == "memory.limit_in_bytes"
    unified = find_cgroup(
        "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n",
        "0::/system.slice/ci.service\n",
    )
    assert (unified.version, str(unified.directory)) == (
        2,
        "/sys/fs/cgroup/system.slice/ci.service",
    )
    assert unified.limit_file == "memory.max"
    with pytest.raises(SandboxError):
        find_cgroup("22 27 0:21 / /proc rw - proc proc rw\n", "0::/\n")


# ---- the units, run for real ------------------------------------------------------------------


@pytest.fixture
def sim() -> Iterator[SimulatorServer]:
    server = SimulatorServer()
    yield server
    server.close()


@pytest.fixture
def folders(tmp_path: Path) -> dict[str, Path]:
    out = {name: tmp_path / name for name in ("etc", "bridge-state", "edge-state")}
    for folder in out.values():
        folder.mkdir()
    out["log"] = tmp_path / "bridge.log"  # the bridge's stderr (a pipe nobody reads could fill)
    return out


def bridge_sandbox(folders: dict[str, Path], **kwargs: Any) -> UnitSandbox:
    binds = {"/etc/fedgate": folders["etc"], "/var/lib/fedgate-bridge": folders["bridge-state"]}
    with open(folders["log"], "ab") as log:  # the child keeps its own descriptor
        sandbox = UnitSandbox(BRIDGE_UNIT, binds=binds, stderr=log, **kwargs)
        sandbox.start()
    return sandbox


def edge_reader(folders: dict[str, Path]) -> UnitSandbox:
    binds = {
        "/etc/fedgate": folders["etc"],
        "/var/lib/fedgate-bridge": folders["bridge-state"],
        "/var/lib/fedgate-edge": folders["edge-state"],
    }
    command = [sys.executable, "-c", READER, STORE, str(Path(__file__).parent)]
    return UnitSandbox(
        EDGE_UNIT,
        binds=binds,
        command=command,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def ask(reader: UnitSandbox) -> dict[str, Any]:
    assert reader.process and reader.process.stdin and reader.process.stdout
    reader.process.stdin.write(b"read\n")
    reader.process.stdin.flush()
    line = reader.process.stdout.readline()
    assert line, (
        f"the reader died: {reader.process.stderr.read().decode() if reader.process.stderr else ''}"
    )
    return dict(json.loads(line))


def stored(folders: dict[str, Path]) -> int:
    """Samples in the store, read from the host with the same read-only connection."""
    conn = connect(folders["bridge-state"] / "samples.db", readonly=True)
    try:
        return int(conn.execute("SELECT count(*) FROM samples").fetchone()[0])
    finally:
        conn.close()


def wal_files(folders: dict[str, Path]) -> set[str]:
    return {p.name for p in folders["bridge-state"].iterdir()} & {
        "samples.db-wal",
        "samples.db-shm",
    }


def stop_cleanly(bridge: UnitSandbox, folders: dict[str, Path]) -> None:
    assert bridge.stop() == 0, folders["log"].read_text()
    assert "STOPPING" in bridge.notifications[-1]


@needs_root
def test_edge_reads_the_bridge_store_read_only_while_it_writes_and_after_it_stopped(
    sim: SimulatorServer, folders: dict[str, Path]
) -> None:
    port = sim.add(SimulatedTurbine("R80711", speed=60000.0), 0)
    (folders["etc"] / "bridge.toml").write_text(
        wind_bridge_toml([SimulatedDevice("t1", port)], STORE, period=0.05)
    )
    with bridge_sandbox(folders) as bridge:
        bridge.wait_for("READY", timeout=60)
        assert bridge.memory_limit() is None  # the bridge's unit sets no MemoryMax
        with edge_reader(folders) as reader:
            assert reader.process and reader.process.stdout
            hello = json.loads(reader.process.stdout.readline())
            assert hello["uid"] == pwd.getpwnam("fedgate").pw_uid
            assert grp.getgrnam("fedgate-bridge").gr_gid in hello["groups"]
            assert hello["memory_limit"] == 1 << 30  # MemoryMax=1G, seen from inside
            assert reader.memory_limit() == 1 << 30  # and from the host, the same cgroup
            assert hello["create_in_store_folder"] == "Read-only file system"
            assert hello["chmod_store"] != "allowed"
            first = ask(reader)
            assert first["fresh"] >= SIGNALS and first["rows"] * SIGNALS == first["fresh"]
            wait_for(lambda: stored(folders) > first["fresh"] + 10 * SIGNALS, 20, "more rows")
            second = ask(reader)  # the bridge keeps writing meanwhile
            # the long-lived connection follows the writer (read after the fresh one)
            assert second["fresh"] > first["fresh"] and second["held"] >= second["fresh"]
            # Stop the bridge while the reader is connected: the store stays in WAL mode and
            # the reader's connection keeps SQLite from deleting the files it needs.
            stop_cleanly(bridge, folders)
            final = stored(folders)
            after = ask(reader)
            assert after["fresh"] == after["held"] == final
            assert wal_files(folders) == {"samples.db-wal", "samples.db-shm"}
        with edge_reader(folders) as late:  # a reader that comes later uses those files
            assert late.process and late.process.stdout
            late.process.stdout.readline()
            assert ask(late)["fresh"] == final

    # A restart, then a clean stop with no reader connected: SQLite removes the -wal and
    # -shm files (the bridge hands the store back in rollback-journal mode).
    with bridge_sandbox(folders) as bridge:
        bridge.wait_for("READY", timeout=60)
        wait_for(lambda: stored(folders) > final, 20, "rows after the restart")
        assert wal_files(folders) == {"samples.db-wal", "samples.db-shm"}
        stop_cleanly(bridge, folders)
    assert wal_files(folders) == set()
    final = stored(folders)
    with edge_reader(folders) as reader:
        assert reader.process and reader.process.stdout
        reader.process.stdout.readline()
        assert ask(reader)["fresh"] == final
    mode = (folders["bridge-state"] / "samples.db").stat().st_mode & 0o777
    assert mode == 0o640  # UMask=0027: the group reads, others nothing


@needs_root
def test_bridge_reports_ready_once_every_device_polled_and_flushed(
    sim: SimulatorServer, folders: dict[str, Path]
) -> None:
    alive = sim.add(SimulatedTurbine("R80711", advance="read"), 0)
    silent = sim.add(SimulatedTurbine("R80721"), 0)
    sim.set_fault(silent, Fault.TIMEOUT)  # answers nothing: each try waits out the timeout
    devices = [
        SimulatedDevice("alive", alive),
        SimulatedDevice("silent", silent),
        SimulatedDevice("refused", free_port()),
    ]
    (folders["etc"] / "bridge.toml").write_text(
        wind_bridge_toml(devices, STORE, period=0.2, timeout=1.0)
    )
    with bridge_sandbox(folders) as bridge:
        started = time.monotonic()
        ready = bridge.wait_for("READY", timeout=60)
        waited = ready.received - started
        status = re.fullmatch(
            r"(\d+) samples written, (\d+) of (\d+) devices down", ready.fields["STATUS"]
        )
        assert status, ready.fields
        written, down, total = map(int, status.groups())
        # Both dead devices completed (failed) a cycle before READY: devices start "up".
        assert (down, total) == (2, 3)
        assert waited >= 2.0  # the silent device's cycle: timeout x (1 + retries)
        # What the first cycle read was already in the store when READY came.
        assert written >= SIGNALS and written % SIGNALS == 0 and stored(folders) >= written
        before_ready = bridge.notifications[: bridge.notifications.index(ready)]
        assert not any("WATCHDOG" in n for n in before_ready)
        sim.set_fault(silent, Fault.NONE)
        stop_cleanly(bridge, folders)


@needs_root
def test_a_failed_start_is_reported_and_leaves_nothing_behind(folders: dict[str, Path]) -> None:
    binds = {"/etc/fedgate": folders["etc"], "/var/lib/fedgate-bridge": folders["bridge-state"]}
    sandbox = UnitSandbox(BRIDGE_UNIT, binds=binds, command=["/nonexistent/fedgate"])
    with pytest.raises(SandboxError, match="executing /nonexistent/fedgate"):
        sandbox.start()
    assert sandbox.process is not None and sandbox.process.returncode == 203  # as systemd's
    assert sandbox.cgroup is not None and not sandbox.cgroup.layout.directory.exists()
    assert sandbox.work_dir is not None and not sandbox.work_dir.exists()


@needs_root
def test_an_error_in_the_block_stops_the_service_and_removes_its_cgroup(
    folders: dict[str, Path],
) -> None:
    (folders["etc"] / "bridge.toml").write_text(
        wind_bridge_toml([SimulatedDevice("gone", free_port())], STORE, timeout=0.2)
    )
    with pytest.raises(RuntimeError, match="test failed"):
        with bridge_sandbox(folders) as bridge:
            pid, cgroup = bridge.pid, bridge.cgroup
            assert cgroup is not None and cgroup.pids() == [pid]
            raise RuntimeError("test failed")
    assert not Path(f"/proc/{pid}").exists()
    assert not cgroup.layout.directory.exists()


def test_cgroup_v2_delegates_memory_and_writes_memory_max(tmp_path: Path) -> None:
    parent = tmp_path / "ci.service"  # a stand-in for cgroupfs: the files the kernel offers
    parent.mkdir()
    (parent / "cgroup.subtree_control").write_text("cpu\n")
    cgroup = Cgroup(CgroupLayout(2, parent), 1 << 30)
    assert (parent / "cgroup.subtree_control").read_text() == "+memory"
    assert cgroup.layout.directory.parent == parent
    assert read_memory_limit(cgroup.layout) == 1 << 30
    (cgroup.layout.directory / "memory.max").write_text("max\n")
    assert read_memory_limit(cgroup.layout) is None


@needs_root
@pytest.mark.skipif(
    len(Path("/proc/swaps").read_text().splitlines()) > 1,
    reason="with swap on, the kernel swaps a process over MemoryMax instead of killing it",
)
def test_memory_max_is_enforced_not_only_written(folders: dict[str, Path]) -> None:
    unit = dataclasses.replace(UnitFile.parse(EDGE_UNIT), memory_max=64 << 20)
    hog = "import sys; block = b'x' * (256 << 20); print('allocated', flush=True)"
    binds = {"/var/lib/fedgate-bridge": folders["bridge-state"]}
    with UnitSandbox(
        unit, binds=binds, command=[sys.executable, "-c", hog], stdout=subprocess.PIPE
    ) as hog_process:
        assert hog_process.process is not None and hog_process.process.stdout is not None
        assert hog_process.process.wait(timeout=60) == -9  # the OOM killer's SIGKILL
        assert hog_process.process.stdout.read() == b""
