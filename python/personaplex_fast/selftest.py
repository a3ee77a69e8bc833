"""The fused primitives checked where they run: `personaplex-fast selftest`.

Each fused primitive of the extension (its CPU path, CUDA or Metal kernels: whichever
run on the default device) is run against its pure-MLX reference (reference.py) on
random inputs at the model's shapes (the official 7B LM and Mimi; `tiny`: the tiny
model's, for CI on the CPU), with the tolerances of its tests (noted at each check),
and the outcome printed as a table. Two more rows check what only the tick program runs
(selftest_tick.py): the 8-bit KV ring's attention, and the program as a whole against
the op-by-op engine.

ops uses the verdict in its default "auto" kernels (ops.set_kernels): on a GPU it is
computed once per (package version, MLX version, device name, extension build) and
cached under ~/.cache/personaplex_fast/selftest/ (or $PERSONAPLEX_FAST_CACHE); a
primitive that fails there, or whose kernels do not compile or launch, runs its
reference instead, with one warning naming it, and the engine leaves its tick program
(which would run that kernel) for op by op (ops.program_applies). Why on GPUs only: the
CPU paths are the ones CI tests on every commit; the kernels of a GPU other than the one
they were measured on (any Apple GPU, any NVIDIA GPU but the H100 / H200) have not been run.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import mlx.core as mx
import numpy as np

from . import __version__, reference
from .config import LMConfig, MimiConfig
from .reference import DepformerWeights, LayerStack, LayerWeights, Projection
from .sampling import SamplingConfig
from .selftest_tick import check_ring_attention_kv8, check_tick  # noqa: F401 (CHECKS)

PRIMITIVES = ("matvec", "matvec_tc", "ring_attention", "decoder_layers", "sample_topk", "depformer_frame",
              "conv1d_stream", "conv_transpose1d_stream", "rvq_encode", "rvq_decode", "ring_attention_kv8", "tick")

# The tests' tolerances (each file named): largest |fused - reference|, absolute, or
# per unit of the output's scale where noted.
RING_TOL = {mx.float32: 2e-5, mx.bfloat16: 3e-2, mx.float16: 4e-3}  # test_ring_attention.py, + 6e-8 / position
MATVEC_REL = {mx.float32: 4 * 2.0**-23, mx.bfloat16: 4 * 2.0**-8, mx.float16: 4 * 2.0**-11}  # test_matvec.py
LAYERS_TOL = {mx.float32: 1e-4, mx.bfloat16: 5e-2}  # test_decoder_layers.py
DEPFORMER_TOL = {mx.float32: 1e-4, mx.bfloat16: 6e-2}  # test_depformer_frame.py, x4 quantized
CONV_TOL = {mx.float32: 2e-6, mx.bfloat16: 1.6e-2, mx.float16: 2e-3}  # test_conv*_stream.py, x output scale
NORM_EPS = 1e-5


@dataclass(frozen=True)
class Shapes:
    """What the checks are sized by: the LM's and Mimi's configs, sessions per step, the
    decoder layers chained (every layer runs the same kernels; two show the hand-off),
    and the activations' dtype."""

    lm: LMConfig
    mimi: MimiConfig
    batch: int = 1
    layers: int = 2
    dtype: mx.Dtype = mx.bfloat16
    name: str = "official"


def default_shapes(batch: int = 1) -> Shapes:
    return Shapes(LMConfig(), MimiConfig(), batch=batch)


def tiny_shapes(batch: int = 2) -> Shapes:
    from .mimi_checkpoint import tiny_mimi_config
    from .tiny import TINY

    return Shapes(TINY, tiny_mimi_config(), batch=batch, name="tiny")


# -- random operands, on the default device (the 7B's weights would take numpy seconds)

