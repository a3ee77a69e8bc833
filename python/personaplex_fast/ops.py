"""The one place that picks the fused primitive or its pure-MLX reference.

Modes: "fused" (default: the C++ extension), "reference" (pure MLX, reference.py)
and "check" (both on the same inputs; the fused result is used and the largest
absolute difference per op is recorded in `check_report()`).

Kernels (`set_kernels`, the CLI's --kernels): in fused mode, "auto" (default) takes
each fused primitive only where it passed the self-test on this device
(selftest.py; consulted on GPUs, whose kernels CI cannot run) and its reference
elsewhere, with one warning naming it; "fused" takes every fused primitive
untested; "reference" is the reference mode. The engine's tick program runs every
kernel it holds, so it applies only where none it runs failed (program_applies).

Every rule for whether a fused primitive applies lives here (`*_fusable`,
`projection`), and so does the flattening of the named weight structures of
reference.py into the extension's array lists (`stack_arrays`, ...).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import weakref

import mlx.core as mx
import mlx.nn as nn

from . import reference
from .reference import DepformerWeights, LayerStack, Projection

MODES = ("fused", "reference", "check")
KERNELS = ("auto", "fused", "reference")
_mode = "fused"
_kernels = "auto"
_diffs: dict[str, float] = {}
_verdicts: dict[str, dict[str, str]] = {}  # per device: failing primitive -> why


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


def set_kernels(choice: str) -> None:
    """auto, fused or reference (see the module's docstring); reference sets that mode."""
    global _kernels
    if choice not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}, got {choice!r}")
    _kernels = choice
    if choice == "reference":
        set_mode("reference")


def kernels() -> str:
    return _kernels


@contextlib.contextmanager
def use_kernels(choice: str):
    """Context manager: `choice` kernels inside (the self-test runs the engine under
    "fused", which consults no verdict, while it computes one)."""
    old, old_mode = _kernels, _mode
    set_kernels(choice)
    try:
        yield
    finally:
        set_kernels(old)
        set_mode(old_mode)


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


@functools.cache
def _gpu_build() -> bool:
    return _cuda_build() or _ext().metal_build()


def kernels_here() -> bool:
    """Whether the fused primitives can run on the default device: always on the CPU;
    on a GPU in a build with its kernels (CUDA on Linux, Metal on macOS). Elsewhere
    every op takes its pure-MLX reference, with one warning."""
    global _warned_no_kernels
    if mx.default_device().type == mx.cpu or _gpu_build():
        return True
    if not _warned_no_kernels:
        import warnings

        warnings.warn("personaplex_fast: no GPU kernels in this build for this device; "
                      "running the pure-MLX reference ops", RuntimeWarning, stacklevel=3)
        _warned_no_kernels = True
    return False


def _reference() -> bool:
    return _mode == "reference" or not kernels_here()


def validates_here() -> bool:
    """Whether "auto" kernels consult the self-test on the default device: a GPU with
    our kernels (the CPU paths are what CI tests)."""
    return mx.default_device().type == mx.gpu and kernels_here()


def fallbacks() -> dict[str, str]:
    """The fused primitives that run their reference here under "auto" kernels, each with
    why: the self-test's verdict for this device (cached; run on first use), warned
    about once per process. Empty with other kernels and where nothing is validated."""
    if _kernels != "auto" or not validates_here():
        return {}
    device = str(mx.default_device())
    found = _verdicts.get(device)
    if found is None:
        import sys
        import warnings

        from . import selftest

        if not selftest.cached():
            print(f"personaplex_fast: checking the kernels on {selftest.device_name()} against their references, "
                  "once for this device and version (about a minute)...", file=sys.stderr, flush=True)
        found = _verdicts[device] = selftest.verdict()
        if MATVEC_TC in found:  # the CUDA hosts read this per call: the streaming kernel at every row count
            os.environ["PERSONAPLEX_MATVEC_TC_MIN_ROWS"] = str(1 << 30)
        for name, why in sorted(found.items()):
            warnings.warn(f"personaplex_fast: {name} failed its self-test on {selftest.device_name()} ({why}); "
                          f"{_FALLBACK.get(name, 'it runs its pure-MLX reference here')} "
                          "(`personaplex-fast selftest` prints the table)", RuntimeWarning, stacklevel=4)
    return found


