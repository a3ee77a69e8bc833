"""The tick program's builder: memory handles, weights, state regions and the
projection rule (matvec, or on a GPU a cuBLAS GEMM), shared by tick/codec.py and
tick/lm.py, which walk the models and add the ops."""

from __future__ import annotations

import math
import os

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .. import ops
from ..models.lm import LM
from ..models.mimi import Mimi

RESET_LM = 1  # offsets, token rings, forced rings
RESET_CODEC = 2  # every codec state
RESET_SEED = 4  # the session's sampling seed, from control column 1
RESET_ALL = RESET_LM | RESET_CODEC | RESET_SEED

CONTROL_COLS = 2  # reset bits, seed

# On a GPU, dense projections of this many rows (sessions, or sessions x codec steps)
# or more run as a cuBLAS GEMM (with the norm and gate as ops of their own) rather than
# as matvec, which streams the weights once per 8 rows; and codec convs of more than
# this many multiply-adds per tick as im2col + GEMM rather than the direct kernel.
# Both forms compute the same function (tests/gpu/test_tick_gpu.py); docs/PERF.md has
# the measurements behind the numbers.
GEMM_MIN_ROWS = 4
# ... unless the weights are smaller than this and the rows at most 8 (matvec's tile):
# the depformer's and the codec's small weights (0: always the GEMM at GEMM_MIN_ROWS).
GEMM_MIN_BYTES = 0
CONV_GEMM_MIN_MACS = 4_000_000


class Unsupported(ValueError):
    """The models use something the program does not implement (the per-op path runs them)."""


