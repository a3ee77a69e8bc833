"""The one place that picks the fused primitive or its pure-MLX reference.

Modes: "fused" (default: the C++ extension), "reference" (pure MLX, reference.py)
and "check" (both on the same inputs; the fused result is used and the largest
absolute difference per op is recorded in `check_report()`).
"""

from __future__ import annotations

import contextlib
import math

import mlx.core as mx

from . import reference

MODES = ("fused", "reference", "check")
_mode = "fused"
_diffs: dict[str, float] = {}


def set_mode(mode: str) -> None:
    global _mode
    if mode not in MODES:
        raise ValueError(f"ops mode must be one of {MODES}, got {mode!r}")
    _mode = mode


def mode() -> str:
    return _mode


@contextlib.contextmanager
def use_mode(new: str):
    old = _mode
    set_mode(new)
    try:
        yield
    finally:
        set_mode(old)


def use_reference(flag: bool = True):
    return use_mode("reference" if flag else "fused")


def check_report() -> dict[str, float]:
    """Largest |fused - reference| seen per op since the last reset (check mode)."""
    return dict(_diffs)


def reset_check_report() -> None:
    _diffs.clear()


def _ext():
    from . import _ext as ext  # imported lazily: mlx.core must be loaded first

    return ext


def _record(name: str, fused, ref) -> None:
    worst = max(float(mx.max(mx.abs(a.astype(mx.float32) - b.astype(mx.float32))))
                for a, b in zip(fused, ref))
    _diffs[name] = max(_diffs.get(name, 0.0), worst)


def ring_attention(q, k, v, k_cache, v_cache, pos, *, rope_max_period: float | None = 10000.0,
                   scale: float | None = None):
    """See reference.ring_attention; returns (out, k_cache', v_cache')."""
    if _mode == "reference":
        return reference.ring_attention(q, k, v, k_cache, v_cache, pos,
                                        rope_max_period=rope_max_period, scale=scale)
    pos = mx.array(pos).astype(mx.int32)
    D = q.shape[-1]
    fused = tuple(_ext().ring_attention(
        q, k, v, k_cache, v_cache, pos,
        1.0 / math.sqrt(D) if scale is None else float(scale),
        0.0 if rope_max_period is None else float(rope_max_period)))
    if _mode == "check":
        ref = reference.ring_attention(q, k, v, k_cache, v_cache, pos,
                                       rope_max_period=rope_max_period, scale=scale)
        _record("ring_attention", fused, ref)
    return fused
