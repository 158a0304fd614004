"""Run a service as its shipped systemd unit would, on a host whose PID 1 is not systemd.

Tests use it to prove that a unit file and the code it starts agree: the service runs as the
unit's user and groups, sees the file system the unit gives it (read-only where the unit
says so), lives in a memory cgroup limited to ``MemoryMax=`` and talks ``sd_notify`` to a
socket the test reads. Needs root, ``useradd``/``groupadd`` and a writable memory cgroup (v1
``memory.limit_in_bytes`` or v2 ``memory.max``). Standard library only: the namespace stage
runs this file as a script (``python -I unit_sandbox.py --enter PLAN``).

API
---
``UnitFile.parse(path)``
    The ``[Service]`` settings below as a frozen value; ``.ignored`` lists the directives
    present in the file that the sandbox does not apply (seccomp, capabilities, devices...).

``UnitSandbox(unit, *, binds=None, command=None, env=None, expose=None, path=None,
stdin=None, stdout=None, stderr=None, stop_timeout=None)``
    A context manager; ``with UnitSandbox(...) as svc:`` starts the service (unless
    ``svc.start()`` did), leaving the block stops it and removes everything the sandbox made,
    whatever the exit path (``svc.close()`` does the same outside a ``with``). A start that
    fails raises :class:`SandboxError` naming the step, after cleaning up.

    - ``unit``: a :class:`UnitFile` or the path of a ``.service`` file.
    - ``binds``: ``{path the unit uses: host folder or file}``. The service sees the host
      folder at that path (``/etc/fedgate``, ``/var/lib/fedgate-bridge``...). State and
      configuration directories not given here get an empty folder of their own.
    - ``command``: argv run instead of ``ExecStart=`` (a probe under the unit's constraints).
    - ``env``: extra environment, applied after the unit's ``Environment=``.
    - ``expose``: host paths bound read-only at the same place because ``ProtectHome=`` or
      ``PrivateTmp=`` would hide them; default: the running Python installation and this
      source tree (where the product is installed from in tests).
    - ``path``: folders put before systemd's default ``PATH``; default: the folder of the
      running interpreter, so that ``ExecStart=/usr/bin/env fedgate ...`` finds the product.
    - ``stdin``/``stdout``/``stderr``: as for :class:`subprocess.Popen`.
    - ``stop_timeout``: seconds between SIGTERM and SIGKILL; default ``TimeoutStopSec=``.

    ``svc.pid``, ``svc.process`` (the Popen; the pid is the service's own, as ``MAINPID``),
    ``svc.wait_for(key, value=None, timeout=30)`` -> the first :class:`Notification`
    carrying ``key`` (``"READY"``, ``"STATUS"``, ``"WATCHDOG"``...; raises if the service
    exits first), ``svc.notifications`` (all so far), ``svc.memory_limit()`` (bytes, read
    back from the service's own cgroup; None if unlimited), ``svc.stop()`` -> exit status
    (SIGTERM to every process of the cgroup, SIGKILL after ``stop_timeout``).

Example (the edge agent under its unit)::

    with UnitSandbox(ROOT / "systemd/fedgate-edge.service", binds={
            "/etc/fedgate": config_folder,            # edge.toml, credentials/
            "/var/lib/fedgate-bridge": bridge_state,  # read-only for the edge (ReadOnlyPaths)
            "/var/lib/fedgate-edge": edge_state}) as edge:
        edge.wait_for("READY", timeout=60)
        assert edge.memory_limit() == 1 << 30

Folders bound as state or configuration directories get the owner and mode the unit gives
them (on the host too: they are the same folders); everything else keeps its owner, so make
the files the service reads (a config, a credential bundle) readable by the unit's user.
The service shares the host's network: a broker or a simulator on 127.0.0.1 is reachable.

What is applied, as systemd does it
-----------------------------------
``ExecStart`` (``-`` prefix allowed), ``User``, ``Group``, ``SupplementaryGroups`` (users and
groups are created with ``useradd``/``groupadd --system`` when missing, and left in place,
as a package install would), ``UMask``, ``WorkingDirectory``, ``Environment``,
``NoNewPrivileges``, ``StateDirectory``/``StateDirectoryMode`` (owned by the user, chowned
recursively when the owner differs, mode set), ``ConfigurationDirectory``/
``ConfigurationDirectoryMode`` (root-owned), ``ReadOnlyPaths``, ``ReadWritePaths``,
``ProtectSystem`` (yes, full, strict), ``ProtectHome`` (yes, tmpfs, read-only),
``PrivateTmp``, ``MemoryMax``, ``TimeoutStopSec``, ``WatchdogSec`` (``WATCHDOG_USEC``/
``WATCHDOG_PID``), ``NotifyAccess=main`` (datagrams from other pids are dropped), the
environment systemd sets (``HOME``, ``USER``, ``LOGNAME``, ``SHELL``, ``INVOCATION_ID``,
``NOTIFY_SOCKET``, ``STATE_DIRECTORY``, ``CONFIGURATION_DIRECTORY``) and
``KillMode=control-group`` on stop. Not applied (listed in ``UnitFile.ignored``): system
call filters, capabilities, device policy, ``PrivateDevices``, the ``Protect*`` kernel and
clock settings, address-family and namespace restrictions, and restart policies (the
sandbox never restarts a service).

How: the service runs in a private mount namespace (mounts never propagate to the host).
Paths the unit needs that do not exist on the host (``/etc/fedgate``...) are made inside an
overlay of their parent, so the host is never written; bind sources are pinned first, so
they stay reachable after ``PrivateTmp``/``ProtectHome`` hide ``/tmp`` or ``/root``. The
process joins a child of the test's own memory cgroup and gets ``PR_SET_PDEATHSIG`` (SIGKILL
when the thread that started it ends: start sandboxes from a thread that outlives them, as a
test's own thread does, so that a killed test run leaves no service behind); its
``NOTIFY_SOCKET`` (set for ``Type=notify`` or ``NotifyAccess=``) is an abstract datagram
socket of the harness. The namespace dies with its last process; the cgroup and the harness's
folder under ``/run/fedgate-unit-sandbox`` are removed on exit.
"""

