"""Who may read the broker folder: handing ``broker/`` to the account Mosquitto runs as.

Theory of operation
-------------------
Mosquitto 2.0 started as root reads only mosquitto.conf as root. It then switches to the
conf's ``user`` (``mosquitto`` unless told otherwise) and reads everything else as that
user: the persistence file (and writes it, into ``broker/data/``), the ACL, cafile,
certfile, keyfile and crlfile; on ``kill -HUP`` it re-reads the conf, the ACL, the
certificates and the CRL, still as that user. Started as any other user it ignores
``user`` and reads everything as itself.

So, when provisioning runs as root and the run user exists, :func:`hand_over` makes that
user the owner of ``broker/`` and everything in it (folders 0700, files keep their modes,
secrets 0600), and makes the fleet root 0711: other accounts may pass through it to
``broker/`` but cannot list it. The CA key's folder and every other bundle stay 0700
root. :func:`access_notes` explains, one line each, what would still keep Mosquitto out:
a run user that does not exist, a folder on the way it may not pass through, or a broker
folder that belongs to a non-root user who provisioned it.
"""

from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path

from broker_config.render import FleetLayout


def run_user(name: str | None) -> pwd.struct_passwd | None:
    """The account ``name`` on this machine, or None when it does not exist."""
    try:
        return pwd.getpwnam(name or "")
    except KeyError:
        return None


def hand_over(layout: FleetLayout, run_as: str | None) -> bool:
    """Give ``broker/`` to ``run_as`` when we are root and that account exists.

    Returns True when it did. Without root nothing can be chowned; without ``run_as`` (a
    fleet provisioned before the run user was recorded) nothing changes either.
    """
    user = run_user(run_as)
    if os.geteuid() != 0 or user is None or not layout.broker_dir.is_dir():
        return False
    for folder, _dirs, files in os.walk(layout.broker_dir):
        os.chown(folder, user.pw_uid, user.pw_gid, follow_symlinks=False)
        os.chmod(folder, 0o700)
        for name in files:
            os.chown(os.path.join(folder, name), user.pw_uid, user.pw_gid, follow_symlinks=False)
    # Traversable, not listable, when another account must reach broker/ through it.
    os.chmod(layout.root, 0o711 if user.pw_uid != os.geteuid() else 0o700)
    return True


def first_closed_folder(path: Path, user: pwd.struct_passwd) -> Path | None:
    """The first folder on the way to (and including) ``path`` that ``user`` may not enter."""
    if user.pw_uid == 0:
        return None
    groups = set(os.getgrouplist(user.pw_name, user.pw_gid))
    for folder in [*reversed(path.parents), path]:
        st = folder.stat()
        if st.st_uid == user.pw_uid:
            bit = stat.S_IXUSR
        elif st.st_gid in groups:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return folder
    return None


def access_notes(layout: FleetLayout, run_as: str | None) -> list[str]:
    """One line per reason why Mosquitto could not read ``broker/`` (empty: it can)."""
    if not run_as:
        return []
    broker_dir = layout.broker_dir.resolve()
    if os.geteuid() != 0:
        me = pwd.getpwuid(os.geteuid()).pw_name
        if me == run_as:
            return []
        return [
            f"{broker_dir} belongs to {me}: start Mosquitto as {me}, or re-run `fedgate provision "
            f"broker` as root to hand it to {run_as} (Mosquitto started as root switches to {run_as})"
        ]
    user = run_user(run_as)
    if user is None:
        return [
            f"user {run_as!r} does not exist here, so {broker_dir} was not handed to it: install "
            "Mosquitto (its package creates the user) or re-run with --user naming Mosquitto's account"
        ]
    closed = first_closed_folder(broker_dir, user)
    if closed is not None:
        mode = stat.S_IMODE(closed.stat().st_mode)
        return [
            f"{run_as} cannot enter {closed} (mode {mode:o}), so Mosquitto cannot reach "
            f"{broker_dir}: keep the fleet folder where {run_as} can pass (e.g. under /srv)"
        ]
    return []