# What the self-test's rows that are no primitive of their own fall back to.
KV8_ATTENTION = "ring_attention_kv8"  # the 8-bit KV cache's attention: only the tick program runs it
MATVEC_TC = "matvec_tc"  # matvec's tensor-core path (CUDA): a path of matvec, switched off alone
_FALLBACK = {"tick": "the engine runs op by op here",
             MATVEC_TC: "matvec keeps its streaming kernel at every row count here (slower from 2 sessions)",
             KV8_ATTENTION: "with an 8-bit KV cache (--kv-bits 8) the engine runs op by op here, its "
                            "attention the pure-MLX reference"}


def program_applies(kv_bits: int | None = None) -> bool:
    """Whether the engine may run its ticks as the tick program (tick/) here: fused mode,
    kernels on this device, and no self-test failure (fallbacks) in what the program runs:
    any fused primitive (the program runs their kernels whatever the verdict), the program
    itself ("tick"), and with an 8-bit KV cache its attention. Op by op instead, a failed
    primitive runs its reference, and an 8-bit ring always does (cache_fusable). A failed
    tensor-core path of matvec only turns that path off (fallbacks), here as op by op."""
    if _mode != "fused" or not kernels_here():
        return False
    return not any((name != KV8_ATTENTION or kv_bits == 8) and name != MATVEC_TC for name in fallbacks())


def _leaves(out) -> list:
    return [out] if isinstance(out, mx.array) else [a for o in out for a in _leaves(o)]


def _record(name: str, fused, ref) -> None:
    worst = max((float(mx.max(mx.abs(a.astype(mx.float32) - b.astype(mx.float32))))
                 for a, b in zip(_leaves(fused), _leaves(ref)) if a.size), default=0.0)
    _diffs[name] = max(_diffs.get(name, 0.0), worst)


def _pick(name: str, fusable: bool, fused, ref, compare=None):
    """ref() in reference mode, where the fused primitive does not apply, or (fused
    mode) where it failed the self-test here (fallbacks); else fused(), and in check mode the largest difference from ref() is recorded under
    `name` (compare(result) -> (fused arrays, reference arrays) when the two are not
    compared as they are)."""
    if _reference() or not fusable or (_mode == "fused" and name in fallbacks()):
        return ref()
    out = fused()
    if _mode == "check":
        _record(name, *(compare(out) if compare else (out, ref())))
    return out


FLOAT_DTYPES = (mx.float32, mx.bfloat16, mx.float16)


def _rope_arg(rope_max_period: float | None) -> float:
    return 0.0 if rope_max_period is None else float(rope_max_period)


def cache_fusable(k_cache) -> bool:
    """Whether the fused primitives attend over this ring cache: an array in the
    activations' dtype. An 8-bit ring ((codes, scales): Engine(kv_bits=8)) is the tick
    program's format; op by op, ring_attention and the stacks that attend over it
    (decoder_layers) run their references there. The depformer's per-frame caches stay
    in the activations' dtype, so depformer_frame is unaffected."""
    return not isinstance(k_cache, tuple)