from __future__ import annotations

import contextlib
import ctypes
import grp
import json
import os
import pwd
import re
import select
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RUN_DIR = Path("/run/fedgate-unit-sandbox")
CGROUP_PREFIX = "fedgate-unit-sandbox-"
DEFAULT_PATH = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin")
API_FILESYSTEMS = ("/proc", "/sys", "/dev")
HOME_PATHS = ("/home", "/root", "/run/user")
TMP_PATHS = ("/tmp", "/var/tmp")
SOURCE_TREE = Path(__file__).resolve().parents[1]
# The unit directives applied (module docstring); anything else in [Service] is reported.
APPLIED = frozenset(
    "Type ExecStart User Group SupplementaryGroups UMask WorkingDirectory Environment "
    "NoNewPrivileges StateDirectory StateDirectoryMode ConfigurationDirectory "
    "ConfigurationDirectoryMode ReadOnlyPaths ReadWritePaths ProtectSystem ProtectHome "
    "PrivateTmp MemoryMax TimeoutStopSec WatchdogSec NotifyAccess DynamicUser".split()
)
# Exit statuses of the namespace stage, as systemd numbers them (systemd.exec(5)).
EXIT_CHDIR, EXIT_EXEC, EXIT_GROUP, EXIT_USER, EXIT_CGROUP, EXIT_NAMESPACE = (
    200,
    203,
    216,
    217,
    219,
    226,
)


class SandboxError(Exception):
    """The sandbox could not be set up as the unit asks (the message says which step)."""


# ---- the unit file ---------------------------------------------------------------------------


def parse_seconds(text: str) -> float:
    """systemd time spans: ``30``, ``30s``, ``500ms``, ``2min``, ``1h 30min``, ``infinity``."""
    units = {
        "us": 1e-6,
        "ms": 1e-3,
        "": 1.0,
        "s": 1.0,
        "sec": 1.0,
        "m": 60.0,
        "min": 60.0,
        "h": 3600.0,
        "hr": 3600.0,
        "d": 86400.0,
    }
    text = text.strip()
    if text == "infinity":
        return float("inf")
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", text)
    if not parts or re.sub(r"[\d.\sa-z]", "", text) or any(u not in units for _, u in parts):
        raise SandboxError(f"cannot read the time span {text!r}")
    return sum(float(n) * units[u] for n, u in parts)


def parse_bytes(text: str) -> int | None:
    """``MemoryMax=`` values: bytes with K/M/G/T (base 1024), a percentage, or infinity."""
    text = text.strip()
    if text in ("", "infinity"):
        return None
    if text.endswith("%"):
        with open("/proc/meminfo") as f:
            total_kb = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
        return int(total_kb * 1024 * float(text[:-1]) / 100)
    factor = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(text[-1].upper(), 1)
    number = text[:-1] if factor > 1 else text
    try:
        return int(float(number) * factor)
    except ValueError:
        raise SandboxError(f"cannot read the size {text!r}") from None


def _read_service_section(text: str) -> list[tuple[str, str]]:
    entries: list[tuple[str, str]] = []
    section, pending = "", ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
        elif section == "Service" and "=" in line:
            key, value = line.split("=", 1)
            entries.append((key.strip(), value.strip()))
    return entries


def _boolean(value: str) -> bool:
    return value.lower() in ("1", "yes", "true", "on")


def _mode_or_boolean(value: str) -> str:
    """``ProtectSystem=``/``ProtectHome=``: a boolean or a mode name ("strict", "tmpfs"...)."""
    low = value.lower()
    return "yes" if _boolean(low) else "no" if low in ("0", "no", "false", "off") else low


