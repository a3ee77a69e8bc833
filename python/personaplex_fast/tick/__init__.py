"""The whole frame as one program: Mimi encode, the LM step and Mimi decode of
every session, described once as a list of our kernels (csrc/tick.h) and run by
one primitive per tick.

codec.py and lm.py walk the models and add the ops (builder.py: handles, weights,
state, the projection rule), in the order the per-op path
(engine.Engine without a program: Mimi.encode_step, LM.step, Mimi.decode_step)
computes them, with the same kernels and the same rounding, so that on the CPU a
program tick equals a per-op tick given the same tokens (tests/test_tick.py). The
sessions' streaming state lives in the program's arena:

    LM      KV rings, token and forced-token rings, frame offsets, seeds
    codec   every conv's left context and every transposed conv's overlap, the
            downsampler's first-sample flags, both transformers' KV rings and
            step offsets

A reset (control column 0, a bit set of RESET_*) refills a session's rows before
the tick; a prompted session's LM rows are written in between ticks instead
(TickRunner.load_lm_row). Sampling noise comes from the program itself (Philox,
per session seed and frame), so sampled tokens differ from the per-op path's
(mx.random); greedy picks are the same.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

from ..models.lm import LM, LMState
from ..models.mimi import Mimi
from ..sampling import SamplingConfig
from .builder import (CONTROL_COLS, RESET_ALL, RESET_CODEC, RESET_LM, RESET_SEED, Builder, Unsupported,
                      supported)
from .codec import emit_decoder, emit_encoder
from .lm import emit_lm

class TickRunner:
    """A built program and what the engine needs to drive it."""

    def __init__(self, lm: LM, mimi: Mimi, slots: int, sampling: SamplingConfig, gpu: bool,
                 gemm_forms: bool | None = None, kv_bits: int | None = None):
        """kv_bits 8: the temporal transformer's KV rings in 8 bits (models/cache.py)."""
        why = supported(lm, mimi, gpu)
        if why is not None:
            raise Unsupported(why)
        if lm.cfg.card != mimi.cfg.quantizer.bins or lm.cfg.dep_q != mimi.cfg.num_codebooks:
            raise Unsupported("the LM's codebooks do not match Mimi's")
        b = Builder(slots, gpu, gemm_forms)
        F = mimi.cfg.frame_size
        self.lm_cfg, self.lm_dtype, self.gpu = lm.cfg, lm.dtype, gpu
        self.slots, self.frame_size = slots, F
        pcm_in = b.buf((slots, F), mx.float32)
        control = b.buf((slots, CONTROL_COLS), mx.int32)
        pcm_out = b.buf((slots, F), mx.float32)
        G = 1 + lm.cfg.dep_q
        n_sem = mimi.cfg.quantizer.n_q_semantic
        n_ac = mimi.cfg.num_codebooks - n_sem
        # The tick's operands come first: set_io lets reset regions check their rows.
        tokens_out = b.buf((slots, G), mx.int32)
        b.p.set_io(pcm_in=pcm_in, control=control, pcm_out=pcm_out, tokens=tokens_out, B=slots, F=F,
                   C=CONTROL_COLS, G=G)
        b.mark("mimi encode")
        sem, ac = emit_encoder(b, mimi, pcm_in)
        self.lm, out = emit_lm(b, lm, sampling, sem, ac, n_sem, n_ac, kv_bits)
        b.mark("mimi decode")
        b.p.copy(dst=tokens_out, src=out.tokens, bytes=slots * G * 4)
        emit_decoder(b, mimi, out.codes_sem, out.codes_ac, out.valid, pcm_out)
        b.finish()
        self.program = b.p
        self.sections = b.sections()  # (name, first op, end op): where a tick's time goes
        self._builder = b  # holds the weights' source arrays

    def __call__(self, pcm: mx.array, control: mx.array) -> tuple[mx.array, mx.array]:
        from .. import _ext

        out = _ext.tick(self.program, pcm, control, stream=mx.gpu if self.gpu else mx.cpu)
        return out[0], out[1]

    def load_lm_row(self, slot: int, state: LMState) -> None:
        """Copies a batch-of-one LM state (a prompted session) into slot's rows; its KV
        rows are quantized here where the program's rings are 8-bit and the state's not."""
        h = self.lm
        keys, values = state.kv.rows(0, h.kv_bits)
        if h.kv_bits == 8:
            rings = [*zip(h.keys, (c for c, _ in keys)), *zip(h.key_scales, (s for _, s in keys)),
                     *zip(h.values, (c for c, _ in values)), *zip(h.value_scales, (s for _, s in values))]
        else:
            rings = [*zip(h.keys, keys), *zip(h.values, values)]
        pairs = [*rings, *((handle, a[0].astype(mx.int32)) for handle, a in
                           ((h.offsets, state.offsets), (h.tokens, state.tokens), (h.forced, state.forced)))]
        rows = [mx.contiguous(row) for _, row in pairs]
        mx.eval(rows)
        for (handle, _), row in zip(pairs, rows):
            self.program.write(handle, slot * row.nbytes, row)

    def set_offsets(self, offsets: np.ndarray) -> None:
        """Puts every session at the given frame (benchmarks: a full attention window)."""
        a = mx.array(np.asarray(offsets, np.int32).reshape(self.slots))
        mx.eval(a)
        self.program.write(self.lm.offsets, 0, a)

    def read_lm(self) -> dict[str, np.ndarray]:
        """The LM's offsets, token rings and forced rings (tests)."""
        cfg, B, R = self.lm_cfg, self.slots, self.lm_cfg.max_delay + 2

        def read(h, shape):
            n = math.prod(shape) * 4
            return np.array(self.program.read(h, 0, n)).view(np.int32).reshape(shape)

        return {"offsets": read(self.lm.offsets, (B,)), "tokens": read(self.lm.tokens, (B, 1 + cfg.n_q, R)),
                "forced": read(self.lm.forced, (B, 1 + cfg.dep_q, R))}

    def read_kv(self) -> tuple[list, list]:
        """The temporal transformer's rings, keys and values per layer, as models/cache.py
        holds them: arrays [B, H, W, D], or (codes, scales) pairs where kv_bits is 8 (tests)."""
        cfg, h = self.lm_cfg, self.lm
        shape = (self.slots, cfg.num_heads, cfg.context, cfg.head_dim)

        def read(handle, shape, dtype):
            n = math.prod(shape) * dtype.size
            return mx.array(np.array(self.program.read(handle, 0, n))).view(dtype).reshape(shape)

        if h.kv_bits == 8:
            return tuple([(read(c, shape, mx.int8), read(s, shape[:3], mx.float32)) for c, s in zip(codes, scales)]
                         for codes, scales in ((h.keys, h.key_scales), (h.values, h.value_scales)))
        return tuple([read(r, shape, self.lm_dtype) for r in rings] for rings in (h.keys, h.values))


