"""Model lineages: which run of a task a model, a round or a deployment belongs to.

A lineage starts when an aggregator starts from an empty state (a new task, a changed
model architecture, or state that was lost) and lasts as long as its state. Its id is the
UTC start time plus a random suffix, ``20261202T103000Z-9f3a``: ids sort by start time, so
gateways follow a *newer* lineage the aggregator announces (signed) and refuse an older
one, which is how a replayed or stale retained message is kept from taking them back.
The empty id is older than every lineage (messages of aggregators before lineages).
"""

from __future__ import annotations

import re
import time

_ID = re.compile(r"^[0-9]{8}T[0-9]{6}Z-[0-9a-f]{4,16}$")


def new_lineage(now: float, suffix: bytes) -> str:
    """A lineage id for a start at unix time ``now``; ``suffix``: 2-8 random bytes."""
    if not 2 <= len(suffix) <= 8:
        raise ValueError("the suffix takes 2 to 8 random bytes")
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now)) + "-" + suffix.hex()


def is_lineage(value: str) -> bool:
    return bool(_ID.match(value))


def is_newer(candidate: str, held: str) -> bool:
    """Whether ``candidate`` started after ``held`` (ids sort by start time)."""
    return candidate > held
