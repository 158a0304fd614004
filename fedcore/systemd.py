"""sd_notify(3) for the services: READY, STATUS, WATCHDOG and STOPPING datagrams.

A dozen lines of stdlib socket code (the sdnotify package does the same and silently
nothing without ``$NOTIFY_SOCKET``, as this does). The socket address and the watchdog
interval come from the environment, read once by each service's main module.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("fedgate.systemd")


class SystemdNotifier:
    """One datagram per state to ``$NOTIFY_SOCKET``; a no-op when not run by systemd."""

    def __init__(self, address: str | None, watchdog_usec: int = 0) -> None:
        self.address = address
        # ping at half the watchdog interval, as sd_watchdog_enabled(3) recommends
        self.watchdog_interval = watchdog_usec / 2e6 if watchdog_usec > 0 else 0.0
        self._last_ping = 0.0

    @classmethod
    def from_environment(cls) -> SystemdNotifier:
        usec = os.environ.get("WATCHDOG_USEC", "")
        return cls(os.environ.get("NOTIFY_SOCKET"), int(usec) if usec.isdigit() else 0)

    def notify(self, state: str) -> None:
        if not self.address:
            return
        addr = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.connect(addr)
                sock.sendall(state.encode())
        except OSError as exc:  # systemd gone: nothing to tell, keep working
            log.debug("sd_notify failed: %s", exc)

    def watchdog(self) -> None:
        """Ping the watchdog if it is time; call it from the service's loop."""
        if not self.watchdog_interval:
            return
        now = time.monotonic()
        if now - self._last_ping >= self.watchdog_interval:
            self._last_ping = now
            self.notify("WATCHDOG=1")
