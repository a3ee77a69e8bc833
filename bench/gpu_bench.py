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
import json
import statistics
import time

import mlx.core as mx
import numpy as np

import gpu_primitives
from gpu_common import (Table, build_lm, build_mimi, copy_bandwidth, median_ms, param_bytes, show, sizes,
                        use_tiny_sizes, versions)
from personaplex_fast import ops


# -- model levels -----------------------------------------------------------------


def lm_times(lm, B, sampling, iters):
    """temporal alone, depformer alone and the whole lm.step, for B sessions at a full window."""
    cfg = lm.cfg
    rng = np.random.default_rng(B)
    user = mx.array(rng.integers(0, cfg.card, (B, cfg.user_q)).astype(np.int32))
    state = lm.new_state(B)
    state.offsets = mx.full((B,), sizes.CONTEXT_FRAME, dtype=mx.int32)
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

    def step_build_ms(n=5):
        """Host time to build one whole LM step's graph, then the step is evaluated."""
        times = []
        for _ in range(n):
            t = time.perf_counter()
            out = lm.step(state, user, sampling)
            times.append(time.perf_counter() - t)
            mx.eval(out.text, out.audio, state.offsets, state.tokens, state.forced, state.key,
                    *state.kv.arrays())
        return 1e3 * statistics.median(times)

    res = {"temporal": median_ms(temporal, iters=iters), "depformer": median_ms(depformer, iters=iters),
           "lm_step": median_ms(step, iters=iters), "lm_step_build": step_build_ms(),
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
                  temporal_bytes + dep_bytes + B * kv_per_session, "lm_step bf16",
                  f"graph build {f['lm_step_build']:.2f} ms")


def tick_time(lm, mimi, B, iters):
    from personaplex_fast.engine import Engine

    engine = Engine(lm, mimi, slots=B)
    engine.seek(sizes.CONTEXT_FRAME)
    pcm = (0.1 * np.random.default_rng(B).standard_normal((B, mimi.cfg.frame_size))).astype(np.float32)
    return median_ms(lambda: engine.tick(pcm), iters=iters)


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
        use_tiny_sizes()
        gpu_primitives.use_tiny_shapes()
    batches = [int(b) for b in args.batches.split(",")]
    ref_batches = [int(b) for b in args.ref_batches.split(",")]
    formats = [int(b) for b in args.formats.split(",")]
    sections = args.sections.split(",")
    torch_rows, torch_info = {}, "not run"
    if args.torch_json:
        with open(args.torch_json) as f:
            tj = json.load(f)
        torch_rows, torch_info = tj.get("rows", {}), tj.get("info", "?")

    bw = copy_bandwidth(16 if sizes.TINY else 2048)
    head = [f"Device: {versions()}", f"PyTorch: {torch_info}",
            f"Copy bandwidth (bf16 x*1 over 2 GiB, read + write): {bw / 1e12:.2f} TB/s", ""]
    print("\n".join(head), flush=True)
    tables = []
    if "primitives" in sections:
        t = Table("Primitives at the 7B shapes (bf16 activations), ms per call", bw, torch_rows)
        gpu_primitives.ring_rows(t, batches)
        gpu_primitives.matvec_rows(t, batches, formats)
        gpu_primitives.codec_rows(t, batches, args.iters)
        gpu_primitives.sample_rows(t, batches, args.iters)
        tables.append(t)
        show(t)
    if "kernels" in sections:
        t = Table("Primitives, GPU time per call (16 independent calls in one graph), ms", bw, torch_rows)
        gpu_primitives.in_graph_rows(t, batches)
        tables.append(t)
    if "lm" in sections or "frame" in sections:
        frame = sizes.CONTEXT_FRAME
        t_lm = Table(f"LM levels (LMConfig(): 7B temporal + depformer, sessions at frame {frame}), ms",
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


if __name__ == "__main__":
    main()
