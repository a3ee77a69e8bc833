"""The primitives' rows of bench/gpu_bench.py: ring_attention, matvec (per call and
in one graph), the codec primitives at Mimi's per-frame shapes and sample_topk."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

from gpu_common import bf16, median_ms, sizes
from personaplex_fast import _ext, ops, reference


def ring_rows(table, batches):
    for B in batches:
        rng = np.random.default_rng(B)
        H, D, W = sizes.H, sizes.D, sizes.W
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

# The depformer's (one of its 8 steps; 6 layers) and the text head, at the 7B's sizes.
DEPFORMER_SHAPES = [
    ("dep in 4096->1024", 4096, 1024, False, False, False, None),
    ("dep qkv 1024->3072 +norm", 1024, 3 * 1024, False, True, False, None),
    ("dep out 1024->1024 +res", 1024, 1024, False, False, True, None),
    ("dep ffn_in 1024->5632 +norm+gate", 1024, 2 * 2816, True, True, False, None),
    ("dep ffn_out 2816->1024 +res", 2816, 1024, False, False, True, None),
    ("dep head 1024->2048", 1024, 2048, False, False, False, None),
    ("text head 4096->32000", 4096, 32000, False, False, False, None),
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
        H, D, W = sizes.H, sizes.D, sizes.W
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
        if sizes.TINY:
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
    n_q, bins, Dq = (8, 2048, 256) if not sizes.TINY else (8, 64, 32)
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
        V = V // 16 if sizes.TINY else V
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


def use_tiny_shapes() -> None:
    """The matvec shapes scaled down for the CPU smoke test."""
    global MATVEC_SHAPES
    MATVEC_SHAPES = [(n, 256, 256 * k // 4096 if k > 4096 else 256, g, nm, r, t)
                     for n, _, k, g, nm, r, t in MATVEC_SHAPES]
