"""The tick program on the GPU (csrc/tick_cuda.cpp: the ops captured into one CUDA
graph, replayed per tick on MLX's stream), against the same program on the CPU and
against the op-by-op engine on the GPU, outputs poisoned first.

Greedy ticks are compared until the first frame whose text tokens differ (summation
order differs between the devices, so a near-tie may flip a token, after which the
conversations diverge); at least the first 8 frames must agree, with the audio of the
agreeing frames equal to 1e-3 of its scale (float32 models).

The 8-bit KV cache (kv_bits 8, kernels/ring_attention.cuh's Int8Rows): its attention op
alone against the CPU path (out as tests/gpu/test_ring_attention_gpu.py; codes equal but
where CUDA's float32 sin / cos / exp differ from the CPU's in the last bit and a value
crossed a rounding midpoint: one step, in at most 1% of the codes; scales to 1e-5), and
the whole program with it against the CPU program and the op-by-op engine.
"""

import mlx.core as mx
import numpy as np
import pytest

from personaplex_fast import _ext, reference, tick
from personaplex_fast.config import DepformerConfig, LMConfig
from personaplex_fast.engine import Engine
from personaplex_fast.loading import load_model
from personaplex_fast.sampling import SamplingConfig
from personaplex_fast.tiny import make_tiny
from tests.test_tick import check_time_range

GREEDY = SamplingConfig(greedy=True)


pytestmark = pytest.mark.usefixtures("poison")

# Every projection of this shape takes the tensor-core path (K a multiple of 256), which
# the tiny checkpoint's (K of 64 and 128) never does.
SMALL = LMConfig(dim=512, num_heads=4, num_layers=2, context=250, text_card=1000, card=64, hidden_scale=3.0,
                 depformer=DepformerConfig(dim=256, num_heads=4, num_layers=2, dim_feedforward=768))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("small"), cfg=SMALL)


def frames(n, B, seed):
    rng = np.random.default_rng(seed)
    t = np.arange(1920) / 24000
    return [(0.3 * np.sin(2 * np.pi * (150 + 30 * i) * t)[None] + 0.05 * rng.standard_normal((B, 1920)))
            .astype(np.float32) for i in range(n)]


def run(runner, pcms, seeds):
    control = np.zeros((runner.slots, tick.CONTROL_COLS), np.int32)
    control[:, 0], control[:, 1] = tick.RESET_ALL, seeds
    out = []
    for pcm in pcms:
        audio, tokens = runner(mx.array(pcm), mx.array(control))
        mx.eval(audio, tokens)
        control[:, 0] = 0
        out.append((np.array(audio), np.array(tokens)))
    return out


def agree(a, b, what):
    n = 0
    for (pa, ta), (pb, tb) in zip(a, b):
        if not (ta[:, 0] == tb[:, 0]).all():
            break
        scale = max(1.0, float(np.abs(pb).max()))
        np.testing.assert_allclose(pa, pb, rtol=0, atol=1e-3 * scale, err_msg=f"{what}: frame {n}")
        n += 1
    assert n >= 8, f"{what}: only {n} frames agree"
    return n


@pytest.mark.parametrize("B", [1, 3])
def test_gpu_program_equals_cpu_program(tiny, B):
    model = load_model(tiny)
    pcms = frames(16, B, seed=B)
    gpu = tick.TickRunner(model.lm, model.mimi, B, GREEDY, gpu=True)
    cpu = tick.TickRunner(model.lm, model.mimi, B, GREEDY, gpu=False)
    got, want = run(gpu, pcms, 3), run(cpu, pcms, 3)
    for audio, tokens in got:
        assert np.isfinite(audio).all() and (tokens >= -2).all()
    agree(got, want, f"GPU vs CPU program, B={B}")
    assert sum(int((t[:, 0] >= 0).sum()) for _, t in got) > 5


