"""Stage strings: how an encoded update says what was done to it, and the layout that follows.

An :class:`~fedcore.protocol.messages.EncodedDelta` carries ``stages``, a tuple of short
strings in the order they were applied on the gateway::

    clip:<norm>        L2 clipping to <norm> (informational: it cannot be undone)
    noise:<z>          Gaussian noise with sigma = z * clip norm (informational)
    topk:<fraction>    keep the ceil(fraction * n) largest-magnitude entries of the flat delta
    int8               stochastic int8 quantization, one scale per layer
    int8:<chunk>       stochastic int8 quantization, one scale per <chunk> consecutive values
    zstd | zlib        lossless entropy coding of all parts as one byte string

Each stage appears at most once and in this order; anything else is a peer's mistake
(``RemoteProtocolError("bad_encoding")``). Because every size follows from the stages and
the model's shapes (k is a function of the fraction and n), the decoder knows the exact
layout of the parts before it reads them: it never trusts a length it did not compute.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedcore.errors import RemoteProtocolError

ENTROPY_CODECS = ("zstd", "zlib")
_ORDER = ("clip", "noise", "topk", "int8", "entropy")
MAX_INT8_CHUNK = 1 << 24


@dataclass(frozen=True, slots=True)
class StagePlan:
    """The parsed form of a stage tuple."""

    clip_norm: float = 0.0  # 0 = not clipped
    noise_multiplier: float = 0.0  # 0 = no noise
    topk_fraction: float = 0.0  # 0 = dense
    int8: bool = False
    int8_chunk: int = 0  # 0 = one scale per layer
    entropy: str = ""  # "" | "zstd" | "zlib"

    @property
    def compressed(self) -> bool:
        """Whether parts use the flat layout (any compression stage) instead of one per layer."""
        return self.topk_fraction > 0 or self.int8 or bool(self.entropy)

    @property
    def lossy(self) -> bool:
        return self.topk_fraction > 0 or self.int8


def _number(stage: str, text: str, reason: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise RemoteProtocolError(reason, f"stage {stage!r}: {text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise RemoteProtocolError(reason, f"stage {stage!r}: value must be finite and >= 0")
    return value


def parse_stages(stages: tuple[str, ...] | list[str], reason: str = "bad_encoding") -> StagePlan:
    """Parse stage strings into a :class:`StagePlan`; ``reason`` names the error counter."""
    fields: dict[str, object] = {}
    last = -1
    for stage in stages:
        if not isinstance(stage, str) or len(stage) > 64:
            raise RemoteProtocolError(reason, f"stage {stage!r} is not a short string")
        name, _, arg = stage.partition(":")
        key = "entropy" if name in ENTROPY_CODECS else name
        if key not in _ORDER:
            raise RemoteProtocolError(reason, f"unknown stage {stage!r}")
        position = _ORDER.index(key)
        if position <= last:
            raise RemoteProtocolError(reason, f"stage {stage!r} repeated or out of order in {tuple(stages)}")
        last = position
        if key == "clip":
            fields["clip_norm"] = _number(stage, arg, reason)
        elif key == "noise":
            fields["noise_multiplier"] = _number(stage, arg, reason)
        elif key == "topk":
            fraction = _number(stage, arg, reason)
            if not 0 < fraction <= 1:
                raise RemoteProtocolError(reason, f"stage {stage!r}: fraction must be in (0, 1]")
            fields["topk_fraction"] = fraction
        elif key == "int8":
            fields["int8"] = True
            if arg:
                if not arg.isdigit() or not 1 <= int(arg) <= MAX_INT8_CHUNK:
                    raise RemoteProtocolError(reason, f"stage {stage!r}: chunk must be 1..{MAX_INT8_CHUNK}")
                fields["int8_chunk"] = int(arg)
        elif arg:
            raise RemoteProtocolError(reason, f"stage {stage!r} takes no argument")
        else:
            fields["entropy"] = name
    return StagePlan(**fields)  # type: ignore[arg-type]


def topk_count(n: int, fraction: float) -> int:
    """How many entries top-k keeps out of ``n``: at least one, at most all."""
    if n == 0:
        return 0
    # the small epsilon keeps e.g. 0.01 * 10000 from becoming 101 through float error
    return min(n, max(1, math.ceil(fraction * n - 1e-9)))


def num_scales(plan: StagePlan, num_values: int, num_layers: int) -> int:
    if not plan.int8:
        return 0
    if plan.int8_chunk:
        return -(-num_values // plan.int8_chunk)
    return num_layers


def flat_layout(plan: StagePlan, shapes: tuple[tuple[int, ...], ...]) -> list[tuple[np.dtype, int]]:
    """(dtype, element count) of each part before entropy coding, for the flat layout.

    Parts: ``[index gaps <u4 (k)]`` if top-k, then either ``[values <f4 (m)]`` or, with int8,
    ``[quantized i1 (m), scales <f4 (s)]``.
    """
    n = sum(math.prod(s) for s in shapes)
    layout: list[tuple[np.dtype, int]] = []
    m = n
    if plan.topk_fraction > 0:
        m = topk_count(n, plan.topk_fraction)
        layout.append((np.dtype("<u4"), m))
    if plan.int8:
        layout.append((np.dtype("i1"), m))
        layout.append((np.dtype("<f4"), num_scales(plan, m, len(shapes))))
    else:
        layout.append((np.dtype("<f4"), m))
    return layout