def supported(lm: LM, mimi: Mimi, gpu: bool) -> str | None:
    """Why the program cannot run these models, or None when it can."""
    if gpu:
        from .. import _ext

        if not _ext.cuda_build():
            return "no tick program on this GPU backend (Metal): the engine runs op by op"
    cfg = lm.cfg
    if cfg.norm != "rms_norm_f32":
        return f"norm {cfg.norm!r} (the program fuses rms_norm_f32 only)"
    if mimi.dtype != mx.float32:
        return "Mimi weights not in float32"
    if lm.dtype not in (mx.float32, mx.bfloat16, mx.float16):
        return f"LM dtype {lm.dtype}"
    for layer in list(lm.transformer.layers) + list(lm.depformer.layers):
        if not (layer.norm1.f32 and layer.norm2.f32):
            return "a layer norm not in float32"
    heads = {cfg.head_dim, cfg.depformer.head_dim, mimi.cfg.transformer.d_model // mimi.cfg.transformer.num_heads}
    if gpu and not heads <= set(ops.ATTENTION_HEAD_DIMS):
        return f"head dims {sorted(heads)} (the GPU kernels take {ops.ATTENTION_HEAD_DIMS})"
    return None


def _cast(a: mx.array, dtype) -> mx.array:
    return a if a.dtype == dtype else a.astype(dtype)


def _proj(layer: nn.Module):
    p = ops.projection(layer)
    if p is None:
        raise Unsupported(f"{type(layer).__name__} (bias-free Linear or affine group-64 QuantizedLinear only)")
    return p


def dense_by_tensor_cores(M: int, K: int, dtype) -> bool:
    """Whether a dense projection of M >= GEMM_MIN_ROWS rows goes to matvec's tensor-core
    path (kernels/matvec_tc.cuh: 16-bit x, K a multiple of 256) rather than the GEMM
    forms: up to 8 rows always (H200, 2026-12-01: B=4 11.07 against 11.57 ms a tick, B=8
    13.33 against 13.30), 9 to 64 with PERSONAPLEX_DENSE_PROJ=tc (default: gemm). 4- and
    8-bit weights always take matvec, which picks its path itself."""
    top = 64 if os.environ.get("PERSONAPLEX_DENSE_PROJ", "gemm") == "tc" else 8
    return M <= top and K % 256 == 0 and dtype in (mx.bfloat16, mx.float16)


class Builder:
    """Adds ops to a TickProgram; tracks handles, weights and state regions."""

    def __init__(self, slots: int, gpu: bool, gemm_forms: bool | None = None):
        """gemm_forms: build the GPU's GEMM forms of projections and convs (default: on a
        GPU); on the CPU their ops compute the same functions (tests of the builder)."""
        from .. import _ext

        self.p = _ext.TickProgram(gpu)
        self.B = slots
        self._marks: list[tuple[str, int]] = []
        self.gemm_forms = gpu if gemm_forms is None else gemm_forms
        self._scratch: dict[tuple, int] = {}
        self._dtypes: dict[int, mx.Dtype] = {}
        self._weights: dict[int, int] = {}
        self._keep: list[mx.array] = []
        self.updates: list[tuple[int, int, int, int]] = []
        self.resets: list[tuple[int, int, int, int, int]] = []

    def buf(self, shape, dtype, *, reset: int = 0, pattern: int = 0, control_col: int = -1) -> int:
        """An arena region of `shape`; reset: the RESET_* class whose sessions' rows
        (shape[0] == B) are refilled with `pattern` (or their control value)."""
        nbytes = math.prod(shape) * dtype.size
        h = self.p.buffer(nbytes, dtype)
        self._dtypes[h] = dtype
        if reset:
            self.resets.append((h, nbytes // shape[0], reset, pattern, control_col))
        return h

    def const(self, values: np.ndarray) -> int:
        """A region holding `values` (int32 or float32), never written by the ops."""
        a = mx.array(values)
        mx.eval(a)
        h = self.p.buffer(a.nbytes, a.dtype)
        self._dtypes[h] = a.dtype
        self.p.init(h, a)
        return h

    def w(self, a: mx.array | None) -> int:
        """The handle of a weight (once per array)."""
        if a is None:
            return -1
        key = id(a)
        if key not in self._weights:
            c = mx.contiguous(a)
            mx.eval(c)
            self._keep.append(a)  # ids stay unique while the array lives
            self._weights[key] = self.p.weight(c)
        return self._weights[key]

    def view(self, h: int, offset_bytes: int, dtype) -> int:
        v = self.p.view(h, offset_bytes, dtype)
        self._dtypes[v] = dtype
        return v

    def shared(self, name: str, shape, dtype) -> int:
        """A scratch region for one op's intermediate, shared by every op asking for the
        same (name, shape, dtype): the ops run one after another."""
        key = (name, tuple(shape), dtype)
        if key not in self._scratch:
            self._scratch[key] = self.buf(shape, dtype)
        return self._scratch[key]

    def project(self, layer: nn.Module, x: int, out: int, M: int, K: int, n_out: int, *, norm=None,
                gate: bool = False, residual: bool = False) -> None:
        """out [M, n_out] = [silu-gate of] layer(norm(x)) [+ out]: one matvec, or on a GPU
        at GEMM_MIN_ROWS rows and more with dense weights, [norm,] a cuBLAS GEMM [, gate].
        norm: an RMSNorm module (float32, as matvec's prologue); residual: in place into out."""
        proj = _proj(layer)
        w, scales, biases, bits = proj.w, proj.scales, proj.biases, proj.bits
        dt = self.dtype_of(x)
        if (self.gemm_forms and bits == 0 and M >= GEMM_MIN_ROWS and (M > 8 or w.nbytes >= GEMM_MIN_BYTES)
                and not dense_by_tensor_cores(M, K, dt)):
            src = x
            if norm is not None:
                src = self.shared("normed", (M, K), dt)
                self.p.norm(x=x, w=self.w(_cast(norm.alpha, dt)), out=src, rows=M, dim=K, eps=norm.eps)
            if gate:
                both = self.shared("gated", (M, 2 * n_out), dt)
                self.p.gemm(x=src, w=self.w(w), y=both, M=M, N=2 * n_out, K=K)
                self.p.gate(x=both, out=out, rows=M, cols=n_out)
            else:
                self.p.gemm(x=src, w=self.w(w), y=out, M=M, N=n_out, K=K, accumulate=residual)
            return
        self.p.matvec(x=x, w=self.w(w), scales=self.w(scales), biases=self.w(biases), out=out, M=M, K=K,
                      n_out=n_out, bits=bits, gate=gate, residual=out if residual else -1,
                      alpha=-1 if norm is None else self.w(_cast(norm.alpha, dt)),
                      eps=1e-8 if norm is None else norm.eps)

    def dtype_of(self, h: int) -> mx.Dtype:
        return self._dtypes[h]

    def mark(self, name: str) -> None:
        """The ops added from here on, until the next mark, are the section `name`
        (profiles sum each section's ops: bench/tick_bench.py --profile)."""
        self._marks.append((name, self.p.ops))

    def sections(self) -> list[tuple[str, int, int]]:
        """(name, first op, end op) of each marked section, in order."""
        ends = [first for _, first in self._marks[1:]] + [self.p.ops]
        return [(name, first, end) for (name, first), end in zip(self._marks, ends)]

    def finish(self) -> None:
        for h, row, mask, pattern, col in self.resets:
            self.p.reset_region(h, row, mask, pattern & 0xFFFFFFFF, col)
        for h, count, mode, value in self.updates:
            self.p.update_region(h, count, mode, value)
