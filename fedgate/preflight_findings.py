"""The values `fedgate config check` works with: a loaded service config (:class:`Subject`)
and one line of the report (:class:`Finding`). Shared by ``fedgate.preflight`` (files,
credentials, the broker) and ``fedgate.preflight_data`` (a gateway's sample store)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedcore.service_config import BrokerConfig
from fedcore.transport.connection import ConnectionWatch
from fedcore.transport.paho import PahoTransport


class UsageError(Exception):
    """``--user`` cannot be honoured (unknown user, not root): a problem of the command line."""


@dataclass(frozen=True, slots=True)
class NamedPath:
    """A path the config names: a file to read, or a folder to write (``folder``)."""

    key: str
    path: Path
    folder: bool = False
    note: str = ""
    later: str = ""  # a file another service creates: why it may not exist yet


@dataclass(frozen=True, slots=True)
class Finding:
    """One line of the report. ``exit_code`` 0: ok (or skipped, when ``skipped``)."""

    check: str
    message: str
    exit_code: int = 0
    file: str = ""
    key: str = ""
    value: str = ""
    skipped: bool = False

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def line(self) -> str:
        if self.skipped:
            return f"skip     {self.check}: {self.message}"
        if self.ok:
            return f"ok       {self.check}: {self.message}"
        where = f"{self.file}: key '{self.key}' = {self.value!r}: " if self.key else ""
        return f"PROBLEM  {self.check}: {where}{self.message} (exit {self.exit_code})"


@dataclass
class Subject:
    """A loaded service config and what its checks need to know about it."""

    kind: str  # "edge" | "aggregator"
    file: str
    config: Any
    broker: BrokerConfig
    identity_keys: tuple[tuple[str, str], ...]  # (key, configured id) the certificate must name
    paths: tuple[NamedPath, ...]  # files to read, folders to write
    security: dict[str, Path]
    signer: str  # whose key the keyring must hold for our signing key
    subscriptions: tuple[str, ...]
    probe_topic: str  # our own topic, where an empty non-retained publish disturbs nobody
    user: str | None = None
    timeout_s: float = 10.0
    live: bool = False
    session: bool = False  # --session: open a real session (SUBACK/PUBACK) as the service
    transport: PahoTransport | None = field(default=None, repr=False)
    watch: ConnectionWatch | None = field(default=None, repr=False)

    @property
    def identity(self) -> str:
        return self.identity_keys[0][1]

    def problem(self, check: str, key: str, value: object, message: str, code: int) -> Finding:
        return Finding(check, message, code, self.file, key, str(value))


Check = Callable[[Subject], list[Finding]]