@pytest.mark.parametrize("kv_bits", [None, 8], ids=["bf16-cache", "8bit-cache"])
def test_engine_on_gpu_takes_the_program_and_matches_op_by_op(tiny, kv_bits):
    """The program against op by op on the GPU (with kv_bits=8 the per-op attention is
    the pure-MLX reference there), one session joining with a prompt."""
    model = load_model(tiny)
    prog = Engine(model.lm, model.mimi, slots=2, sampling=GREEDY, kv_bits=kv_bits)
    per_op = Engine(model.lm, model.mimi, slots=2, sampling=GREEDY, program=False, kv_bits=kv_bits)
    assert prog.program is not None and prog.program.gpu
    prompt = model.prompt(voice="NATF0", text="Hello there.", seed=1, sampling=GREEDY)
    for engine in (prog, per_op):
        engine.join()
        engine.join(prompt)
    a, b = [], []
    for pcm in frames(14, 2, seed=5):
        x, y = prog.tick(pcm), per_op.tick(pcm)
        a.append((x.pcm, x.text[:, None]))
        b.append((y.pcm, y.text[:, None]))
    agree(a, b, f"program vs op by op on the GPU, kv_bits={kv_bits}")


def test_gpu_sampling_is_per_session(tiny):
    model = load_model(tiny)
    sampling = SamplingConfig(temp_text=1.0, topk_text=50)
    pcm = frames(10, 1, seed=9)
    alone = run(tick.TickRunner(model.lm, model.mimi, 1, sampling, gpu=True), pcm, [21])
    shared = run(tick.TickRunner(model.lm, model.mimi, 3, sampling, gpu=True),
                 [np.repeat(p, 3, axis=0) for p in pcm], [4, 5, 21])
    np.testing.assert_array_equal(np.array([t[0] for _, t in alone]), np.array([t[2] for _, t in shared]))


def test_gpu_codec_program_equals_cpu(tiny):
    """Mimi alone (tick.CodecRunner): GPU against CPU, codes and audio."""
    mimi = load_model(tiny).mimi
    gpu, cpu = tick.CodecRunner(mimi, 2, gpu=True), tick.CodecRunner(mimi, 2, gpu=False)
    reset = np.full((2, 1), tick.RESET_CODEC, np.int32)
    a, b = [], []
    for pcm in frames(12, 2, seed=11):
        for runner, out in ((gpu, a), (cpu, b)):
            audio, sem = runner(mx.array(pcm), mx.array(reset))
            mx.eval(audio, sem)
            out.append((np.array(audio), np.array(sem)))
        reset[:] = 0
    agree(a, b, "codec program GPU vs CPU")


def test_gpu_program_bf16_and_q4_run(tiny):
    import mlx.nn as nn

    from personaplex_fast.checkpoint import quantizable

    for bits in (0, 4):
        model = load_model(tiny, dtype=mx.bfloat16)
        if bits:
            nn.quantize(model.lm, group_size=64, bits=bits, class_predicate=quantizable(64))
        out = run(tick.TickRunner(model.lm, model.mimi, 2, SamplingConfig(), gpu=True), frames(8, 2, seed=1), [1, 2])
        for audio, tokens in out:
            assert np.isfinite(audio).all()
            assert ((tokens[:, 1:] >= -2) & (tokens[:, 1:] < model.lm.cfg.card)).all()


# --- the 8-bit KV cache --------------------------------------------------------------


def attention_op(gpu, B, H, T, D, W, dtype, qkv, rings, pos, rope):
    """One attention op over an 8-bit ring as a program on the GPU or the CPU (q, k, v
    read from fused QKV rows [B, T, 3, H, D], as the LM's layers do; the rings updated in
    place): returns out [B, H, T, D] (NaN before the op) and the rings (codes, scales)."""
    p = _ext.TickProgram(gpu)
    es = dtype.size

    def region(a):
        a = mx.contiguous(a)
        mx.eval(a)
        h = p.buffer(a.nbytes, a.dtype)
        p.init(h, a)
        return h

    hq, hpos = region(qkv), region(pos)
    hk, hks, hv, hvs = (region(a) for ring in rings for a in ring)
    hout = region(mx.full((B, H, T, D), float("nan"), dtype))
    io = [p.buffer(16, mx.float32) for _ in range(2)] + [p.buffer(4, mx.int32) for _ in range(2)]
    p.set_io(pcm_in=io[0], control=io[2], pcm_out=io[1], tokens=io[3], B=1, F=4, C=1, G=1)
    p.attention(q=hq, k=p.view(hq, H * D * es, dtype), v=p.view(hq, 2 * H * D * es, dtype), k_cache=hk,
                v_cache=hv, pos=hpos, out=hout, B=B, H=H, T=T, D=D, W=W,
                new_strides=[T * 3 * H * D, D, 3 * H * D], rope_max_period=rope, k_scales=hks, v_scales=hvs)
    outs = _ext.tick(p, mx.zeros((1, 4)), mx.zeros((1, 1), mx.int32), stream=mx.gpu if gpu else mx.cpu)
    mx.eval(outs)

    def read(h, shape, dt):
        return mx.array(np.array(p.read(h, 0, int(np.prod(shape)) * dt.size))).view(dt).reshape(shape)

    ring = (B, H, W, D)
    return (read(hout, (B, H, T, D), dtype),
            [(read(c, ring, mx.int8), read(s, ring[:3], mx.float32)) for c, s in ((hk, hks), (hv, hvs))])


