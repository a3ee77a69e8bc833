"""The one place that picks the fused primitive or its pure-MLX reference.

Modes: "fused" (default: the C++ extension), "reference" (pure MLX, reference.py)
and "check" (both on the same inputs; the fused result is used and the largest
absolute difference per op is recorded in `check_report()`).
"""

from __future__ import annotations

import contextlib
import functools
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


_warned_no_kernels = False


@functools.cache
def _cuda_build() -> bool:
    return _ext().cuda_build()


def kernels_here() -> bool:
    """Whether the fused primitives can run on the default device: always on the CPU;
    on a GPU only in a build with its kernels (CUDA). Metal kernels are not wired up
    yet, so on Apple GPUs every op takes its pure-MLX reference, with one warning."""
    global _warned_no_kernels
    if mx.default_device().type == mx.cpu or _cuda_build():
        return True
    if not _warned_no_kernels:
        import warnings

        warnings.warn("personaplex_fast: no GPU kernels in this build for this device; "
                      "running the pure-MLX reference ops", RuntimeWarning, stacklevel=3)
        _warned_no_kernels = True
    return False


def _reference() -> bool:
    return _mode == "reference" or not kernels_here()


def _record(name: str, fused, ref) -> None:
    worst = max((float(mx.max(mx.abs(a.astype(mx.float32) - b.astype(mx.float32))))
                 for a, b in zip(fused, ref) if a.size), default=0.0)
    _diffs[name] = max(_diffs.get(name, 0.0), worst)


def ring_attention(q, k, v, k_cache, v_cache, pos, *, rope_max_period: float | None = 10000.0,
                   scale: float | None = None):
    """See reference.ring_attention; returns (out, k_cache', v_cache')."""
    if _reference():
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


# Streaming conv steps larger than this many multiply-adds run as MLX's own
# convolution (im2col + GEMM) on a GPU: measured faster there than our direct
# kernels, which win on the small per-frame convs (docs/PERF.md, H100). Both
# compute the same function; the CPU always takes the kernels. None: always ours.
CONV_KERNEL_MAX_MACS: int | None = 20_000_000


def _conv_as_gemm(macs: int) -> bool:
    return (CONV_KERNEL_MAX_MACS is not None and macs > CONV_KERNEL_MAX_MACS
            and mx.default_device().type != mx.cpu)


