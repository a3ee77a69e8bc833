"""GPU benchmark at the real 7B and Mimi shapes: one table per level, ours vs the
pure-MLX reference vs PyTorch with a CUDA graph vs the bandwidth floor.

Run on a CUDA machine: `python bench/gpu_bench.py [--torch-json FILE] [--markdown FILE]`
(`--torch-json` merges the PyTorch numbers of bench/torch_bench.py, run in its own
process first so that the two frameworks never share the GPU's memory).

Times are medians of host wall time around one mx.eval + mx.synchronize per call
(so they include MLX's per-eval graph building and launch). The floor of a row is
the bytes it must move (weights once, KV cache and state per session, activations
ignored) at the device-to-device copy bandwidth measured in this run.
Random weights (MLX's default init) and inputs; sessions sit past the end of the
3000-frame attention window, so every step attends over a full window.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import subprocess
import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from personaplex_fast import _ext, ops, reference

H, D, W = 32, 128, 3000
CONTEXT_FRAME = 3100  # sessions' position: past the window, so it is full
TINY = False  # --tiny: the CPU smoke test of this script, at the tiny test model's sizes


def median_ms(step, warmup=3, iters=20):
    for _ in range(warmup):
        step()
    mx.synchronize()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        step()
        mx.synchronize()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def copy_bandwidth(mib=2048):
    x = mx.random.normal((mib * 2**19,), dtype=mx.float32).astype(mx.bfloat16)
    mx.eval(x)
    ms = median_ms(lambda: mx.eval(x * 1), iters=20)  # an elementwise pass: read + write
    return 2 * x.nbytes / (ms * 1e-3)


def param_bytes(module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(module.parameters()))


def bf16(rng, shape):
    return mx.array(rng.standard_normal(shape).astype(np.float32)).astype(mx.bfloat16)


class Table:
    """Rows of one level: name, B, ours, reference, torch, floor (ms)."""

    def __init__(self, title, bw, torch_rows):
        self.title, self.bw, self.torch_rows, self.rows = title, bw, torch_rows, []

    def add(self, name, B, ours, ref=None, floor_bytes=None, torch_key=None, note=""):
        floor = 1e3 * floor_bytes / self.bw if floor_bytes else None
        tb = self.torch_rows.get(torch_key, {}).get(str(B)) if torch_key else None
        self.rows.append((name, B, ours, ref, tb, floor, note))
        print(self.lines()[-1], flush=True)

    def lines(self):
        out = [self.title, "",
               "| what | B | ours | pure MLX | PyTorch + CUDA graph | floor | ours / floor | MLX / ours | torch / ours | note |",
               "|---|---|---|---|---|---|---|---|---|---|"]
        f = lambda v, d=3: "-" if v is None else (v if isinstance(v, str) else f"{v:.{d}f}")
        for name, B, ours, ref, tb, floor, note in self.rows:
            tv = tb if isinstance(tb, (int, float)) else None
            out.append(f"| {name} | {B} | {f(ours)} | {f(ref)} | {f(tb) if tb is not None else '-'} | {f(floor)} "
                       f"| {f(ours / floor if floor else None, 2)} | {f(ref / ours if ref else None, 1)} "
                       f"| {f(tv / ours if tv else None, 2)} | {note} |")
        return out


# -- primitives ---------------------------------------------------------------


def ring_rows(table, batches):
    for B in batches:
        rng = np.random.default_rng(B)
        inputs = [[bf16(rng, (B, H, 1, D)) for _ in range(3)] for _ in range(4)]
        state = {"kc": bf16(rng, (B, H, W, D)), "vc": bf16(rng, (B, H, W, D)), "p": 2 * W, "i": 0}
        mx.eval(inputs, state["kc"], state["vc"])

        def decode(fn):
            def step():
                q, k, v = inputs[state["i"] % len(inputs)]
                pos = mx.full((B,), state["p"], dtype=mx.int32)
                out, state["kc"], state["vc"] = fn(q, k, v, state["kc"], state["vc"], pos)
                mx.eval(out, state["kc"], state["vc"])
                state["p"] += 1
                state["i"] += 1
            return step

        copies = _ext.ring_cache_copies()
        fused = median_ms(decode(ops.ring_attention))
        copies = _ext.ring_cache_copies() - copies
        ref = median_ms(decode(reference.ring_attention), iters=5)
        kv_bytes = 2 * B * H * W * D * 2
        table.add("ring_attention (one layer, W=3000)", B, fused, ref, kv_bytes, "attention",
                  f"cache copies: {copies}")


MATVEC_SHAPES = [  # name, K, N (weight rows), gate, norm, residual; torch_bench's name
    ("qkv 4096->12288 +norm", 4096, 3 * 4096, False, True, False, "qkv 4096->12288"),
    ("out 4096->4096 +res", 4096, 4096, False, False, True, "out 4096->4096"),
    ("ffn_in 4096->22528 +norm+gate", 4096, 2 * 11264, True, True, False, "ffn_in 4096->22528"),
    ("ffn_out 11264->4096 +res", 11264, 4096, False, False, True, "ffn_out 11264->4096"),
]


def matvec_rows(table, batches, formats):
    rng = np.random.default_rng(0)
    for name, K, N, gate, norm, res, torch_name in MATVEC_SHAPES:
        w_full = bf16(rng, (N, K)) * (1 / math.sqrt(K))
        alpha = mx.ones((K,), dtype=mx.bfloat16) if norm else None
        for bits in formats:
            if bits:
                w, scales, biases = mx.quantize(w_full, group_size=64, bits=bits)
            else:
                w, scales, biases = w_full, None, None
            mx.eval(w, *(a for a in (scales, biases) if a is not None))
            wbytes = sum(a.nbytes for a in (w, scales, biases) if a is not None)
            for B in batches:
                x = bf16(rng, (B, K))
                r = bf16(rng, (B, N // 2 if gate else N)) if res else None
                mx.eval(x, *(a for a in (r,) if a is not None))

                def call(mode, direct=False):
                    def step():
                        if direct:
                            y = _ext.matvec(x, w, scales, biases, alpha, r, bits, gate, 1e-8)
                        else:
                            with ops.use_mode(mode):
                                y = ops.matvec(x, w, scales, biases, bits=bits, alpha=alpha, gate=gate,
                                               residual=r)
                        mx.eval(y)
                    return step

                ours = median_ms(call("fused", direct=True))
                ref = median_ms(call("reference"))
                fmt = {0: "bf16", 4: "q4", 8: "q8"}[bits]
                note = "" if B <= ops.MATVEC_MAX_ROWS else f"ops uses pure MLX above {ops.MATVEC_MAX_ROWS} rows"
                # PyTorch runs bf16 only (F.linear): its row is the bf16 one.
                table.add(f"matvec {name} {fmt}", B, ours, ref, wbytes, f"matvec {torch_name} bf16", note)


def in_graph_rows(table, batches, n=16):
    """GPU time per call with MLX's per-eval cost spread over n independent calls in
    one graph (the same weights, different activations / caches)."""
    rng = np.random.default_rng(1)
    for name, K, N, gate, norm, res, torch_name in MATVEC_SHAPES:
        w_full = bf16(rng, (N, K)) * (1 / math.sqrt(K))
        alpha = mx.ones((K,), dtype=mx.bfloat16) if norm else None
        for bits in (0, 4):
            w, scales, biases = (mx.quantize(w_full, group_size=64, bits=bits) if bits
                                 else (w_full, None, None))
            mx.eval(w, *(a for a in (scales, biases) if a is not None))
            wbytes = sum(a.nbytes for a in (w, scales, biases) if a is not None)
            for B in batches:
                xs = [bf16(rng, (B, K)) for _ in range(n)]
                rs = [bf16(rng, (B, N // 2 if gate else N)) if res else None for _ in range(n)]
                mx.eval(xs, [r for r in rs if r is not None])
                ours = median_ms(lambda: mx.eval([_ext.matvec(x, w, scales, biases, alpha, r, bits, gate, 1e-8)
                                                  for x, r in zip(xs, rs)])) / n
                ref = median_ms(lambda: mx.eval([reference.matvec(x, w, scales, biases, bits=bits, alpha=alpha,
                                                                  gate=gate, residual=r)
                                                 for x, r in zip(xs, rs)])) / n
                fmt = {0: "bf16", 4: "q4"}[bits]
                table.add(f"matvec {name} {fmt}, in graph", B, ours, ref, wbytes, f"matvec {torch_name} bf16")
    for B in batches:
        m = 8
        caches = [(bf16(rng, (B, H, W, D)), bf16(rng, (B, H, W, D))) for _ in range(m)]
        qkv = [[bf16(rng, (B, H, 1, D)) for _ in range(3)] for _ in range(m)]
        mx.eval(caches, qkv)
        pos = mx.full((B,), 2 * W, dtype=mx.int32)
        ours = median_ms(lambda: mx.eval([ops.ring_attention(*t, kc, vc, pos)[0]
                                          for t, (kc, vc) in zip(qkv, caches)])) / m
        table.add("ring_attention, in graph (old caches kept: copies)", B, ours, None, 2 * B * H * W * D * 2,
                  "attention")


# (name, T, C_in, C_out, K, stride, groups, elu) at one 80 ms frame of Mimi (float32).
CONV_SHAPES = [("conv1d 1->64 k7, T 1920", 1920, 1, 64, 7, 1, 1, False),
               ("conv1d 64->128 k8 s4, T 1920", 1920, 64, 128, 8, 4, 1, True),
               ("conv1d 512->1024 k16 s8, T 16", 16, 512, 1024, 16, 8, 1, True)]
CONVTR_SHAPES = [("conv_transpose1d 1024->512 k16 s8, T 2", 2, 1024, 512, 16, 8, 1, True),
                 ("conv_transpose1d 128->64 k8 s4, T 480", 480, 128, 64, 8, 4, 1, True)]


def codec_rows(table, batches, iters):
    """The codec primitives at Mimi's per-frame shapes, fused vs reference (float32)."""
    rng = np.random.default_rng(2)
    f32 = lambda *shape: mx.array(rng.standard_normal(shape).astype(np.float32))
    for name, T, C_in, C_out, K, stride, groups, elu in CONV_SHAPES + CONVTR_SHAPES:
        tr = name.startswith("conv_transpose")
        if TINY:
            T, C_in, C_out = max(stride, T // 8 // stride * stride), max(1, C_in // 8), max(1, C_out // 8)
        w = f32(C_out, K, C_in // groups) * (1 / math.sqrt(K * C_in))
        b = f32(C_out)
        for B in batches:
            x = f32(B, T, C_in)
            state = f32(B, K - stride, C_out) if tr else f32(B, K - stride, C_in)
            mx.eval(w, b, x, state)
            kw = dict(stride=stride, groups=groups, elu_input=elu)
            op = ops.conv_transpose1d_stream if tr else ops.conv1d_stream
            res = {}
            for mode in ("fused", "reference"):
                with ops.use_mode(mode):
                    res[mode] = median_ms(lambda: mx.eval(op(x, state, w, b, **kw)), iters=iters)
            macs = B * T * w.size // (1 if tr else stride)
            note = "ops: MLX's conv (above the kernel threshold)" if ops._conv_as_gemm(macs) else ""
            table.add(name, B, res["fused"], res["reference"], w.nbytes + x.nbytes + state.nbytes, note=note)
    n_q, bins, Dq = (8, 2048, 256) if not TINY else (8, 64, 32)
    books = f32(n_q, bins, Dq)
    for B in batches:
        x = f32(B, 1, Dq)
        codes = mx.array(rng.integers(0, bins, (B, 1, n_q)).astype(np.int32))
        mx.eval(books, x, codes)
        for what, fn in (("rvq_encode", lambda: ops.rvq_encode(x, books)),
                         ("rvq_decode", lambda: ops.rvq_decode(codes, books))):
            res = {}
            for mode in ("fused", "reference"):
                with ops.use_mode(mode):
                    res[mode] = median_ms(lambda: mx.eval(fn()), iters=iters)
            table.add(f"{what} {n_q}x{bins}x{Dq}", B, res["fused"], res["reference"],
                      books.nbytes if what == "rvq_encode" else B * n_q * Dq * 4)


def sample_rows(table, batches, iters):
    """sample_topk at the depformer's (2048 bins, top 250) and the text head's
    (32000, top 25) rows, fused vs the pure-MLX reference, both with their noise."""
    rng = np.random.default_rng(3)
    for V, k in ((2048, 250), (32000, 25)):
        V = V // 16 if TINY else V
        for B in batches:
            logits = bf16(rng, (B, V))
            noise = mx.random.gumbel((B, V), key=mx.random.key(B))
            mx.eval(logits, noise)
            res = {}
            for mode in ("fused", "reference"):
                with ops.use_mode(mode):
                    res[mode] = median_ms(lambda: mx.eval(ops.sample_topk(logits, noise, temp=0.8, top_k=k)),
                                          iters=iters)
            table.add(f"sample_topk V {V}, top {k}", B, res["fused"], res["reference"], B * V * 6)


# -- model levels ----------------------------------------------------------------


def build_lm(bits):
    from personaplex_fast.checkpoint import quantizable
    from personaplex_fast.config import LMConfig
    from personaplex_fast.models.lm import LM

    if TINY:
        from personaplex_fast.tiny import TINY as cfg
    else:
        cfg = LMConfig()
    lm = LM(cfg)
    lm.set_dtype(mx.bfloat16)
    if bits:
        nn.quantize(lm, group_size=64, bits=bits, class_predicate=quantizable(64))
    mx.eval(lm.parameters())
    return lm


def lm_times(lm, B, sampling, iters):
    """temporal alone, depformer alone and the whole lm.step, for B sessions at a full window."""
    cfg = lm.cfg
    rng = np.random.default_rng(B)
    user = mx.array(rng.integers(0, cfg.card, (B, cfg.user_q)).astype(np.int32))
    state = lm.new_state(B)
    state.offsets = mx.full((B,), CONTEXT_FRAME, dtype=mx.int32)
    mx.eval(state.kv.arrays())
    x = lm.embed_frame(mx.zeros((B, 1 + cfg.n_q), dtype=mx.int32))
    h, _ = lm.temporal(x, state)
    text = mx.zeros((B,), dtype=mx.int32)
    key = mx.random.key(0)
    mx.eval(x, h, state.kv.arrays())

    def temporal():
        hh, logits = lm.temporal(x, state)
        mx.eval(hh, logits, *state.kv.arrays())

    def depformer():
        mx.eval(lm.depformer_frame(h, text, sampling, key))

    def step():
        out = lm.step(state, user, sampling)
        mx.eval(out.text, out.audio, state.offsets, state.tokens, *state.kv.arrays())

    def build_ms(fn, n=5):
        """Host time to build the graph alone (Python + MLX graph construction)."""
        times = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return 1e3 * statistics.median(times)

    res = {"temporal": median_ms(temporal, iters=iters), "depformer": median_ms(depformer, iters=iters),
           "lm_step": median_ms(step, iters=iters),
           "temporal_build": build_ms(lambda: lm.temporal(x, state)),
           "depformer_build": build_ms(lambda: lm.depformer_frame(h, text, sampling, key))}
    if ops.mode() == "fused":
        # Four independent frames in one evaluation: what is left per frame once the
        # host's graph building and the launch are shared (GPU time, about).
        hs = [h * (1 + 0.01 * i) for i in range(4)]
        mx.eval(hs)
        res["depformer_x4"] = median_ms(
            lambda: mx.eval([lm.depformer_frame(hh, text, sampling, key) for hh in hs]), iters=iters) / 4
    if ops.mode() == "fused" and lm.depformer_weights() is not None:
        # The same frame through the model's per-op loop (one MLX op per matvec /
        # stack / sampling), to show what the depformer_frame primitive saves.
        from personaplex_fast.models.lm import LM
        primitive = LM.depformer_weights
        LM.depformer_weights = lambda self: None
        try:
            res["depformer_per_op"] = median_ms(depformer, iters=iters)
            res["depformer_per_op_build"] = build_ms(lambda: lm.depformer_frame(h, text, sampling, key))
        finally:
            LM.depformer_weights = primitive
    return res


def lm_rows(table, lm, fmt, batches, ref_batches, iters):
    from personaplex_fast.sampling import SamplingConfig

    cfg = lm.cfg
    temporal_bytes = param_bytes(lm.transformer) + param_bytes(lm.text_linear)
    dep_bytes = (param_bytes(lm.depformer) + sum(param_bytes(m) for m in lm.depformer_in)
                 + sum(param_bytes(m) for m in lm.linears))
    kv_per_session = 2 * cfg.num_layers * cfg.num_heads * cfg.context * cfg.head_dim * 2
    sampling = SamplingConfig()
    for B in batches:
        res = {}
        for mode in ("fused", "reference"):
            if mode == "reference" and B not in ref_batches:
                continue
            with ops.use_mode(mode):
                res[mode] = lm_times(lm, B, sampling, iters if mode == "fused" else max(3, iters // 4))
            mx.clear_cache()
        ref = res.get("reference", {})
        # PyTorch runs bf16 weights only: its bf16 time sits in every format's row.
        table.add(f"temporal step {fmt}", B, res["fused"]["temporal"], ref.get("temporal"),
                  temporal_bytes + B * kv_per_session, "temporal bf16",
                  f"graph build {res['fused']['temporal_build']:.2f} ms")
        f = res["fused"]
        per_op = (f"; per-op loop: {f['depformer_per_op']:.2f} ms, build {f['depformer_per_op_build']:.2f} ms"
                  if "depformer_per_op" in f else "")
        per_op += f"; 4 frames in one eval: {f['depformer_x4']:.2f} ms each" if "depformer_x4" in f else ""
        table.add(f"depformer 8 codebooks {fmt}", B, f["depformer"], ref.get("depformer"),
                  dep_bytes, "depformer bf16", f"graph build {f['depformer_build']:.2f} ms{per_op}")
        table.add(f"LM step {fmt}", B, res["fused"]["lm_step"], ref.get("lm_step"),
                  temporal_bytes + dep_bytes + B * kv_per_session, "lm_step bf16")


def tick_time(lm, mimi, B, iters):
    from personaplex_fast.engine import Engine

    engine = Engine(lm, mimi, slots=B)
    engine.lm_state.offsets = mx.full((B,), CONTEXT_FRAME, dtype=mx.int32)
    pcm = (0.1 * np.random.default_rng(B).standard_normal((B, mimi.cfg.frame_size))).astype(np.float32)
    return median_ms(lambda: engine.tick(pcm), iters=iters)


def build_mimi():
    from personaplex_fast.models.mimi import Mimi

    if TINY:
        from personaplex_fast.mimi_checkpoint import tiny_mimi_config
        mimi = Mimi(tiny_mimi_config())
    else:
        mimi = Mimi()
    mx.eval(mimi.parameters())
    return mimi


def mimi_rows(table, mimi, batches, ref_batches, iters):
    mimi_bytes = param_bytes(mimi)
    for B in batches:
        rng = np.random.default_rng(B)
        pcm = mx.array((0.1 * rng.standard_normal((B, mimi.cfg.frame_size))).astype(np.float32))
        codes = mx.array(rng.integers(0, mimi.cfg.quantizer.bins, (B, mimi.cfg.num_codebooks)).astype(np.int32))
        res = {}
        for mode in ("fused", "reference", "kernels"):
            if mode == "reference" and B not in ref_batches:
                continue
            # "kernels": fused, with every conv through our kernels (no GEMM hand-off).
            gemm = ops.CONV_KERNEL_MAX_MACS
            ops.CONV_KERNEL_MAX_MACS = None if mode == "kernels" else gemm
            with ops.use_mode("fused" if mode == "kernels" else mode):
                enc, dec = mimi.new_encoder_state(B), mimi.new_decoder_state(B)
                n = iters if mode == "fused" else max(3, iters // 4)

                def encode():
                    c = mimi.encode_step(pcm, enc)
                    mx.eval(c, *enc.arrays())

                def decode():
                    a = mimi.decode_step(codes, dec)
                    mx.eval(a, *dec.arrays())

                res[mode] = {"enc": median_ms(encode, iters=n), "dec": median_ms(decode, iters=n)}
            ops.CONV_KERNEL_MAX_MACS = gemm
        ref, k = res.get("reference", {}), res["kernels"]
        note = f"convs above {ops.CONV_KERNEL_MAX_MACS / 1e6:.0f}M MACs as MLX conv; all our kernels: " if \
            ops.CONV_KERNEL_MAX_MACS else "all our kernels: "
        table.add("Mimi encode, one 80 ms frame", B, res["fused"]["enc"], ref.get("enc"), mimi_bytes / 2,
                  "mimi_encode", note + f"{k['enc']:.2f} ms")
        table.add("Mimi decode, one 80 ms frame", B, res["fused"]["dec"], ref.get("dec"), mimi_bytes / 2,
                  "mimi_decode", note + f"{k['dec']:.2f} ms")


def frame_rows(table, lm, fmt, mimi, batches, ref_batches, iters):
    lm_bytes, mimi_bytes = param_bytes(lm), param_bytes(mimi)
    kv_per_session = 2 * lm.cfg.num_layers * lm.cfg.num_heads * lm.cfg.context * lm.cfg.head_dim * 2
    for B in batches:
        res = {}
        for mode in ("fused", "reference"):
            # The reference's KV copies would not fit beside 32 sessions' caches.
            if mode == "reference" and (B not in ref_batches or B > 8):
                continue
            with ops.use_mode(mode):
                res[mode] = tick_time(lm, mimi, B, iters if mode == "fused" else max(3, iters // 4))
            mx.clear_cache()
        table.add(f"whole frame {fmt} (Engine.tick: encode + LM + decode, 1 sync)", B, res["fused"],
                  res.get("reference"), lm_bytes + mimi_bytes + B * kv_per_session, "frame bf16")


def versions():
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip()
    except OSError:
        smi = "nvidia-smi not found"
    try:
        nvcc = subprocess.run(["nvcc", "--version"], capture_output=True, text=True,
                              timeout=30).stdout.strip().splitlines()[-1]
    except OSError:
        nvcc = "nvcc not found"
    return f"{smi}; MLX {mx.__version__}; {nvcc}; {datetime.date.today().isoformat()}"


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--ref-batches", default="1,8,32", help="batches that also time the pure-MLX reference")
    parser.add_argument("--formats", default="0,8,4", help="weight bits: 0 (bf16), 8, 4")
    parser.add_argument("--sections", default="primitives,lm,frame")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--torch-json", help="PyTorch results from bench/torch_bench.py")
    parser.add_argument("--markdown", help="append the tables to this file")
    parser.add_argument("--tiny", action="store_true", help="smoke test at tiny sizes (runs on the CPU)")
    args = parser.parse_args()
    if args.tiny:
        global H, D, W, CONTEXT_FRAME, MATVEC_SHAPES, TINY
        H, D, W, CONTEXT_FRAME, TINY = 2, 64, 40, 300, True
        MATVEC_SHAPES = [(n, 256, 256 * k // 4096 if k > 4096 else 256, g, nm, r, t)
                         for n, _, k, g, nm, r, t in MATVEC_SHAPES]
    batches = [int(b) for b in args.batches.split(",")]
    ref_batches = [int(b) for b in args.ref_batches.split(",")]
    formats = [int(b) for b in args.formats.split(",")]
    sections = args.sections.split(",")
    torch_rows, torch_info = {}, "not run"
    if args.torch_json:
        with open(args.torch_json) as f:
            tj = json.load(f)
        torch_rows, torch_info = tj.get("rows", {}), tj.get("info", "?")

    bw = copy_bandwidth(16 if TINY else 2048)
    head = [f"Device: {versions()}", f"PyTorch: {torch_info}",
            f"Copy bandwidth (bf16 x*1 over 2 GiB, read + write): {bw / 1e12:.2f} TB/s", ""]
    print("\n".join(head), flush=True)
    tables = []
    if "primitives" in sections:
        t = Table("Primitives at the 7B shapes (bf16 activations), ms per call", bw, torch_rows)
        ring_rows(t, batches)
        matvec_rows(t, batches, formats)
        codec_rows(t, batches, args.iters)
        sample_rows(t, batches, args.iters)
        tables.append(t)
        show(t)
    if "kernels" in sections:
        t = Table("Primitives, GPU time per call (16 independent calls in one graph), ms", bw, torch_rows)
        in_graph_rows(t, batches)
        tables.append(t)
    if "lm" in sections or "frame" in sections:
        t_lm = Table(f"LM levels (LMConfig(): 7B temporal + depformer, sessions at frame {CONTEXT_FRAME}), ms",
                     bw, torch_rows)
        t_frame = Table("Mimi and the whole 80 ms frame, ms", bw, torch_rows)
        mimi = build_mimi() if "frame" in sections else None
        if mimi is not None:
            mimi_rows(t_frame, mimi, batches, ref_batches, args.iters)
        for bits in formats:  # one 7B in memory at a time
            fmt = {0: "bf16", 4: "q4", 8: "q8"}[bits]
            lm = build_lm(bits)
            if "lm" in sections:
                lm_rows(t_lm, lm, fmt, batches, ref_batches if bits == 0 else [], args.iters)
            if mimi is not None:
                frame_rows(t_frame, lm, fmt, mimi, batches, ref_batches if bits == 0 else [], args.iters)
            del lm
            mx.clear_cache()
        done = [t for t, on in ((t_lm, "lm" in sections), (t_frame, mimi is not None)) if on]
        tables += done
        for t in done:
            show(t)
    text = "\n".join(head + sum((tb.lines() + [""] for tb in tables), []))
    print(text)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write(text + "\n")


def show(table):
    """Print a finished table at once (a run cut short keeps what it measured)."""
    print("\n".join(table.lines()), flush=True)


if __name__ == "__main__":
    main()