class CodecRunner:
    """Mimi alone as a program: each tick encodes B frames and decodes the codes it just
    made (benchmarks of the codec's fixed cost; tests against Mimi's own streaming)."""

    def __init__(self, mimi: Mimi, slots: int, gpu: bool, gemm_forms: bool | None = None):
        b = Builder(slots, gpu, gemm_forms)
        F = mimi.cfg.frame_size
        self.slots, self.gpu = slots, gpu
        pcm_in = b.buf((slots, F), mx.float32)
        control = b.buf((slots, 1), mx.int32)
        pcm_out = b.buf((slots, F), mx.float32)
        n_sem = mimi.cfg.quantizer.n_q_semantic
        codes = b.buf((slots, n_sem), mx.int32)
        b.p.set_io(pcm_in=pcm_in, control=control, pcm_out=pcm_out, tokens=codes, B=slots, F=F, C=1, G=n_sem)
        b.mark("mimi encode")
        sem, ac = emit_encoder(b, mimi, pcm_in)
        b.mark("mimi decode")
        b.p.copy(dst=codes, src=sem, bytes=slots * n_sem * 4)
        emit_decoder(b, mimi, sem, ac, b.const(np.ones(slots, np.int32)), pcm_out)
        b.finish()
        self.program, self._builder = b.p, b
        self.sections = b.sections()

    def __call__(self, pcm: mx.array, reset: mx.array) -> tuple[mx.array, mx.array]:
        """pcm [B, frame]; reset [B, 1] int32 (RESET_CODEC restarts a session) ->
        (the decoded pcm, the semantic codes)."""
        from .. import _ext

        out = _ext.tick(self.program, pcm, reset, stream=mx.gpu if self.gpu else mx.cpu)
        return out[0], out[1]


def ring_attention(q, k, v, k_cache, v_cache, pos, *, rope_max_period: float | None = 10000.0,
                   gpu: bool) -> tuple:
    """The program's attention op alone (a program of one op, on the GPU or the CPU) over
    reference.ring_attention's operands: q, k, v [B, H, T, D]; rings [B, H, W, D] in q's
    dtype, or 8-bit (codes, scales) pairs as the LM's rings are with kv_bits 8; pos [B].
    Returns (out, k_ring', v_ring') as the reference does, out NaN where the op did not
    write it. The self-test checks the 8-bit rings' kernels with it: op by op, nothing
    else runs them."""
    from .. import _ext

    B, H, T, D = q.shape
    quantized = isinstance(k_cache, tuple)
    W = (k_cache[0] if quantized else k_cache).shape[2]
    p = _ext.TickProgram(gpu)

    def region(a: mx.array) -> int:
        a = mx.contiguous(a)
        mx.eval(a)
        h = p.buffer(a.nbytes, a.dtype)
        p.init(h, a)
        return h

    def read(h: int, like: mx.array) -> mx.array:
        return p.read(h, 0, like.nbytes).view(like.dtype).reshape(like.shape)

    hq, hk, hv, hpos = (region(a) for a in (q, k, v, pos.astype(mx.int32)))
    rings = [[region(a) for a in (ring if quantized else (ring,))] for ring in (k_cache, v_cache)]
    out = mx.full(q.shape, float("nan"), q.dtype)
    hout = region(out)
    io = [p.buffer(4, dt) for dt in (mx.float32, mx.int32, mx.float32, mx.int32)]
    p.set_io(pcm_in=io[0], control=io[1], pcm_out=io[2], tokens=io[3], B=1, F=1, C=1, G=1)
    p.attention(q=hq, k=hk, v=hv, k_cache=rings[0][0], v_cache=rings[1][0], pos=hpos, out=hout, B=B, H=H, T=T,
                D=D, W=W, new_strides=[H * T * D, T * D, D], rope_max_period=rope_max_period or 0.0,
                k_scales=rings[0][1] if quantized else -1, v_scales=rings[1][1] if quantized else -1)
    mx.eval(_ext.tick(p, mx.zeros((1, 1)), mx.zeros((1, 1), mx.int32), stream=mx.gpu if gpu else mx.cpu))
    rings = [tuple(read(h, a) for h, a in zip(hs, ring)) if quantized else read(hs[0], ring)
             for hs, ring in zip(rings, (k_cache, v_cache))]
    return read(hout, out), *rings


# What the engine and the tests drive a program with.
__all__ = ["CONTROL_COLS", "RESET_ALL", "RESET_CODEC", "RESET_LM", "RESET_SEED", "CodecRunner", "TickRunner",
           "Unsupported", "ring_attention", "supported"]