@dataclass(frozen=True)
class UnitFile:
    """The ``[Service]`` settings the sandbox applies (see the module docstring)."""

    path: Path
    exec_start: tuple[str, ...]
    user: str | None = None
    group: str | None = None
    supplementary_groups: tuple[str, ...] = ()
    umask: int = 0o022
    working_directory: str | None = None
    environment: Mapping[str, str] = field(default_factory=dict)
    no_new_privileges: bool = False
    state_directories: tuple[str, ...] = ()
    state_directory_mode: int = 0o755
    configuration_directories: tuple[str, ...] = ()
    configuration_directory_mode: int = 0o755
    read_only_paths: tuple[str, ...] = ()
    read_write_paths: tuple[str, ...] = ()
    protect_system: str = "no"
    protect_home: str = "no"
    private_tmp: bool = False
    memory_max: int | None = None
    timeout_stop_s: float = 90.0
    watchdog_usec: int = 0
    notify_access: str = "none"
    ignored: tuple[str, ...] = ()

    @classmethod
    def parse(cls, path: str | Path) -> UnitFile:
        path = Path(path)
        lists: dict[str, list[str]] = {}
        scalars: dict[str, str] = {}
        ignored: list[str] = []
        for key, value in _read_service_section(path.read_text()):
            if key not in APPLIED:
                ignored.append(key)
            if key in (
                "SupplementaryGroups",
                "StateDirectory",
                "ConfigurationDirectory",
                "ReadOnlyPaths",
                "ReadWritePaths",
                "Environment",
            ):
                words = shlex.split(value)
                lists[key] = lists.get(key, []) + words if words else []  # empty resets
            else:
                scalars[key] = value
        exec_start = scalars.get("ExecStart", "").lstrip("-:")
        if not exec_start or exec_start[0] in "@+!":
            raise SandboxError(
                f"{path}: ExecStart={exec_start} is missing or has an "
                "unsupported prefix (@, + or !)"
            )
        if _boolean(scalars.get("DynamicUser", "no")):
            raise SandboxError(f"{path}: DynamicUser=yes is not supported")
        env = dict(word.split("=", 1) for word in lists.get("Environment", []))
        notify = scalars.get("NotifyAccess", "main" if scalars.get("Type") == "notify" else "none")
        return cls(
            path=path,
            exec_start=tuple(shlex.split(exec_start)),
            user=scalars.get("User"),
            group=scalars.get("Group"),
            supplementary_groups=tuple(lists.get("SupplementaryGroups", ())),
            umask=int(scalars.get("UMask", "0022"), 8),
            working_directory=scalars.get("WorkingDirectory"),
            environment=env,
            no_new_privileges=_boolean(scalars.get("NoNewPrivileges", "no")),
            state_directories=tuple(lists.get("StateDirectory", ())),
            state_directory_mode=int(scalars.get("StateDirectoryMode", "0755"), 8),
            configuration_directories=tuple(lists.get("ConfigurationDirectory", ())),
            configuration_directory_mode=int(scalars.get("ConfigurationDirectoryMode", "0755"), 8),
            read_only_paths=tuple(lists.get("ReadOnlyPaths", ())),
            read_write_paths=tuple(lists.get("ReadWritePaths", ())),
            protect_system=_mode_or_boolean(scalars.get("ProtectSystem", "no")),
            protect_home=_mode_or_boolean(scalars.get("ProtectHome", "no")),
            private_tmp=_boolean(scalars.get("PrivateTmp", "no")),
            memory_max=parse_bytes(scalars.get("MemoryMax", "infinity")),
            timeout_stop_s=parse_seconds(scalars.get("TimeoutStopSec", "90s")),
            watchdog_usec=int(parse_seconds(scalars.get("WatchdogSec", "0")) * 1e6),
            notify_access=notify,
            ignored=tuple(dict.fromkeys(ignored)),
        )


# ---- users and groups ------------------------------------------------------------------------


def ensure_group(name: str) -> int:
    """The gid of ``name``, creating it as a system group if missing."""
    with contextlib.suppress(KeyError):
        return grp.getgrnam(name).gr_gid
    subprocess.run(["groupadd", "--system", name], capture_output=True)  # 9: raced, exists
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise SandboxError(f"cannot create group {name!r} (groupadd --system)") from None


def ensure_user(name: str, group: str | None) -> pwd.struct_passwd:
    """The passwd entry of ``name``, creating a system user (no home, no shell) if missing."""
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(name)
    gid = ensure_group(group or name)
    subprocess.run(
        [
            "useradd",
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            "--gid",
            str(gid),
            name,
        ],
        capture_output=True,
    )
    try:
        return pwd.getpwnam(name)
    except KeyError:
        raise SandboxError(f"cannot create user {name!r} (useradd --system)") from None


# ---- mount table and cgroups -----------------------------------------------------------------


@dataclass(frozen=True)
class MountEntry:
    mount_point: str
    root: str
    fstype: str
    options: tuple[str, ...]  # per-mount options (ro, nosuid...)
    super_options: tuple[str, ...]  # file system options (for cgroup v1: the controllers)