def conv1d_stream(x, previous, weight, bias=None, *, stride: int = 1, dilation: int = 1,
                  elu_input: bool = False, groups: int = 1, first=None):
    """See reference.conv1d_stream; returns (y, previous')."""
    kw = dict(stride=stride, dilation=dilation, elu_input=elu_input, groups=groups, first=first)
    if _reference() or _conv_as_gemm(x.shape[0] * (x.shape[1] // stride) * weight.size):
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
    if _reference() or _conv_as_gemm(x.shape[0] * x.shape[1] * weight.size):
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
    if _reference():
        return reference.rvq_encode(x, codebooks)
    fused = _ext().rvq_encode(x, codebooks)
    if _mode == "check":
        _record("rvq_encode", [fused], [reference.rvq_encode(x, codebooks)])
    return fused


def rvq_decode(codes, codebooks):
    """See reference.rvq_decode; [..., D] float32."""
    if _reference():
        return reference.rvq_decode(codes, codebooks)
    fused = _ext().rvq_decode(codes, codebooks)
    if _mode == "check":
        _record("rvq_decode", [fused], [reference.rvq_decode(codes, codebooks)])
    return fused


# Head dims the attention kernels are instantiated for (kernels/cuda/ring_attention.cu);
# the composite primitives that attend (decoder_layers, depformer_frame) need one of them.
ATTENTION_HEAD_DIMS = (16, 32, 64, 128)


# Largest number of activation rows (sessions x new positions) sent to the fused
# matvec; above it MLX's own matmul (a GEMM) reads the weights fewer times.
MATVEC_MAX_ROWS = 8


def matvec_fusable(x, w, bits: int = 0) -> bool:
    """Whether ops.matvec takes the fused primitive for these operands."""
    K = x.shape[-1]
    rows = x.size // K if K else 0
    return (0 < rows <= MATVEC_MAX_ROWS and x.dtype in (mx.float32, mx.bfloat16, mx.float16)
            and K % 8 == 0 and (w.dtype == x.dtype if bits == 0 else bits in (4, 8)))


def matvec(x, w, scales=None, biases=None, *, bits: int = 0, alpha=None, eps: float = 1e-8,
           gate: bool = False, residual=None):
    """See reference.matvec; x [..., K] -> [..., n_out]. Falls back to the reference
    where the fused primitive does not apply (matvec_fusable)."""
    kw = dict(bits=bits, alpha=alpha, eps=eps, gate=gate, residual=residual)
    if _reference() or not matvec_fusable(x, w, bits):
        return reference.matvec(x, w, scales, biases, **kw)
    lead, K = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, K)
    res2 = None if residual is None else residual.reshape(x2.shape[0], -1)
    y = _ext().matvec(x2, w, scales, biases, alpha, res2, int(bits), bool(gate), float(eps))
    y = y.reshape(*lead, y.shape[-1])
    if _mode == "check":
        _record("matvec", [y], [reference.matvec(x, w, scales, biases, **kw)])
    return y


def decoder_layers(x, pos, weights, k_caches, v_caches, *, heads: int, bits: int = 0,
                   eps: float = 1e-8, rope_max_period: float | None = 10000.0):
    """See reference.decoder_layers; returns (y, k_caches', v_caches') as lists."""
    kw = dict(heads=heads, bits=bits, eps=eps, rope_max_period=rope_max_period)
    if _reference():
        return reference.decoder_layers(x, pos, weights, k_caches, v_caches, **kw)
    pos = reference.positions(pos, x.shape[0])
    out = _ext().decoder_layers(x, pos, list(weights), list(k_caches), list(v_caches), int(heads),
                                int(bits), float(eps),
                                0.0 if rope_max_period is None else float(rope_max_period))
    L = len(k_caches)
    fused = (out[0], out[1:1 + L], out[1 + L:])
    if _mode == "check":
        ref = reference.decoder_layers(x, pos, weights, k_caches, v_caches, **kw)
        _record("decoder_layers", [fused[0], *fused[1], *fused[2]], [ref[0], *ref[1], *ref[2]])
    return fused


def sample_topk(logits, noise=None, forced=None, *, temp: float, top_k: int, greedy: bool = False):
    """See reference.sample_topk; tokens [...] int32 for logits [..., V]."""
    kw = dict(temp=temp, top_k=top_k, greedy=greedy)
    if _reference() or logits.dtype not in (mx.float32, mx.bfloat16, mx.float16):
        return reference.sample_topk(logits, noise, forced, **kw)
    lead, V = logits.shape[:-1], logits.shape[-1]
    R = math.prod(lead)
    fused = _ext().sample_topk(logits.reshape(R, V), None if noise is None else noise.reshape(R, V),
                               None if forced is None else forced.reshape(R), float(temp), int(top_k),
                               bool(greedy)).reshape(lead)
    if _mode == "check":
        _record("sample_topk", [fused], [reference.sample_topk(logits, noise, forced, **kw)])
    return fused


def depformer_frame(h, text, forced, noise, in_projs, tables, stacks, heads_w, *, heads: int,
                    bits: int = 0, eps: float = 1e-8, rope_max_period: float | None = None,
                    temp: float = 1.0, top_k: int = 0, greedy: bool = False):
    """See reference.depformer_frame; returns (codes [Q, B] int32, logits [Q, B, V]).

    Check mode runs the reference teacher-forced with the fused codes, so every
    step sees the same inputs and the recorded difference is the logits' own."""
    kw = dict(heads=heads, bits=bits, eps=eps, rope_max_period=rope_max_period, temp=temp, top_k=top_k,
              greedy=greedy)
    if _reference() or (tables[0].shape[1] // heads) not in ATTENTION_HEAD_DIMS:
        return reference.depformer_frame(h, text, forced, noise, in_projs, tables, stacks, heads_w, **kw)
    fused = tuple(_ext().depformer_frame(
        h, text, forced, noise, [list(p) for p in in_projs], list(tables), [list(s) for s in stacks],
        [list(p) for p in heads_w], int(heads), int(bits), float(eps),
        0.0 if rope_max_period is None else float(rope_max_period), float(temp), int(top_k), bool(greedy)))
    if _mode == "check":
        teacher = mx.where(forced >= 0, forced, fused[0])
        ref = reference.depformer_frame(h, text, teacher, noise, in_projs, tables, stacks, heads_w, **kw)
        _record("depformer_frame", [fused[1]], [ref[1]])
    return fused