def assert_rings_close(got, want, what, k_rtol=1e-5):
    """k_rtol: the keys' scales come from rotated keys, whose RoPE angles (position x
    frequency) the GPU and the CPU round apart by ~3e-7 rad per position (the outputs'
    allowance below); the values' scales are exact to 1e-5."""
    for name, (gc, gs), (wc, ws) in zip(("k", "v"), got, want):
        np.testing.assert_allclose(np.array(gs), np.array(ws), rtol=k_rtol if name == "k" else 1e-5, atol=0,
                                   err_msg=f"{what}: {name} scales")
        diff = np.abs(np.array(gc).astype(np.int32) - np.array(wc).astype(np.int32))
        assert diff.max() <= 1 and diff.mean() <= 0.01, f"{what}: {name} codes differ at {int((diff > 0).sum())}"


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
@pytest.mark.parametrize("B,H,T,D,W", [(3, 4, 1, 64, 40), (2, 2, 5, 128, 16), (3, 2, 1, 16, 9), (2, 3, 20, 32, 8),
                                       (8, 32, 1, 128, 3000)])  # the last: the 7B's decode step
def test_gpu_8bit_attention_equals_cpu(B, H, T, D, W, dtype):
    rng = np.random.default_rng(hash((B, H, T, D, W, str(dtype))) % 2**32)
    qkv = mx.array(rng.standard_normal((B, T, 3, H, D)).astype(np.float32)).astype(dtype)
    rings = [reference.quantize_rows(mx.random.normal((B, H, W, D), key=mx.random.key(i)).astype(dtype))
             for i in range(2)]
    pos = mx.array(rng.choice([0, 1, W - 1, W, 2 * W + 3, 7 * W + 5, 9000], size=B, replace=B > 7).astype(np.int32))
    got_out, got_rings = attention_op(True, B, H, T, D, W, dtype, qkv, rings, pos, 10000.0)
    want_out, want_rings = attention_op(False, B, H, T, D, W, dtype, qkv, rings, pos, 10000.0)
    a, b = np.array(got_out.astype(mx.float32)), np.array(want_out.astype(mx.float32))
    assert np.isfinite(a).all(), "unwritten output"
    tol = {mx.float32: 5e-5, mx.bfloat16: 3e-2, mx.float16: 4e-3}[dtype] + 3e-7 * (int(np.array(pos).max()) + T)
    assert np.abs(a - b).max() <= tol, f"out: {np.abs(a - b).max():.3g} > {tol:.3g}"
    assert_rings_close(got_rings, want_rings, f"B={B} T={T} D={D} W={W}",
                       k_rtol=1e-5 + 3e-7 * (int(np.array(pos).max()) + T))


def test_gpu_program_with_8bit_cache_equals_cpu_program(tiny):
    model = load_model(tiny)
    pcms = frames(16, 3, seed=7)
    gpu = tick.TickRunner(model.lm, model.mimi, 3, GREEDY, gpu=True, kv_bits=8)
    cpu = tick.TickRunner(model.lm, model.mimi, 3, GREEDY, gpu=False, kv_bits=8)
    got, want = run(gpu, pcms, 3), run(cpu, pcms, 3)
    for audio, tokens in got:
        assert np.isfinite(audio).all() and (tokens >= -2).all()
    if agree(got, want, "8-bit cache: GPU vs CPU program") == len(pcms):  # the same conversation: the same rings
        (gk, gv), (ck, cv) = gpu.read_kv(), cpu.read_kv()
        for layer in range(len(gk)):
            assert_rings_close([gk[layer], gv[layer]], [ck[layer], cv[layer]], f"layer {layer} after 16 frames")