def _unescape(text: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes (\\040...)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def parse_mountinfo(text: str) -> list[MountEntry]:
    entries = []
    for line in text.splitlines():
        if " - " not in line:
            continue
        left, right = line.split(" - ", 1)
        f, r = left.split(), right.split()
        entries.append(
            MountEntry(
                _unescape(f[4]),
                _unescape(f[3]),
                r[0],
                tuple(f[5].split(",")),
                tuple(r[2].split(",")) if len(r) > 2 else (),
            )
        )
    return entries


@dataclass(frozen=True)
class CgroupLayout:
    """Where a process's memory cgroup lives: ``version`` 1 or 2 and its directory."""

    version: int
    directory: Path

    @property
    def limit_file(self) -> str:
        return "memory.limit_in_bytes" if self.version == 1 else "memory.max"


def find_cgroup(mountinfo: str, proc_cgroup: str) -> CgroupLayout:
    """The memory cgroup of a process, from its ``/proc/PID/cgroup`` and our mount table.

    A cgroup v1 ``memory`` hierarchy wins (hybrid hosts); otherwise the unified (v2) one."""
    mounts = parse_mountinfo(mountinfo)
    lines = [line.split(":", 2) for line in proc_cgroup.splitlines() if line.count(":") >= 2]
    for _, controllers, path in lines:
        if "memory" in controllers.split(","):
            for m in mounts:
                if m.fstype == "cgroup" and "memory" in m.super_options:
                    return CgroupLayout(1, _cgroup_dir(m, path))
    for hierarchy, controllers, path in lines:
        if hierarchy == "0" and controllers == "":
            for m in mounts:
                if m.fstype == "cgroup2":
                    return CgroupLayout(2, _cgroup_dir(m, path))
    raise SandboxError("no memory cgroup: neither a v1 memory hierarchy nor cgroup v2 is mounted")


def _cgroup_dir(mount: MountEntry, path: str) -> Path:
    root = mount.root.rstrip("/")
    rel = path[len(root) :] if root and path.startswith(root + "/") else path
    return Path(mount.mount_point) / rel.lstrip("/")


def read_memory_limit(layout: CgroupLayout) -> int | None:
    """The limit of that cgroup in bytes; None when unlimited."""
    text = (layout.directory / layout.limit_file).read_text().strip()
    if text == "max":
        return None
    value = int(text)
    return None if value >= 1 << 62 else value  # v1 writes "unlimited" as ~2**63


class Cgroup:
    """A child of a parent cgroup that holds the service's processes and its memory limit."""

    def __init__(self, parent: CgroupLayout, memory_max: int | None) -> None:
        self.layout = CgroupLayout(
            parent.version, parent.directory / f"{CGROUP_PREFIX}{_owner_tag()}"
        )
        _remove_stale_cgroups(parent.directory)
        if parent.version == 2 and memory_max is not None:
            _delegate_memory(parent.directory)
        try:
            self.layout.directory.mkdir()
            if memory_max is not None:
                (self.layout.directory / self.layout.limit_file).write_text(str(memory_max))
        except OSError as exc:
            self.remove()
            raise SandboxError(
                f"cannot create memory cgroup {self.layout.directory}: {exc}"
            ) from exc

    @property
    def procs_file(self) -> Path:
        return self.layout.directory / "cgroup.procs"

    def pids(self) -> list[int]:
        try:
            return [int(p) for p in self.procs_file.read_text().split()]
        except FileNotFoundError:
            return []

    def signal_all(self, sig: int) -> None:
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def remove(self, timeout: float = 10.0) -> None:
        """Kill what is left, then remove the cgroup (it must be empty)."""
        deadline = time.monotonic() + timeout
        while self.layout.directory.exists():
            self.signal_all(signal.SIGKILL)
            try:
                self.layout.directory.rmdir()
            except FileNotFoundError:
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise SandboxError(f"cgroup {self.layout.directory} does not empty") from None
                time.sleep(0.02)


def _delegate_memory(parent: Path) -> None:
    if "memory" in (parent / "cgroup.subtree_control").read_text().split():
        return
    try:
        (parent / "cgroup.subtree_control").write_text("+memory")
    except OSError as exc:
        raise SandboxError(
            f"cgroup v2: cannot enable the memory controller for children of {parent} ({exc}); "
            "the kernel refuses it in a cgroup that holds processes: run the tests in a cgroup "
            "whose parent delegates memory, e.g. `systemd-run --scope -p Delegate=yes`"
        ) from exc


def _owner_tag() -> str:
    """``PID-RANDOM``: names what a sandbox makes, so that leftovers of a killed test run
    are told apart from those of a run still going (several may share a host)."""
    return f"{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _stale(name: str) -> bool:
    """Made by a process that is gone (see :func:`_owner_tag`)."""
    parts = name.rsplit("-", 2)
    if len(parts) < 3 or not parts[1].isdigit():
        return False
    pid = parts[1]
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    return False


def _remove_stale_cgroups(parent: Path) -> None:
    """Empty sandbox cgroups left by a test run that was killed."""
    for child in parent.glob(f"{CGROUP_PREFIX}*"):
        with contextlib.suppress(OSError):
            if _stale(child.name) and not (child / "cgroup.procs").read_text().split():
                child.rmdir()


def own_cgroup() -> CgroupLayout:
    return find_cgroup(
        Path("/proc/self/mountinfo").read_text(), Path("/proc/self/cgroup").read_text()
    )


def cgroup_of(pid: int) -> CgroupLayout:
    return find_cgroup(
        Path("/proc/self/mountinfo").read_text(), Path(f"/proc/{pid}/cgroup").read_text()
    )


# ---- sd_notify -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Notification:
    """One datagram: ``fields`` holds its KEY=VALUE lines; ``pid`` is the sender's."""

    pid: int
    fields: Mapping[str, str]
    received: float  # time.monotonic()

    def __contains__(self, key: str) -> bool:
        return key in self.fields


class NotifyListener:
    """An abstract AF_UNIX datagram socket, read by a thread; the address is ``address``."""

    def __init__(self) -> None:
        self.address = f"@fedgate-unit-sandbox/{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.address[1:])
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.settimeout(0.1)
        self.accept_pid: int | None = None  # NotifyAccess=main: only the main process
        self.messages: list[Notification] = []
        self.dropped = 0
        self.changed = threading.Condition()
        self._closing = False
        self.thread = threading.Thread(target=self._read, name="notify-listener", daemon=True)
        self.thread.start()

    def _read(self) -> None:
        creds = socket.CMSG_SPACE(struct.calcsize("3i"))
        while not self._closing:
            try:
                data, ancillary, _, _ = self.sock.recvmsg(65536, creds)
            except (TimeoutError, OSError):
                continue
            pid = next(
                (
                    struct.unpack("3i", d[:12])[0]
                    for level, kind, d in ancillary
                    if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS
                ),
                0,
            )
            with self.changed:
                if self.accept_pid is not None and pid != self.accept_pid:
                    self.dropped += 1
                    continue
                lines = data.decode("utf-8", "replace").split("\n")
                fields = dict(line.split("=", 1) for line in lines if "=" in line)
                self.messages.append(Notification(pid, fields, time.monotonic()))
                self.changed.notify_all()

    def close(self) -> None:
        self._closing = True
        self.thread.join(timeout=2)
        self.sock.close()


# ---- the namespace stage (runs as root in the child, then execs the service) ---------------

_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNS = 0x00020000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_MOVE, MS_REC, MS_PRIVATE = 32, 4096, 8192, 16384, 1 << 18
MS_NOATIME, MS_NODIRATIME, MS_RELATIME = 1024, 2048, 1 << 21
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
# statvfs f_flag bits that a read-only remount must keep (ST_RELATIME differs from MS_).
_KEEP_FLAGS = (
    (2, MS_NOSUID),
    (4, MS_NODEV),
    (8, MS_NOEXEC),
    (1024, MS_NOATIME),
    (2048, MS_NODIRATIME),
    (4096, MS_RELATIME),
)


def _mount(
    source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None
) -> None:
    enc = [None if v is None else v.encode() for v in (source, target, fstype, data)]
    if _libc.mount(enc[0], enc[1], enc[2], ctypes.c_ulong(flags), enc[3]) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} on {target} ({fstype or 'bind'}): {os.strerror(err)}")