def ring_attention(q, k, v, k_cache, v_cache, pos, *, rope_max_period: float | None = 10000.0,
                   scale: float | None = None):
    """See reference.ring_attention; returns (out, k_cache', v_cache')."""
    # The C++ signature takes mx.array only (no implicit conversion of ints/numpy).
    fusable = cache_fusable(k_cache)
    q, k, v = (x if isinstance(x, mx.array) else mx.array(x) for x in (q, k, v))
    if fusable:
        k_cache, v_cache = (x if isinstance(x, mx.array) else mx.array(x) for x in (k_cache, v_cache))
    pos = reference.positions(pos, q.shape[0])
    scale_ = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _pick(
        "ring_attention", fusable,
        lambda: tuple(_ext().ring_attention(q, k, v, k_cache, v_cache, pos, scale_,
                                            _rope_arg(rope_max_period))),
        lambda: reference.ring_attention(q, k, v, k_cache, v_cache, pos, rope_max_period=rope_max_period,
                                         scale=scale))


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
    return _pick(
        "conv1d_stream", not _conv_as_gemm(x.shape[0] * (x.shape[1] // stride) * weight.size),
        lambda: tuple(_ext().conv1d_stream(x, previous, weight, bias, first, int(stride), int(dilation),
                                           int(groups), bool(elu_input))),
        lambda: reference.conv1d_stream(x, previous, weight, bias, stride=stride, dilation=dilation,
                                        elu_input=elu_input, groups=groups, first=first))


def conv_transpose1d_stream(x, partial, weight, bias=None, *, stride: int, groups: int = 1,
                            elu_input: bool = False):
    """See reference.conv_transpose1d_stream; returns (y, partial')."""
    return _pick(
        "conv_transpose1d_stream", not _conv_as_gemm(x.shape[0] * x.shape[1] * weight.size),
        lambda: tuple(_ext().conv_transpose1d_stream(x, partial, weight, bias, int(stride), int(groups),
                                                     bool(elu_input))),
        lambda: reference.conv_transpose1d_stream(x, partial, weight, bias, stride=stride, groups=groups,
                                                  elu_input=elu_input))


def rvq_encode(x, codebooks):
    """See reference.rvq_encode; codes [..., n_q] int32. Check mode records the
    largest code difference: nonzero only where summation order flipped a near-tie."""
    return _pick("rvq_encode", True, lambda: _ext().rvq_encode(x, codebooks),
                 lambda: reference.rvq_encode(x, codebooks))


def rvq_decode(codes, codebooks):
    """See reference.rvq_decode; [..., D] float32."""
    return _pick("rvq_decode", True, lambda: _ext().rvq_decode(codes, codebooks),
                 lambda: reference.rvq_decode(codes, codebooks))


# Head dims the attention kernels are instantiated for (kernels/cuda/ring_attention.cu);
# the composite primitives that attend (decoder_layers, depformer_frame) need one of them.
ATTENTION_HEAD_DIMS = (16, 32, 64, 128)


# Largest number of activation rows (sessions x new positions) sent to the fused
# matvec where only its streaming kernel runs (the CPU, Metal, float32 x, a K off the
# tensor-core step): it reads the weights once per 8 rows, so above 8 MLX's own matmul (a
# GEMM) reads them fewer times.
MATVEC_MAX_ROWS = 8
# matvec's tensor-core path on CUDA (kernels/matvec_tc.cuh) takes 16-bit rows whose K is a
# multiple of its step, any number of them (in chunks of 64, each reading the weights once),
# as the tick program does at every batch size.
TC_STEP = 256


def _cuda_device() -> bool:
    return mx.default_device().type == mx.gpu and _cuda_build()


def tensor_cores_take(dtype, Ks) -> bool:
    """Whether every projection of x in `dtype` against weights of these K takes the
    tensor-core path, so any number of rows: a CUDA device, 16-bit x, every K a multiple of
    TC_STEP, the path not failed in the self-test."""
    return (_cuda_device() and dtype in (mx.bfloat16, mx.float16) and all(K % TC_STEP == 0 for K in Ks)
            and MATVEC_TC not in fallbacks())


def _rows_ok(rows: int, dtype, Ks) -> bool:
    """At most MATVEC_MAX_ROWS rows, or any number where the tensor cores take them all."""
    return 0 < rows and (rows <= MATVEC_MAX_ROWS or tensor_cores_take(dtype, Ks))


def matvec_fusable(x, w, bits: int = 0) -> bool:
    """Whether ops.matvec takes the fused primitive for these operands."""
    K = x.shape[-1]
    rows = x.size // K if K else 0
    return (x.dtype in FLOAT_DTYPES and K % 8 == 0 and (w.dtype == x.dtype if bits == 0 else bits in (4, 8))
            and _rows_ok(rows, x.dtype, (K,)))


def projection(layer: nn.Module) -> Projection | None:
    """A layer as the fused matvec takes it: a bias-free nn.Linear (bits 0), or an
    affine group-64 nn.QuantizedLinear; None for anything else."""
    if "bias" in layer:
        return None
    if isinstance(layer, nn.QuantizedLinear):
        if layer.group_size == 64 and getattr(layer, "mode", "affine") == "affine":
            return Projection(layer.weight, layer.scales, layer.biases, layer.bits)
        return None
    if isinstance(layer, nn.Linear):
        return Projection(layer.weight)
    return None


def matvec(x, w, scales=None, biases=None, *, bits: int = 0, alpha=None, eps: float = 1e-8,
           gate: bool = False, residual=None):
    """See reference.matvec; x [..., K] -> [..., n_out]. Falls back to the reference
    where the fused primitive does not apply (matvec_fusable)."""
    def fused():
        lead, K = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, K)
        res2 = None if residual is None else residual.reshape(x2.shape[0], -1)
        y = _ext().matvec(x2, w, scales, biases, alpha, res2, int(bits), bool(gate), float(eps))
        return y.reshape(*lead, y.shape[-1])

    return _pick("matvec", matvec_fusable(x, w, bits), fused,
                 lambda: reference.matvec(x, w, scales, biases, bits=bits, alpha=alpha, eps=eps, gate=gate,
                                          residual=residual))


# What ops derives from a LayerStack or DepformerWeights: (bit width, the extension's
# array lists), kept while the object lives. The model keeps its stacks between
# steps; walking the 7B's layers on every call instead cost ~0.6 ms of host time
# a step (q4, on the 2-core CI machine).
_derived: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _common(values):
    """The one value of `values`, or None when they differ."""
    values = set(values)
    return values.pop() if len(values) == 1 else None


def projection_arrays(p: Projection) -> list[mx.array]:
    """p as the extension takes a projection: [w], or [w, scales, biases] quantized."""
    return [p.w, p.scales, p.biases] if p.bits else [p.w]


def _derive(weights: LayerStack | DepformerWeights) -> tuple:
    found = _derived.get(weights)
    if found is not None:
        return found
    if isinstance(weights, LayerStack):
        arrays = []
        for w in weights.layers:  # csrc/decoder_layers_common.h's layout
            arrays += [w.norm1, *projection_arrays(w.in_proj), *projection_arrays(w.out_proj), w.norm2,
                       *projection_arrays(w.linear_in), *projection_arrays(w.linear_out)]
        bits = _common(p.bits for w in weights.layers for p in w.projections())
    else:
        arrays = ([projection_arrays(p) for p in weights.in_projs], list(weights.tables),
                  [stack_arrays(s) for s in weights.stacks], [projection_arrays(p) for p in weights.heads])
        bits = _common([p.bits for p in (*weights.in_projs, *weights.heads)]
                       + [bits_of(s) for s in weights.stacks])
    _derived[weights] = found = (bits, arrays)
    return found


def bits_of(weights: LayerStack | DepformerWeights) -> int | None:
    """The bit width every projection of a stack (or of the depformer) shares; None
    when they differ (the fused stacks take one)."""
    return _derive(weights)[0]


def stack_arrays(stack: LayerStack) -> list[mx.array]:
    """The layers as decoder_layers' flat weight list (csrc/decoder_layers_common.h):
    per layer norm1, in_proj, out_proj, norm2, linear_in, linear_out. Kept: do not
    modify it."""
    return _derive(stack)[1]


def depformer_arrays(weights: DepformerWeights) -> tuple[list, list, list, list]:
    """(in_projs, tables, stacks, heads) as the extension's depformer_frame takes them."""
    return _derive(weights)[1]


def _hidden(stack: LayerStack) -> int:
    """The FFN's width: linear_out's K."""
    p = stack.layers[0].linear_out
    return p.w.shape[1] if p.bits == 0 else p.scales.shape[1] * 64


def decoder_layers_fusable(x, stack: LayerStack | None, heads: int, k_cache=None) -> bool:
    """Whether ops.decoder_layers takes the fused primitive: one decode step (x [B, C],
    or [B, 1, C]) of sessions in a float dtype, at most MATVEC_MAX_ROWS of them unless
    every projection takes the tensor-core path (tensor_cores_take), head dims the
    attention kernels take, one bit width through the stack, and caches it attends over
    (cache_fusable; k_cache: a layer's, None: in x's dtype)."""
    return (stack is not None and not _reference() and (x.ndim == 2 or (x.ndim == 3 and x.shape[1] == 1))
            and x.dtype in FLOAT_DTYPES and x.shape[-1] // heads in ATTENTION_HEAD_DIMS
            and bits_of(stack) is not None and (k_cache is None or cache_fusable(k_cache))
            and _rows_ok(x.shape[0], x.dtype, (x.shape[-1], _hidden(stack))))


def decoder_layers(x, pos, stack: LayerStack, k_caches, v_caches, *, heads: int,
                   rope_max_period: float | None = 10000.0):
    """See reference.decoder_layers; returns (y, k_caches', v_caches') as lists."""
    pos = reference.positions(pos, x.shape[0])

    def fused():
        out = _ext().decoder_layers(x, pos, stack_arrays(stack), list(k_caches), list(v_caches), int(heads),
                                    bits_of(stack), float(stack.eps), _rope_arg(rope_max_period))
        L = len(k_caches)
        return out[0], out[1:1 + L], out[1 + L:]

    return _pick("decoder_layers", decoder_layers_fusable(x, stack, heads, k_caches[0]), fused,
                 lambda: reference.decoder_layers(x, pos, stack, k_caches, v_caches, heads=heads,
                                                  rope_max_period=rope_max_period))


def sample_topk(logits, noise=None, forced=None, *, temp: float, top_k: int, greedy: bool = False):
    """See reference.sample_topk; tokens [...] int32 for logits [..., V]."""
    def fused():
        lead, V = logits.shape[:-1], logits.shape[-1]
        R = math.prod(lead)
        return _ext().sample_topk(logits.reshape(R, V), None if noise is None else noise.reshape(R, V),
                                  None if forced is None else forced.reshape(R), float(temp), int(top_k),
                                  bool(greedy)).reshape(lead)

    return _pick("sample_topk", logits.dtype in FLOAT_DTYPES, fused,
                 lambda: reference.sample_topk(logits, noise, forced, temp=temp, top_k=top_k, greedy=greedy))


def depformer_fusable(h, weights: DepformerWeights | None, heads: int) -> bool:
    """Whether ops.depformer_frame takes the fused primitive: h [B, C_in] (or
    [B, 1, C_in]) in a float dtype that the tables share, head dims the attention
    kernels take, one bit width and one norm eps throughout."""
    return (weights is not None and not _reference() and h.dtype in FLOAT_DTYPES
            and all(t.dtype == h.dtype for t in weights.tables)
            and weights.tables[0].shape[1] // heads in ATTENTION_HEAD_DIMS
            and bits_of(weights) is not None and len({s.eps for s in weights.stacks}) == 1)


def depformer_frame(h, text, forced, noise, weights: DepformerWeights, *, heads: int,
                    rope_max_period: float | None = None, temp: float = 1.0, top_k: int = 0,
                    greedy: bool = False):
    """See reference.depformer_frame; returns (codes [Q, B] int32, logits [Q, B, V]).

    Check mode runs the reference teacher-forced with the fused codes, so every
    step sees the same inputs and the recorded difference is the logits' own."""
    def ref(forced_):
        return reference.depformer_frame(h, text, forced_, noise, weights, heads=heads,
                                         rope_max_period=rope_max_period, temp=temp, top_k=top_k,
                                         greedy=greedy)

    def fused():
        return tuple(_ext().depformer_frame(
            h, text, forced, noise, *depformer_arrays(weights), int(heads), bits_of(weights),
            float(weights.stacks[0].eps), _rope_arg(rope_max_period), float(temp), int(top_k), bool(greedy)))

    def compare(out):
        teacher = mx.where(forced >= 0, forced, out[0])
        return [out[1]], [ref(teacher)[1]]

    return _pick("depformer_frame", depformer_fusable(h, weights, heads), fused, lambda: ref(forced),
                 compare)