class Draw:
    def __init__(self, seed: int):
        self.key = mx.random.key(seed)

    def _next(self):
        self.key, k = mx.random.split(self.key)
        return k

    def normal(self, shape, dtype=mx.float32, scale=1.0):
        return (scale * mx.random.normal(shape, key=self._next())).astype(dtype)

    def ints(self, low, high, shape):
        return mx.random.randint(low, high, shape, key=self._next()).astype(mx.int32)

    def gumbel(self, shape):
        return mx.random.gumbel(shape, key=self._next())

    def projection(self, n, k, bits, dtype):
        w = self.normal((n, k), dtype, k**-0.5)
        return Projection(*mx.quantize(w, group_size=64, bits=bits), bits=bits) if bits else Projection(w)

    def gain(self, n, dtype):
        return (1.0 + 0.25 * mx.random.uniform(-1, 1, (n,), key=self._next())).astype(dtype)

    def stack(self, L, C, hidden, bits, dtype):
        return LayerStack(tuple(LayerWeights(norm1=self.gain(C, dtype), in_proj=self.projection(3 * C, C, bits, dtype),
                                             out_proj=self.projection(C, C, bits, dtype), norm2=self.gain(C, dtype),
                                             linear_in=self.projection(2 * hidden, C, bits, dtype),
                                             linear_out=self.projection(C, hidden, bits, dtype))
                                for _ in range(L)), NORM_EPS)


def dense(p: Projection, dtype) -> Projection:
    """p with its weights dequantized (in float32, rounded once to dtype): the reference
    then sums in float32 on every backend, as the fused kernels do (MLX's CPU
    quantized_matmul sums in the storage type: ~0.1 off over the 7B's 4096 inputs)."""
    if not p.bits:
        return p
    f32 = mx.float32
    return Projection(mx.dequantize(p.w, p.scales.astype(f32), p.biases.astype(f32), 64, p.bits).astype(dtype))


def dense_stack(stack: LayerStack, dtype) -> LayerStack:
    return LayerStack(tuple(replace(w, in_proj=dense(w.in_proj, dtype), out_proj=dense(w.out_proj, dtype),
                                    linear_in=dense(w.linear_in, dtype), linear_out=dense(w.linear_out, dtype))
                            for w in stack.layers), stack.eps)


def on_cpu(fn, *args, **kw):
    """fn's result computed on the CPU and evaluated: float32 there is float32, while
    MLX's CUDA convolutions (like its float32 matmuls) round as TF32, ~1e-3 relative,
    hundreds of times the conv tests' tolerance (seen on an H200, 2026-12-01). The tests
    compare the GPU kernels against the CPU the same way (tests/gpu)."""
    with mx.stream(mx.cpu):
        out = fn(*args, **kw)
        mx.eval(out)
    return out


def np32(a) -> np.ndarray:
    return np.array(a.astype(mx.float32)).astype(np.float64)


def worst(got, want, tol) -> float:
    """Largest |got - want| / tol over arrays (tol a number or per element); inf where
    the fused output is not finite and the reference is."""
    r = 0.0
    for g, w in zip(got, want):
        g, w = np32(g), np32(w)
        if g.shape != w.shape:
            return float("inf")
        if g.size:
            bad = ~np.isfinite(g) & np.isfinite(w)
            r = max(r, float("inf") if bad.any() else float(np.max(np.abs(g - w) / tol)))
    return r


def token_mismatches(got, want, scores) -> int:
    """Tokens that differ where the two picks' scores are not a near-tie (a float32
    rounding apart): either pick is right there."""
    got, want, s = np.array(got).reshape(-1), np.array(want).reshape(-1), np.array(scores).reshape(len(got), -1)
    rows = np.nonzero(got != want)[0]
    return int(sum(not (0 <= got[r] < s.shape[1]) or
                   abs(s[r, got[r]] - s[r, want[r]]) > 1e-6 * max(1.0, abs(s[r, want[r]])) for r in rows))


# -- the checks: each yields (case, worst error / tolerance); <= 1 passes