def _mounts() -> list[MountEntry]:
    return parse_mountinfo(Path("/proc/self/mountinfo").read_text())


def _under(path: str, prefix: str) -> bool:
    return prefix == "/" or path == prefix or path.startswith(prefix.rstrip("/") + "/")


def _mount_of(path: str) -> str:
    """The mount point of the mount that holds ``path``."""
    return max((m.mount_point for m in _mounts() if _under(path, m.mount_point)), key=len)


class _Namespace:
    """Builds the service's view of the file system from a plan, inside the new namespace."""

    def __init__(self, staging: str) -> None:
        self.staging = staging
        self.ours: list[str] = [staging]  # mounts we made and may create mount points in
        self.count = 0

    def _scratch(self, kind: str, like: str) -> str:
        self.count += 1
        path = f"{self.staging}/{kind}{self.count}"
        if os.path.isdir(like):
            os.mkdir(path)
        else:
            open(path, "w").close()
        return path

    def pin(self, source: str) -> str:
        """Bind ``source`` into staging now, before tmpfs mounts can hide it."""
        pinned = self._scratch("src", source)
        _mount(source, pinned, None, MS_BIND | MS_REC)
        return pinned

    def tmpfs(self, path: str, mode: int) -> None:
        _mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, f"mode={mode:o}")
        self.ours.append(path)

    def mount_point(self, target: str, like: str) -> None:
        """Make ``target`` exist without writing to the host: inside one of our own mounts,
        or in an overlay of its nearest existing parent."""
        if os.path.lexists(target):
            return
        ancestor = os.path.dirname(target)
        while not os.path.exists(ancestor):
            ancestor = os.path.dirname(ancestor)
        if _mount_of(ancestor) not in self.ours:
            self._overlay(ancestor)
        os.makedirs(target if os.path.isdir(like) else os.path.dirname(target), exist_ok=True)
        if not os.path.isdir(like):
            open(target, "w").close()

    def _overlay(self, directory: str) -> None:
        # mounts below `directory` would be hidden by the overlay: keep them and move them back
        below = [
            m.mount_point
            for m in _mounts()
            if m.mount_point != directory and _under(m.mount_point, directory)
        ]
        top = [p for p in dict.fromkeys(below) if not any(q != p and _under(p, q) for q in below)]
        kept = [(p, self.pin(p)) for p in top]
        upper, work = self._scratch("upper", "/"), self._scratch("work", "/")
        esc = directory.replace("\\", "\\\\").replace(",", "\\,").replace(":", "\\:")
        _mount(
            "overlay", directory, "overlay", 0, f"lowerdir={esc},upperdir={upper},workdir={work}"
        )
        self.ours.append(directory)
        for path, pinned in kept:
            self.mount_point(path, pinned)
            _mount(pinned, path, None, MS_MOVE)

    def bind(self, pinned: str, target: str, readonly: bool) -> None:
        self.mount_point(target, pinned)
        _mount(pinned, target, None, MS_BIND | MS_REC)
        if readonly:
            _remount_readonly(target)

    def protect(self, rules: Sequence[tuple[str, str]]) -> None:
        """Remount read-only every mount whose deepest matching rule says "ro"."""
        mount_points = {m.mount_point for m in _mounts()}
        for path, action in rules:
            if action != "keep" and os.path.isdir(path) and path not in mount_points:
                _mount(path, path, None, MS_BIND | MS_REC)  # so it has flags of its own
        seen: set[str] = set()
        for m in reversed(_mounts()):  # the last entry of a mount point is the visible one
            if m.mount_point in seen:
                continue
            seen.add(m.mount_point)
            matching = [(len(p), a) for p, a in rules if _under(m.mount_point, p)]
            if matching and max(matching)[1] == "ro" and "ro" not in m.options:
                try:
                    _remount_readonly(m.mount_point)
                except FileNotFoundError:
                    pass  # under a tmpfs of ours (PrivateTmp...): hidden, so out of reach


