"""The fedgate error hierarchy: every error says whose fault it was.

- ``LocalProtocolError``: we misused our own API (a bug here). Crash loudly.
- ``RemoteProtocolError``: a peer sent something bad (malformed, unsigned, replayed,
  oversized...). The caller logs it, counts it under ``reason`` and drops the message.
- ``ConfigError``: an operator's config is wrong; names the file, key and value.
- ``TransportError``: the broker or the network failed; the runtime retries.
- ``NotAuthorizedError``: the broker refused us (our certificate, or a publish on our own
  topic): an identity or ACL problem that retrying cannot fix.

Process-fatal errors map to documented exit codes (see ``EXIT_CODES``) that systemd units
act on (``RestartPreventExitStatus`` for config errors).
"""

from __future__ import annotations

from typing import Any


class FedgateError(Exception):
    """Base of every error fedgate raises on purpose."""

    exit_code = 1


class LocalProtocolError(FedgateError):
    """Our own code used a state machine or codec wrongly: a bug in fedgate."""

    exit_code = 70  # EX_SOFTWARE


class RemoteProtocolError(FedgateError):
    """A peer's message was rejected. ``reason`` is a short stable counter key."""

    exit_code = 76  # EX_PROTOCOL

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class ConfigError(FedgateError):
    """A config file is wrong. The message names the file, the key and the value."""

    exit_code = 78  # EX_CONFIG

    def __init__(self, file: str, key: str, value: Any, problem: str) -> None:
        self.file = file
        self.key = key
        self.value = value
        self.problem = problem
        super().__init__(f"{file}: key '{key}' = {value!r}: {problem}")


class TransportError(FedgateError):
    """The broker or the network failed; transient, the runtime retries."""

    exit_code = 69  # EX_UNAVAILABLE


class NotAuthorizedError(FedgateError):
    """The broker refused this service: its certificate (unknown CA, revoked, expired) or a
    publish on its own topic (typically the configured id differs from the certificate's
    name, which the ACL uses). Retrying cannot fix it; an operator must."""

    exit_code = 77  # EX_NOPERM


EXIT_CODES: dict[int, str] = {
    0: "clean shutdown",
    1: "unexpected error",
    69: "transport unavailable (broker unreachable after retries)",
    70: "internal error (a bug in fedgate)",
    76: "protocol error that cannot be recovered",
    77: "not authorized by the broker (certificate refused, or ACL denies our own topic)",
    78: "configuration error (fix the config; systemd does not restart)",
    130: "interrupted (Ctrl-C)",
}
