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


def set_reference_mode(flag: bool) -> None:
    set_mode("reference" if flag else "fused")


def use_reference(flag: bool = True):
    """Context manager: the pure-MLX references inside (or the fused ops, flag=False)."""
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
    worst = max((float(mx.max(mx.abs(a.astype(mx.float32) - b.astype(mx.float32))))
                 for a, b in zip(fused, ref) if a.size), default=0.0)
    _diffs[name] = max(_diffs.get(name, 0.0), worst)


def ring_attention(q, k, v, k_cache, v_cache, pos, *, rope_max_period: float | None = 10000.0,
                   scale: float | None = None):
    """See reference.ring_attention; returns (out, k_cache', v_cache')."""
    if _mode == "reference":
        return reference.ring_attention(q, k, v, k_cache, v_cache, pos,
                                        rope_max_period=rope_max_period, scale=scale)
    # The C++ signature takes mx.array only (no implicit conversion of ints/numpy).
    q, k, v, k_cache, v_cache = (x if isinstance(x, mx.array) else mx.array(x)
                                 for x in (q, k, v, k_cache, v_cache))
    pos = reference.positions(pos, q.shape[0])
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


def conv1d_stream(x, previous, weight, bias=None, *, stride: int = 1, dilation: int = 1,
                  elu_input: bool = False, groups: int = 1, first=None):
    """See reference.conv1d_stream; returns (y, previous')."""
    kw = dict(stride=stride, dilation=dilation, elu_input=elu_input, groups=groups, first=first)
    if _mode == "reference":
        return reference.conv1d_stream(x, previous, weight, bias, **kw)
    fused = tuple(_ext().conv1d_stream(x, previous, weight, bias, first, int(stride), int(dilation),
                                       int(groups), bool(elu_input)))
    if _mode == "check":
        _record("conv1d_stream", fused, reference.conv1d_stream(x, previous, weight, bias, **kw))
    return fused


def conv_transpose1d_stream(x, partial, weight, bias=None, *, stride: int, groups: int = 1,
                            elu_input: bool = False):
    """See reference.conv_transpose1d_stream; returns (y, partial')."""
    kw = dict(stride=stride, groups=groups, elu_input=elu_input)
    if _mode == "reference":
        return reference.conv_transpose1d_stream(x, partial, weight, bias, **kw)
    fused = tuple(_ext().conv_transpose1d_stream(x, partial, weight, bias, int(stride), int(groups),
                                                 bool(elu_input)))
    if _mode == "check":
        _record("conv_transpose1d_stream", fused,
                reference.conv_transpose1d_stream(x, partial, weight, bias, **kw))
    return fused


def rvq_encode(x, codebooks):
    """See reference.rvq_encode; codes [..., n_q] int32. Check mode records the
    largest code difference: nonzero only where summation order flipped a near-tie."""
    if _mode == "reference":
        return reference.rvq_encode(x, codebooks)
    fused = _ext().rvq_encode(x, codebooks)
    if _mode == "check":
        _record("rvq_encode", [fused], [reference.rvq_encode(x, codebooks)])
    return fused


def rvq_decode(codes, codebooks):
    """See reference.rvq_decode; [..., D] float32."""
    if _mode == "reference":
        return reference.rvq_decode(codes, codebooks)
    fused = _ext().rvq_decode(codes, codebooks)
    if _mode == "check":
        _record("rvq_decode", [fused], [reference.rvq_decode(codes, codebooks)])
    return fused