def check_matvec(s: Shapes, d: Draw, w_in_dtype: bool = False):
    """test_matvec.py's bound per element: 4 units in the last place of the result (and of
    the residual, where the sum cancels) plus 1e-3 of the output's scale. Quantized, the
    reference multiplies by the weights dequantized to float32 (as the kernels do; MLX's
    CPU quantized matmul sums in the storage type) and rounds once at the end."""
    from . import _ext

    cfg, B, dt = s.lm, s.batch, s.dtype
    C, hidden = cfg.dim, cfg.ffn_hidden
    for bits in (0, 4, 8):
        for case, K, N, norm, gate, res in (("qkv", C, 3 * C, True, False, False),
                                            ("ffn_in", C, 2 * hidden, True, True, False),
                                            ("ffn_out", hidden, C, False, False, True)):
            if bits and K % 64:
                continue  # not quantized in the model either (checkpoint.quantizable)
            x = d.normal((B, K), dt)
            p = d.projection(N, K, bits, dt)
            alpha = d.gain(K, dt) if norm else None
            r = d.normal((B, N // 2 if gate else N), dt) if res else None
            got = _ext.matvec(x, p.w, p.scales, p.biases, alpha, r, bits, gate, NORM_EPS)
            w = mx.dequantize(p.w, p.scales.astype(mx.float32), p.biases.astype(mx.float32), 64, bits) if bits else p.w
            if bits and w_in_dtype and matvec_takes_tc(B, K, dt, bits):
                w = w.astype(dt)
            want = reference.matvec(x, w, alpha=alpha, eps=NORM_EPS, gate=gate, residual=r).astype(dt)
            scale = mx.abs(want.astype(mx.float32)) + (0 if r is None else mx.abs(r.astype(mx.float32)))
            tol = MATVEC_REL[dt] * scale + 1e-3 * (mx.max(mx.abs(want.astype(mx.float32))) + 1e-6)
            yield f"{case} q{bits}" if bits else case, worst([got], [want], np32(tol))


def matvec_takes_tc(rows: int, K: int, dt, bits: int) -> bool:
    """Whether matvec's CUDA host sends this call to the tensor-core path
    (cuda::matvec_takes_tc: 16-bit x, K a multiple of 256, at least
    PERSONAPLEX_MATVEC_TC_MIN_ROWS rows, default 2),
    which dequantises 4- and 8-bit weights to the dtype of x first."""
    on_cuda = mx.default_device().type == mx.gpu and mx.cuda.is_available()
    env = int(os.environ.get("PERSONAPLEX_MATVEC_TC_MIN_ROWS") or 0)
    return (on_cuda and dt != mx.float32 and K % 256 == 0
            and rows >= (env if env > 0 else 2))


def check_matvec_tc(s: Shapes, d: Draw):
    """check_matvec at 17 rows of x: on CUDA, matvec's tensor-core path (kernels/matvec_tc.cuh
    takes 16-bit x from 2 rows, every weight format); elsewhere
    the same primitive at that batch. There its weights are dequantised to T first, which
    the reference here then does too."""
    yield from check_matvec(with_batch(s, max(s.batch, 17)), d, w_in_dtype=True)


def check_ring_attention(s: Shapes, d: Draw):
    """test_ring_attention.py: absolute, per dtype, plus 6e-8 per position of RoPE angle."""
    from . import _ext

    cfg, B, dt = s.lm, s.batch, s.dtype
    H, D, W = cfg.num_heads, cfg.head_dim, cfg.context
    for T in (1, 4):
        q, k, v = (d.normal((B, H, T, D), dt) for _ in range(3))
        kc, vc = d.normal((B, H, W, D), dt), d.normal((B, H, W, D), dt)
        pos = mx.array([W + 3 + 5 * b for b in range(B)], mx.int32)  # a wrapped ring
        got = _ext.ring_attention(q, k, v, kc, vc, pos, D**-0.5, cfg.max_period)
        want = reference.ring_attention(q, k, v, kc, vc, pos, rope_max_period=cfg.max_period)
        yield f"T={T}", worst(got, want, RING_TOL[dt] + 6e-8 * (W + 3 + 5 * B + T))


def check_decoder_layers(s: Shapes, d: Draw):
    """test_decoder_layers.py's tolerance, per unit of the hidden state's scale (the test's
    values are ~1; the 7B's residual stream grows larger); the reference on the
    dequantized weights (dense)."""
    from . import _ext, ops

    cfg, B, dt = s.lm, s.batch, s.dtype
    C, H, W = cfg.dim, cfg.num_heads, cfg.context
    for bits in (0, 4) if (C % 64 or cfg.ffn_hidden % 64) == 0 else (0,):
        stack = d.stack(s.layers, C, cfg.ffn_hidden, bits, dt)
        x = d.normal((B, C), dt)
        ks = [d.normal((B, H, W, C // H), dt) for _ in range(s.layers)]
        vs = [d.normal((B, H, W, C // H), dt) for _ in range(s.layers)]
        pos = mx.full((B,), W + 7, mx.int32)
        got = _ext.decoder_layers(x, pos, ops.stack_arrays(stack), ks, vs, H, bits, NORM_EPS, cfg.max_period)
        y, k2, v2 = reference.decoder_layers(x, pos, dense_stack(stack, dt), ks, vs, heads=H,
                                             rope_max_period=cfg.max_period)
        scale = max(1.0, float(mx.max(mx.abs(y.astype(mx.float32)))))
        yield f"q{bits}" if bits else "dense", worst(got, [y, *k2, *v2], LAYERS_TOL[dt] * scale)


def check_sample_topk(s: Shapes, d: Draw):
    """test_sample_topk.py: the very tokens of the reference (given the same noise), but
    for near-ties of the float32 scores."""
    from . import _ext

    sampling = SamplingConfig()
    rows = max(2, s.batch)
    for case, V, temp, top_k in (("text", s.lm.text_card, sampling.temp_text, sampling.topk_text),
                                 ("audio", s.lm.card, sampling.temp_audio, sampling.topk_audio)):
        logits = d.normal((rows, V), s.dtype, 3.0)
        noise = d.gumbel((rows, V))
        forced = mx.array([-1] * (rows - 1) + [V // 2], mx.int32)
        got = _ext.sample_topk(logits, noise, forced, temp, top_k, False)
        want = reference.sample_topk(logits, noise, forced, temp=temp, top_k=top_k)
        yield case, float(token_mismatches(got, want, logits.astype(mx.float32) / temp + noise))


def check_depformer_frame(s: Shapes, d: Draw):
    """test_depformer_frame.py: logits teacher-forced (x4 quantized in bfloat16) per unit
    of their scale, the reference on the dequantized weights (dense); sampled codes the
    reference sampling of the fused logits."""
    from . import _ext, ops

    cfg, B, dt = s.lm, s.batch, s.dtype
    dep, Q, V = cfg.depformer, cfg.dep_q, cfg.card
    heads = dep.num_heads
    for bits in (0, 4) if (cfg.dim % 64 or dep.dim % 64 or dep.ffn_hidden % 64) == 0 else (0,):
        w = DepformerWeights(
            in_projs=tuple(d.projection(dep.dim, cfg.dim, bits, dt) for _ in range(Q)),
            tables=tuple(d.normal((cfg.text_card + 1 if k == 0 else V + 1, dep.dim), dt) for k in range(Q)),
            stacks=tuple(d.stack(1, dep.dim, dep.ffn_hidden, bits, dt) for _ in range(Q)),
            heads=tuple(d.projection(V, dep.dim, bits, dt) for _ in range(Q)))
        h, text = d.normal((B, cfg.dim), dt), d.ints(0, cfg.text_card, (B,))
        forced = d.ints(0, V, (Q, B))
        kw = dict(heads=heads, rope_max_period=None, temp=SamplingConfig().temp_audio, top_k=SamplingConfig().topk_audio)
        arrays = ops.depformer_arrays(w)
        got = _ext.depformer_frame(h, text, forced, None, *arrays, heads, bits, NORM_EPS, 0.0, kw["temp"],
                                   kw["top_k"], False)
        ref_w = DepformerWeights(tuple(dense(p, dt) for p in w.in_projs), w.tables,
                                 tuple(dense_stack(st, dt) for st in w.stacks), tuple(dense(p, dt) for p in w.heads))
        _, want = reference.depformer_frame(h, text, forced, None, ref_w, **kw)
        tol = DEPFORMER_TOL[dt] * (4 if bits and dt == mx.bfloat16 else 1)
        scale = max(1.0, float(mx.max(mx.abs(got[1].astype(mx.float32)))))
        yield f"logits q{bits}" if bits else "logits", worst([got[1]], [want], tol * scale)
        free = mx.full((Q, B), -1, mx.int32)
        noise = d.gumbel((Q, B, V))
        codes, logits = _ext.depformer_frame(h, text, free, noise, *arrays, heads, bits, NORM_EPS, 0.0, kw["temp"],
                                             kw["top_k"], False)
        want = reference.sample_topk(logits, noise, None, temp=kw["temp"], top_k=kw["top_k"])
        scores = logits.astype(mx.float32) / kw["temp"] + noise
        yield f"codes q{bits}" if bits else "codes", float(token_mismatches(codes, want, scores))


def _seanet_convs(m: MimiConfig, B: int):
    """(case, T, C_in, C_out, K, stride, dilation, groups, elu, first) of SEANet's streaming
    convs over one frame: the input conv, a residual conv, the first downsample, the last
    conv, and the 12.5 Hz downsample (replicate padding)."""
    sn, ratios = m.seanet, tuple(reversed(m.seanet.ratios))
    nf, T = sn.n_filters, m.frame_size
    top = nf * 2 ** len(ratios)
    return [("input", T, sn.channels, nf, sn.kernel_size, 1, 1, 1, False, False),
            ("residual", T, nf, nf // sn.compress, sn.residual_kernel_size, 1, 1, 1, True, False),
            ("downsample", T, nf, 2 * nf, 2 * ratios[0], ratios[0], 1, 1, True, False),
            ("last", T // m.hop_length, top, sn.dimension, sn.last_kernel_size, 1, 1, 1, True, False),
            ("frame rate", m.resample_stride, sn.dimension, sn.dimension, 2 * m.resample_stride,
             m.resample_stride, 1, 1, False, True)]


def check_conv1d_stream(s: Shapes, d: Draw):
    """test_conv1d_stream.py: per unit of the output's scale; the carried context exact."""
    from . import _ext, ops

    B = s.batch
    for case, T, C_in, C_out, K, stride, dil, groups, elu, first in _seanet_convs(s.mimi, B):
        if ops._conv_as_gemm(B * (T // stride) * C_out * K * (C_in // groups)):
            continue  # the model runs MLX's own conv there (ops.CONV_KERNEL_MAX_MACS)
        context = (K - 1) * dil + 1 - stride
        x, prev = d.normal((B, T, C_in)), d.normal((B, context, C_in))
        w, b = d.normal((C_out, K, C_in // groups), scale=(K * C_in / groups) ** -0.5), d.normal((C_out,))
        f = mx.array([i % 2 == 0 for i in range(B)]) if first else None
        got = _ext.conv1d_stream(x, prev, w, b, f, stride, dil, groups, elu)
        want = on_cpu(reference.conv1d_stream, x, prev, w, b, stride=stride, dilation=dil, elu_input=elu,
                      groups=groups, first=f)
        scale = max(1.0, float(mx.max(mx.abs(want[0]))))
        yield case, max(worst(got[:1], want[:1], CONV_TOL[mx.float32] * scale),
                        worst(got[1:], want[1:], CONV_TOL[mx.float32] if elu else 1e-30))


def check_conv_transpose1d_stream(s: Shapes, d: Draw):
    """test_conv_transpose1d_stream.py: per unit of the output's scale."""
    from . import _ext, ops

    m, B = s.mimi, s.batch
    sn, nf = m.seanet, m.seanet.n_filters
    top = nf * 2 ** len(sn.ratios)
    cases = [("frame rate", 1, sn.dimension, sn.dimension, 2 * m.resample_stride, m.resample_stride,
              sn.dimension, False),
             ("first upsample", m.resample_stride, top, top // 2, 2 * sn.ratios[0], sn.ratios[0], 1, True),
             ("last upsample", m.frame_size // sn.ratios[-1], 2 * nf, nf, 2 * sn.ratios[-1], sn.ratios[-1], 1, True)]
    for case, T, C_in, C_out, K, stride, groups, elu in cases:
        if ops._conv_as_gemm(B * T * C_out * K * (C_in // groups)):
            continue
        x, partial = d.normal((B, T, C_in)), d.normal((B, K - stride, C_out))
        w, b = d.normal((C_out, K, C_in // groups), scale=(K * C_in / groups) ** -0.5), d.normal((C_out,))
        got = _ext.conv_transpose1d_stream(x, partial, w, b, stride, groups, elu)
        want = on_cpu(reference.conv_transpose1d_stream, x, partial, w, b, stride=stride, groups=groups,
                      elu_input=elu)
        scale = max(1.0, float(mx.max(mx.abs(want[0]))))
        yield case, worst(got, want, CONV_TOL[mx.float32] * scale)


def _books(d: Draw, q: MimiConfig, n_q: int):
    qc = q.quantizer
    return mx.stack([d.normal((qc.bins, qc.dimension), scale=0.6**i) for i in range(n_q)])


def check_rvq_encode(s: Shapes, d: Draw):
    """test_rvq.py: the reference's codes, but for near-ties of the float32 distances (from a
    vector's first such tie on, its later codes follow a different residual)."""
    from . import _ext

    for case, n_q in (("semantic", 1), ("acoustic", s.mimi.num_codebooks - 1)):
        books = _books(d, s.mimi, n_q)
        x = d.normal((s.batch, 2, s.mimi.quantizer.dimension))
        got, want = np.array(_ext.rvq_encode(x, books)), np.array(reference.rvq_encode(x, books))
        yield case, float(_code_mismatches(np.array(x).reshape(-1, x.shape[-1]), np.array(books),
                                           got.reshape(-1, n_q), want.reshape(-1, n_q)))


def _code_mismatches(x, books, got, want) -> int:
    bad = 0
    for v in range(x.shape[0]):
        r = x[v].astype(np.float64)
        for q in range(books.shape[0]):
            e = books[q].astype(np.float64)
            if got[v, q] != want[v, q]:
                dist = ((r - e[[got[v, q], want[v, q]]]) ** 2).sum(-1)
                bad += abs(dist[0] - dist[1]) > 1e-5 * ((r * r).sum() + (e[want[v, q]] ** 2).sum())
                break
            r = r - e[want[v, q]]
    return bad


def check_rvq_decode(s: Shapes, d: Draw):
    """test_rvq.py: bit-exact (both add the entries in codebook order in float32)."""
    from . import _ext

    n_q = s.mimi.num_codebooks
    books = _books(d, s.mimi, n_q)
    codes = d.ints(0, s.mimi.quantizer.bins, (s.batch, 2, n_q))
    yield "decode", worst([_ext.rvq_decode(codes, books)], [reference.rvq_decode(codes, books)], 1e-30)


CHECKS = {name: globals()[f"check_{name}"] for name in PRIMITIVES}


@dataclass(frozen=True)
class Result:
    name: str
    cases: int
    worst: float  # largest error / tolerance over the cases (<= 1 passes)
    worst_case: str
    error: str | None  # the kernel did not build or run: the exception's first line
    seconds: float

    @property
    def ok(self) -> bool:
        return self.error is None and self.worst <= 1.0

    def why(self) -> str:
        if self.error:
            return self.error
        return f"{self.worst_case}: error {self.worst:.3g} x its tolerance"


def run(shapes: Shapes, names=PRIMITIVES, seed: int = 0) -> list[Result]:
    mx.synchronize()  # work queued before: a GPU fault there is not a primitive's
    results = []
    for i, name in enumerate(names):
        t0, n, top, top_case, error = time.perf_counter(), 0, 0.0, "", None
        try:
            for case, ratio in CHECKS[name](shapes, Draw(seed + i)):
                n += 1
                if not ratio <= top:  # NaN counts as worse than anything
                    top, top_case = ratio, case
            mx.synchronize()  # a failed command buffer raises here, on its primitive
        except Exception as e:  # a kernel that does not compile or launch here: a verdict, not a crash
            error = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
        results.append(Result(name, n, top, top_case, error, time.perf_counter() - t0))
    return results


def device_name() -> str:
    info = mx.device_info()
    kind = "gpu" if mx.default_device().type == mx.gpu else "cpu"
    return f"{kind}: {info.get('device_name') or info.get('architecture') or 'unknown'}"


def table(results: list[Result], shapes: Shapes) -> str:
    lines = [f"personaplex_fast {__version__} self-test, MLX {mx.__version__}, {device_name()}, "
             f"{shapes.name} shapes, batch {shapes.batch}",
             f"{'primitive':<25}{'cases':>6}{'worst err/tol':>15}{'time':>9}  verdict"]
    for r in results:
        verdict = ("ok" if r.cases else "n/a (not run on this device)") if r.ok else f"FAIL ({r.why()})"
        lines.append(f"{r.name:<25}{r.cases:>6}{r.worst:>15.3g}{r.seconds:>8.2f}s  {verdict}")
    return "\n".join(lines)


# -- the cached verdict ops uses

def _cache_dir() -> Path:
    base = os.environ.get("PERSONAPLEX_FAST_CACHE") or Path.home() / ".cache" / "personaplex_fast"
    return Path(base) / "selftest"


def cache_key() -> dict:
    """What a verdict depends on: the package, MLX, the device, the extension, and the
    checks themselves (a fixed check must not keep an old failure)."""
    from . import _ext, selftest_tick

    st = Path(_ext.__file__).stat()
    checks = hashlib.sha256(b"".join(Path(m.__file__).read_bytes() for m in (sys.modules[__name__], selftest_tick)))
    return {"package": __version__, "mlx": mx.__version__, "device": device_name(),
            "extension": f"{st.st_size}-{st.st_mtime_ns}", "checks": checks.hexdigest()[:16]}


def _cache_path(key: dict) -> Path:
    return _cache_dir() / (hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16] + ".json")


def cached() -> bool:
    """Whether this device's verdict is in the cache already."""
    return _cache_path(cache_key()).exists()


def verdict(shapes: Shapes | None = None) -> dict[str, str]:
    """The primitives that failed on this device, each with why: read from the cache, or
    the self-test run once (at default_shapes) and its verdict written there."""
    key = cache_key()
    path = _cache_path(key)
    try:
        data = json.loads(path.read_text())
        if data.get("key") == key:
            return dict(data["failures"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    shapes = shapes or default_shapes()
    results = run(shapes)
    failures = {r.name: r.why() for r in results if not r.ok}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"key": key, "failures": failures, "table": table(results, shapes)}, indent=1))
    tmp.replace(path)
    return failures


def with_batch(shapes: Shapes, batch: int) -> Shapes:
    return replace(shapes, batch=batch)