def _remount_readonly(path: str) -> None:
    flags = os.statvfs(path).f_flag  # FileNotFoundError if the path is hidden
    keep = sum(ms for st, ms in _KEEP_FLAGS if flags & st)
    _mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | keep)


def _enter(plan: dict[str, Any]) -> None:
    """The child: join the cgroup, build the namespace, drop privileges, exec. Never returns;
    a failure is written to the parent's pipe and ends the process with systemd's status."""
    errfd = plan["errfd"]
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    step, status = "joining the cgroup", EXIT_CGROUP
    try:
        Path(plan["cgroup_procs"]).write_text(str(os.getpid()))
        step, status = "setting up the mount namespace", EXIT_NAMESPACE
        if _libc.unshare(CLONE_NEWNS) != 0:
            raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS) failed")
        _mount(None, "/", None, MS_REC | MS_PRIVATE)
        ns = _Namespace(plan["staging"])
        _mount("tmpfs", ns.staging, "tmpfs", MS_NOSUID | MS_NODEV, "mode=700")
        pinned = [(ns.pin(b["source"]), b) for b in plan["binds"]]
        for hide in plan["hide"]:
            ns.tmpfs(hide["path"], hide["mode"])
        for source, b in sorted(pinned, key=lambda x: x[1]["target"].count("/")):
            ns.bind(source, b["target"], b["readonly"])
        ns.protect([tuple(rule) for rule in plan["rules"]])
        step, status = "setting the groups", EXIT_GROUP
        os.setgroups(plan["groups"])
        os.setgid(plan["gid"])
        step, status = "setting the user", EXIT_USER
        os.setuid(plan["uid"])
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # the uid change cleared it
        if plan["no_new_privileges"]:
            _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        os.umask(plan["umask"])
        step, status = f"changing to WorkingDirectory {plan['cwd']}", EXIT_CHDIR
        try:
            os.chdir(plan["cwd"])
        except OSError:
            if not plan["cwd_optional"]:
                raise
            os.chdir("/")
        env, argv = plan["env"], plan["argv"]
        if "WATCHDOG_USEC" in env:
            env["WATCHDOG_PID"] = str(os.getpid())
        step, status = f"executing {argv[0]}", EXIT_EXEC
        program = argv[0] if "/" in argv[0] else shutil.which(argv[0], path=env["PATH"])
        if program is None:
            raise FileNotFoundError(f"not found in PATH={env['PATH']}")
        os.set_inheritable(errfd, False)  # closed by a successful exec: the parent sees EOF
        os.execve(program, argv, env)
    except BaseException as exc:  # noqa: BLE001 (everything must reach the parent)
        os.write(errfd, f"{step}: {exc}".encode())
        os._exit(status)


# ---- the sandbox (parent side) ---------------------------------------------------------------


def python_installation() -> list[Path]:
    """The running interpreter's folders and this source tree (what a test's service runs)."""
    paths: list[str | Path] = [
        sys.prefix,
        sys.base_prefix,
        sys.exec_prefix,
        sys.base_exec_prefix,
        SOURCE_TREE,
    ]
    paths += [p for p in sys.path if p and os.path.isdir(p)]
    out: list[Path] = []
    for p in sorted({Path(p).resolve() for p in paths}, key=lambda p: len(p.parts)):
        if not any(p.is_relative_to(q) for q in out):
            out.append(p)
    return out


def _chown_tree(path: Path, uid: int, gid: int) -> None:
    for root, dirs, files in os.walk(path):
        for name in [root, *(os.path.join(root, n) for n in dirs + files)]:
            os.lchown(name, uid, gid)