# --- programmatic dependent launch -----------------------------------------------------


@pytest.mark.parametrize("form", ["f32", "bf16", "q4", "bf16-8bit-cache", "q4-small", "q4-small-late",
                                  "bf16-small"])
def test_gpu_program_is_the_same_with_and_without_programmatic_launch(request, monkeypatch, form):
    """The capture chains our kernels by programmatic dependent launch (csrc/tick_cuda.cpp,
    kernels/portable.h's pp_grid_dependency) unless PERSONAPLEX_PDL=0. Every kernel is
    deterministic, so the two graphs' ticks must agree to the bit: a kernel reading its
    predecessor's output before that one ended would not (here: the tensor-core matvec's
    three launches over one scratch (q4), cuBLAS GEMMs between our kernels (4 rows in
    bf16), the 8-bit rings written by one launch and read by the next; the tensor-core matvec
    loading its first weights before its wait (the default; -late: after it,
    PERSONAPLEX_MATVEC_TC_EARLY=0); -small: a checkpoint whose projections all take the
    tensor-core path)."""
    import mlx.nn as nn

    from personaplex_fast.checkpoint import quantizable

    dtype = mx.float32 if form == "f32" else mx.bfloat16
    model = load_model(request.getfixturevalue("small" if "-small" in form else "tiny"), dtype=dtype)
    if form.startswith("q4"):
        nn.quantize(model.lm, group_size=64, bits=4, class_predicate=quantizable(64))
    monkeypatch.setenv("PERSONAPLEX_MATVEC_TC_EARLY", "0" if form.endswith("late") else "1")
    B, kv_bits = 4, 8 if form.endswith("8bit-cache") else None
    pcms = frames(12, B, seed=5)
    outs = []
    for pdl in ("0", "1"):
        monkeypatch.setenv("PERSONAPLEX_PDL", pdl)  # read when the runner's graph is captured (its first tick)
        runner = tick.TickRunner(model.lm, model.mimi, B, SamplingConfig(), gpu=True, kv_bits=kv_bits)
        outs.append(run(runner, pcms, [4, 5, 6, 7]))
    for n, ((pa, ta), (pb, tb)) in enumerate(zip(*outs)):
        np.testing.assert_array_equal(ta, tb, err_msg=f"{form}: tokens of frame {n}")
        np.testing.assert_array_equal(pa, pb, err_msg=f"{form}: audio of frame {n}")
    assert np.isfinite(outs[1][-1][0]).all()


# --- a part of the tick timed alone ------------------------------------------------------


@pytest.mark.parametrize("form", ["bf16", "q4-small"])
def test_gpu_time_range_runs_those_ops_alone(request, form):
    """tests/test_tick.py's check_time_range on CUDA, where time_range captures ops [first,
    end) into a graph of their own (the others walked for their workspaces, launching
    nothing): bit for bit against ticks, as every kernel is deterministic (the PDL test
    above); and the temporal transformer's ops alone take less time than the whole tick's."""
    import mlx.nn as nn

    from personaplex_fast.checkpoint import quantizable

    model = load_model(request.getfixturevalue("small" if form.endswith("small") else "tiny"), dtype=mx.bfloat16)
    if form.startswith("q4"):
        nn.quantize(model.lm, group_size=64, bits=4, class_predicate=quantizable(64))
    ranged = check_time_range(model, B=3, gpu=True)
    (first, end), = [(f, e) for name, f, e in ranged.sections if name == "temporal"]
    shift = ranged.program.op_offset()
    part = ranged.program.time_range(first + shift, end + shift, 5)
    whole = ranged.program.time_range(0, ranged.program.ops, 5)
    assert 0 < np.median(part) < np.median(whole)
    control = mx.zeros((3, tick.CONTROL_COLS), mx.int32)
    audio, tokens = ranged(mx.array(frames(1, 3, seed=9)[0]), control)  # the tick's own graph still runs
    mx.eval(audio, tokens)
    assert np.isfinite(np.array(audio)).all()