class UnitSandbox:
    """Runs one unit's service under its constraints (module docstring)."""

    def __init__(
        self,
        unit: UnitFile | str | Path,
        *,
        binds: Mapping[str, str | Path] | None = None,
        command: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
        expose: Sequence[str | Path] | None = None,
        path: Sequence[str] | None = None,
        stdin: Any = None,
        stdout: Any = None,
        stderr: Any = None,
        stop_timeout: float | None = None,
    ) -> None:
        self.unit = unit if isinstance(unit, UnitFile) else UnitFile.parse(unit)
        self.binds = {os.path.normpath(k): Path(v) for k, v in (binds or {}).items()}
        self.argv = list(command) if command is not None else list(self.unit.exec_start)
        self.extra_env = dict(env or {})
        self.expose = [Path(p) for p in (expose if expose is not None else python_installation())]
        self.path = list(path) if path is not None else [str(Path(sys.executable).parent)]
        self.stdio = {"stdin": stdin, "stdout": stdout, "stderr": stderr}
        self.stop_timeout = stop_timeout if stop_timeout is not None else self.unit.timeout_stop_s
        self.process: subprocess.Popen[Any] | None = None
        self.work_dir: Path | None = None  # the harness's folder under RUN_DIR (removed on exit)
        self.cgroup: Cgroup | None = None
        self.listener: NotifyListener | None = None
        self._cleanup = contextlib.ExitStack()

    # -- lifecycle

    def __enter__(self) -> UnitSandbox:
        if self.process is None:  # not started with start() already
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        if os.geteuid() != 0:
            raise SandboxError("the unit sandbox needs root (mounts, cgroups, users)")
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop the service and remove the cgroup, the socket and the harness's folder."""
        self._cleanup.close()

    def _start(self) -> None:
        unit = self.unit
        user = ensure_user(unit.user, unit.group) if unit.user else pwd.getpwuid(0)
        gid = ensure_group(unit.group) if unit.group else user.pw_gid
        groups = sorted({gid, *(ensure_group(g) for g in unit.supplementary_groups)})
        RUN_DIR.mkdir(mode=0o700, exist_ok=True)
        for stale in (d for d in RUN_DIR.iterdir() if _stale(d.name)):
            with contextlib.suppress(SandboxError):
                _remove_work_dir(stale)
        work = RUN_DIR / f"{unit.path.stem}-{_owner_tag()}"
        work.mkdir(mode=0o700)
        self.work_dir = work
        self._cleanup.callback(_remove_work_dir, work)
        binds = dict(self.binds)
        state = [f"/var/lib/{d}" for d in unit.state_directories]
        for target in state:
            binds.setdefault(target, work / "state" / Path(target).name)
            self._make_directory(binds[target], unit.state_directory_mode, user.pw_uid, gid)
        config = [f"/etc/{d}" for d in unit.configuration_directories]
        for target in config:
            binds.setdefault(target, work / "config" / Path(target).name)
            self._make_directory(binds[target], unit.configuration_directory_mode, 0, 0)
        self.cgroup = Cgroup(own_cgroup(), unit.memory_max)
        self._cleanup.callback(self.cgroup.remove)
        self.listener = NotifyListener()
        self._cleanup.callback(self.listener.close)
        plan = self._plan(work, binds, state, config, user, gid, groups)
        self._spawn(work, plan)

    def _make_directory(self, path: Path, mode: int, uid: int, gid: int) -> None:
        path.mkdir(parents=True, exist_ok=True)
        stat = path.stat()
        if (stat.st_uid, stat.st_gid) != (uid, gid):
            _chown_tree(path, uid, gid)
        path.chmod(mode)

    def _plan(
        self,
        work: Path,
        binds: dict[str, Path],
        state: list[str],
        config: list[str],
        user: pwd.struct_passwd,
        gid: int,
        groups: list[int],
    ) -> dict[str, Any]:
        unit = self.unit
        hidden = ([*HOME_PATHS] if unit.protect_home in ("yes", "tmpfs") else []) + (
            [*TMP_PATHS] if unit.private_tmp else []
        )
        hidden = [h for h in hidden if os.path.isdir(h)]
        mounts = [{"source": str(src), "target": t, "readonly": False} for t, src in binds.items()]
        for p in self.expose:
            if any(_under(str(p), h) for h in hidden) and p.exists():
                mounts.append({"source": str(p), "target": str(p), "readonly": True})
        rules: list[tuple[str, str]] = [(p, "keep") for p in API_FILESYSTEMS]
        rules += {
            "strict": [("/", "ro")],
            "full": [("/usr", "ro"), ("/boot", "ro"), ("/efi", "ro"), ("/etc", "ro")],
            "yes": [("/usr", "ro"), ("/boot", "ro"), ("/efi", "ro")],
        }.get(unit.protect_system, [])
        if unit.protect_home == "read-only":
            rules += [(h, "ro") for h in HOME_PATHS]
        rules += [(t, "rw") for t in state] + [(t, "rw") for t in hidden if t in TMP_PATHS]
        for entry, action in [(p, "ro") for p in unit.read_only_paths] + [
            (p, "rw") for p in unit.read_write_paths
        ]:
            optional, target = entry.startswith("-"), os.path.normpath(entry.lstrip("-+"))
            if target not in binds:
                if not os.path.exists(target):
                    if optional:
                        continue
                    raise SandboxError(f"{unit.path}: {target} does not exist (and has no '-')")
                mounts.append({"source": target, "target": target, "readonly": False})
            rules.append((target, action))
        env = {
            "PATH": ":".join([*self.path, *DEFAULT_PATH]),
            "HOME": user.pw_dir,
            "USER": user.pw_name,
            "LOGNAME": user.pw_name,
            "SHELL": user.pw_shell,
            "INVOCATION_ID": uuid.uuid4().hex,
        }
        assert self.listener is not None and self.cgroup is not None
        if unit.notify_access != "none":  # as systemd: Type=notify or NotifyAccess= set
            env["NOTIFY_SOCKET"] = self.listener.address
        if unit.watchdog_usec:
            env["WATCHDOG_USEC"] = str(unit.watchdog_usec)
        if state:
            env["STATE_DIRECTORY"] = ":".join(state)
        if config:
            env["CONFIGURATION_DIRECTORY"] = ":".join(config)
        env.update(unit.environment)
        env.update(self.extra_env)
        return {
            "staging": str(work / "ns"),
            "cgroup_procs": str(self.cgroup.procs_file),
            "binds": mounts,
            "hide": [{"path": h, "mode": 0o1777 if h in TMP_PATHS else 0o755} for h in hidden],
            "rules": rules,
            "uid": user.pw_uid,
            "gid": gid,
            "groups": groups,
            "umask": unit.umask,
            "no_new_privileges": unit.no_new_privileges,
            "cwd": (unit.working_directory or "/").lstrip("-") or "/",
            "cwd_optional": (unit.working_directory or "").startswith("-"),
            "argv": self.argv,
            "env": env,
        }

    def _spawn(self, work: Path, plan: dict[str, Any]) -> None:
        (work / "ns").mkdir()
        read_end, write_end = os.pipe()
        plan["errfd"] = write_end
        plan_file = work / "plan.json"
        plan_file.write_text(json.dumps(plan))
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-I", str(Path(__file__).resolve()), "--enter", str(plan_file)],
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
                pass_fds=(write_end,),
                start_new_session=True,
                **self.stdio,
            )
        finally:
            os.close(write_end)
        self._cleanup.callback(self.stop)
        assert self.listener is not None
        with self.listener.changed:
            if self.unit.notify_access == "main":
                self.listener.accept_pid = self.process.pid
        error = _read_until_eof(read_end, timeout=60.0)
        if error:
            self.process.wait(timeout=10)
            raise SandboxError(
                f"{self.unit.path.name}: {error} (exit status {self.process.returncode})"
            )

    # -- while it runs

    @property
    def pid(self) -> int:
        assert self.process is not None, "not started"
        return self.process.pid

    @property
    def notifications(self) -> list[Notification]:
        assert self.listener is not None, "not started"
        with self.listener.changed:
            return list(self.listener.messages)

    def wait_for(self, key: str, value: str | None = None, timeout: float = 30.0) -> Notification:
        """The first notification with ``key`` (and ``value``); raises if the service exits or
        ``timeout`` passes first."""
        assert self.listener is not None and self.process is not None, "not started"
        deadline = time.monotonic() + timeout
        with self.listener.changed:
            while True:
                for n in self.listener.messages:
                    if key in n.fields and (value is None or n.fields[key] == value):
                        return n
                if self.process.poll() is not None:
                    raise SandboxError(
                        f"{self.unit.path.name} exited with {self.process.returncode} "
                        f"before {key}=; got {self.listener.messages}"
                    )
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"no {key}= from {self.unit.path.name} in {timeout} s; "
                        f"got {self.listener.messages}"
                    )
                self.listener.changed.wait(0.1)

    def memory_limit(self) -> int | None:
        """MemoryMax as the kernel applies it to the main process (read from its cgroup)."""
        return read_memory_limit(cgroup_of(self.pid))

    def stop(self) -> int | None:
        """SIGTERM to every process of the service, SIGKILL after ``stop_timeout``; returns
        the main process's exit status (negative: killed by that signal)."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            assert self.cgroup is not None
            self.cgroup.signal_all(signal.SIGTERM)  # KillMode=control-group
            if self.process.pid not in self.cgroup.pids():  # still in the namespace stage
                self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
        if self.cgroup is not None:
            self.cgroup.signal_all(signal.SIGKILL)
        return self.process.wait()


def _read_until_eof(fd: int, timeout: float) -> str:
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return "the namespace stage did not finish in time"
            chunk = os.read(fd, 4096)
            if not chunk:
                return b"".join(chunks).decode("utf-8", "replace")
            chunks.append(chunk)
    finally:
        os.close(fd)


def _remove_work_dir(work: Path) -> None:
    """Remove the harness's folder, unless something is still mounted below it here (then
    deleting would reach into the bound folders)."""
    mounted = [m.mount_point for m in _mounts() if _under(m.mount_point, str(work))]
    if mounted:
        raise SandboxError(f"refusing to delete {work}: still mounted here: {mounted}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--enter":
        _enter(json.loads(Path(sys.argv[2]).read_text()))
    sys.exit("usage: unit_sandbox.py --enter PLAN (started by UnitSandbox)")
