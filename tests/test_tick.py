"""The tick program (csrc/tick.h, python/personaplex_fast/tick/) on the CPU against
the per-op engine it replaces.

Greedy picks make the two comparable token for token: the program runs the same
kernels in the same order, so text tokens and the model's codes must be equal
and the audio equal to float32 rounding (the codec runs in float32 in both).
Sampled picks use the program's own noise, so they are tested for what they
promise instead: reproducible per seed, independent of the batch a session
shares, and distributed as softmax(logits / temp) over the top k.
"""

import mlx.core as mx
import numpy as np
import pytest

from personaplex_fast import _ext, ops, tick
from personaplex_fast.engine import Engine
from personaplex_fast.loading import load_model
from personaplex_fast.sampling import SamplingConfig

GREEDY = SamplingConfig(greedy=True)
AUDIO_TOL = 2e-5  # program against op by op, per unit of the audio's scale (float32 rounding)


@pytest.fixture(scope="module", params=[mx.float32, mx.bfloat16], ids=["f32", "bf16"])
def model(tiny, request):
    return load_model(tiny, dtype=request.param)


def frames(n, B, seed):
    rng = np.random.default_rng(seed)
    t = np.arange(1920) / 24000
    out = []
    for i in range(n):
        tone = 0.3 * np.sin(2 * np.pi * (180 + 40 * i) * t)[None] * rng.uniform(0.2, 1.0, (B, 1))
        out.append((tone + 0.05 * rng.standard_normal((B, 1920))).astype(np.float32))
    return out


def test_engine_takes_the_program_where_it_applies(model):
    assert Engine(model.lm, model.mimi, slots=2).program is not None
    assert Engine(model.lm, model.mimi, slots=2, program=False).program is None
    for mode in ("reference", "check"):
        with ops.use_mode(mode):
            assert Engine(model.lm, model.mimi, slots=2).program is None


def converse_alike(prog, per_op, prompt):
    """Drives two engines through one greedy conversation of three sessions (one joins
    late, one leaves and a fresh one takes its slot (a reset), one joins with `prompt`)
    and asserts the same text and the same audio, tick by tick."""
    events = {0: [("join", None), ("join", prompt)], 5: [("join", None)], 9: [("leave", 0)],
              10: [("join", None)]}
    texts = 0
    for i, pcm in enumerate(frames(18, 3, seed=2)):
        for kind, arg in events.get(i, []):
            if kind == "join":
                assert prog.join(arg) == per_op.join(arg)
            else:
                prog.leave(arg)
                per_op.leave(arg)
        a, b = prog.tick(pcm), per_op.tick(pcm)
        active = np.array(prog.active)
        np.testing.assert_array_equal(a.text[active], b.text[active], err_msg=f"tick {i}")
        np.testing.assert_allclose(a.pcm[active], b.pcm[active], rtol=0,
                                   atol=AUDIO_TOL * max(1.0, np.abs(b.pcm).max()), err_msg=f"tick {i}")
        texts += int((a.text[active] >= 0).sum())
    assert texts > 20  # the sessions did speak


def test_program_equals_per_op_engine(model):
    lm, mimi = model.lm, model.mimi
    prompt = model.prompt(voice="NATF0", text="You like to talk.", seed=1, sampling=GREEDY)
    prog = Engine(lm, mimi, slots=3, sampling=GREEDY)
    per_op = Engine(lm, mimi, slots=3, sampling=GREEDY, program=False)
    assert prog.program is not None
    converse_alike(prog, per_op, prompt)


def test_codec_reset_keeps_the_lm_rows(model):
    """A prompted join resets the codec and the seed but keeps the LM rows it loaded."""
    runner = tick.TickRunner(model.lm, model.mimi, 2, GREEDY, gpu=False)
    control = np.zeros((2, tick.CONTROL_COLS), np.int32)
    control[:, 0] = tick.RESET_ALL
    for pcm in frames(4, 2, seed=3):
        mx.eval(*runner(mx.array(pcm), mx.array(control)))
        control[:, 0] = 0
    before = runner.read_lm()
    assert (before["offsets"] == 4).all()
    control[1, 0] = tick.RESET_CODEC | tick.RESET_SEED
    mx.eval(*runner(mx.array(frames(1, 2, seed=4)[0]), mx.array(control)))
    after = runner.read_lm()
    np.testing.assert_array_equal(after["offsets"], [5, 5])
    control[1, 0] = tick.RESET_LM
    mx.eval(*runner(mx.array(frames(1, 2, seed=5)[0]), mx.array(control)))
    after = runner.read_lm()
    np.testing.assert_array_equal(after["offsets"], [6, 1])
    # The reset session's rings hold only what frame 0 wrote (the rest -2 / -1).
    R = model.lm.cfg.max_delay + 2
    assert (after["forced"][1] == -1).all()
    assert (after["tokens"][1][:, 2:R] == -2).all()


def check_time_range(model, B, gpu):
    """TickProgram.time_range (a part of the tick timed alone, bench/tick_bench.py --profile)
    runs ops [first, end) reps + 1 times (once to warm) and nothing else: all of them after
    two ticks leave the program as three more ticks of the same frame do, bit for bit; the
    frame's last op alone (TickRunner.sections' "lm output") moves the offsets and no ring.
    Returns that program's runner (tests/gpu/test_tick_gpu.py times a part of it)."""
    reps = 2
    pcm = mx.array(frames(1, B, seed=9)[0])
    runners = [tick.TickRunner(model.lm, model.mimi, B, GREEDY, gpu=gpu) for _ in range(2)]
    for runner in runners:
        control = np.zeros((B, tick.CONTROL_COLS), np.int32)
        control[:, 0] = tick.RESET_ALL
        for _ in range(2):
            mx.eval(*runner(pcm, mx.array(control)))
            control[:, 0] = 0  # the control the ops find in the arena from here on
    ranged, ticked = runners
    times = ranged.program.time_range(0, ranged.program.ops, reps)
    assert len(times) == reps and all(t > 0 for t in times)
    for _ in range(reps + 1):
        mx.eval(*ticked(pcm, mx.array(control)))
    for key, want in ticked.read_lm().items():
        np.testing.assert_array_equal(ranged.read_lm()[key], want, err_msg=key)
    assert (ranged.read_lm()["offsets"] == 2 + reps + 1).all()

    def rings(runner):
        return [np.array(r.astype(mx.float32)) for r in sum(runner.read_kv(), [])]

    for got, want in zip(rings(ranged), rings(ticked)):
        np.testing.assert_array_equal(got, want)
    (first, end), = [(f, e) for name, f, e in ranged.sections if name == "lm output"]  # the frame's end
    shift = ranged.program.op_offset()
    before, kv = ranged.read_lm(), rings(ranged)
    ranged.program.time_range(first + shift, end + shift, 3)
    np.testing.assert_array_equal(ranged.read_lm()["offsets"], before["offsets"] + 4)
    for got, want in zip(rings(ranged), kv):  # no layer ran
        np.testing.assert_array_equal(got, want)
    return ranged


def test_time_range_runs_those_ops_alone(model):
    """check_time_range on the CPU; a range that is not one is an error."""
    ranged = check_time_range(model, B=2, gpu=False)
    n = ranged.program.ops
    for first, end, r in ((3, 3, 1), (-1, 2, 1), (0, n + 1, 1), (0, 1, 0)):
        with pytest.raises(ValueError, match="time_range"):
            ranged.program.time_range(first, end, r)
    assert ranged.program.op_offset() == 1  # the resets' op comes first


def sampled_texts(model, B, seeds, slot_of, n=12):
    runner = tick.TickRunner(model.lm, model.mimi, B, SamplingConfig(temp_text=1.0, topk_text=50), gpu=False)
    control = np.zeros((B, tick.CONTROL_COLS), np.int32)
    control[:, 0] = tick.RESET_ALL
    control[:, 1] = seeds
    texts = []
    for pcm in frames(n, 1, seed=6):
        _, tokens = runner(mx.array(np.repeat(pcm, B, axis=0)), mx.array(control))
        control[:, 0] = 0
        texts.append(np.array(tokens)[slot_of, 0])
    return np.array(texts)


def test_sampling_is_per_session(model):
    """A session's draws depend on its seed and frames only: the same in slot 0 of one
    session as in slot 2 of three, different for another seed."""
    alone = sampled_texts(model, 1, [11], 0)
    shared = sampled_texts(model, 3, [5, 7, 11], 2)
    np.testing.assert_array_equal(alone, shared)
    other = sampled_texts(model, 1, [12], 0)
    assert (alone != other).any()


def test_sampling_follows_the_softmax():
    """Gumbel-max over the program's noise, frame after frame: the empirical frequencies
    of 4000 draws match softmax(logits / temp) over the top k within 4 sigma."""
    V, top_k, temp, n = 12, 6, 0.8, 4000
    logits = np.linspace(2.0, -1.0, V).astype(np.float32)
    p = _ext.TickProgram(False)
    lg = p.buffer(n * V * 4, mx.float32)
    p.init(lg, mx.array(np.tile(logits, (n, 1))))
    seeds = p.buffer(n * 4, mx.uint32)
    p.init(seeds, mx.array(np.full(n, 3, np.uint32)))
    offsets = p.buffer(n * 4, mx.int32)
    p.init(offsets, mx.array(np.arange(n, dtype=np.int32)))  # n frames of one session
    noise = p.buffer(n * V * 4, mx.float32)
    out = p.buffer(n * 4, mx.int32)
    p.gumbel(seeds=seeds, offsets=offsets, out=noise, B=n, V=V, streams=1, stream0=0)
    p.sample(logits=lg, out=out, rows=n, V=V, temp=temp, top_k=top_k, noise=noise)
    p.run_ops()
    tokens = np.array(p.read(out, 0, n * 4)).view(np.int32)
    want = np.exp(logits[:top_k] / temp)
    want /= want.sum()
    got = np.bincount(tokens, minlength=V) / n
    assert got[top_k:].sum() == 0
    sigma = np.sqrt(want * (1 - want) / n)
    assert (np.abs(got[:top_k] - want) < 4 * sigma).all(), (got, want)


def test_builder_mistakes_are_errors_not_overruns():
    p = _ext.TickProgram(False)
    x = p.buffer(4 * 64, mx.float32)
    w = p.buffer(4 * 64 * 8, mx.float32)
    small = p.buffer(4 * 3, mx.float32)
    with pytest.raises(ValueError, match="out holds 12 bytes, needs 32"):
        p.matvec(x=x, w=w, out=small, M=1, K=64, n_out=8)
    with pytest.raises(ValueError, match="share one dtype"):
        p.matvec(x=x, w=w, out=p.buffer(64, mx.bfloat16), M=1, K=64, n_out=8)
    with pytest.raises(ValueError, match="pcm must be"):
        runner_pcm = mx.zeros((1, 10))
        p.set_io(pcm_in=x, control=small, pcm_out=x, tokens=small, B=1, F=64, C=2, G=1)
        _ext.tick(p, runner_pcm, mx.zeros((1, 2), mx.int32))


def test_codec_program_equals_mimi_streaming(tiny):
    """Mimi alone as a program (tick.CodecRunner) against Mimi.encode_step / decode_step,
    sessions restarted by a reset halfway."""
    mimi = load_model(tiny).mimi
    runner = tick.CodecRunner(mimi, 2, gpu=False)
    enc, dec = mimi.new_encoder_state(2), mimi.new_decoder_state(2)
    reset = np.full((2, 1), tick.RESET_CODEC, np.int32)
    for i, pcm in enumerate(frames(14, 2, seed=11)):
        if i == 7:
            reset[1] = tick.RESET_CODEC
            enc.reset(1)
            dec.reset(1)
        audio, sem = runner(mx.array(pcm), mx.array(reset))
        reset[:] = 0
        codes = mimi.encode_step(mx.array(pcm), enc)
        want = mimi.decode_step(codes, dec)
        mx.eval(audio, sem, codes, want)
        np.testing.assert_array_equal(np.array(sem)[:, 0], np.array(codes)[:, 0], err_msg=f"frame {i}")
        np.testing.assert_allclose(np.array(audio), np.array(want), rtol=0,
                                   atol=1e-5 * max(1.0, float(np.abs(np.array(want)).max())), err_msg=f"frame {i}")


def test_gemm_forms_compute_the_same_tick(model):
    """The program as a GPU builds it (projections of 4+ rows as norm + GEMM + gate,
    large convs as GEMMs), run by the CPU path: the same conversation as matvec's
    program up to rounding (the GEMM rounds once where matvec rounds twice)."""
    B = 4  # GEMM_MIN_ROWS: every projection takes the GEMM form
    runners = [tick.TickRunner(model.lm, model.mimi, B, GREEDY, gpu=False, gemm_forms=f) for f in (False, True)]
    assert runners[1].program.ops > runners[0].program.ops
    control = np.zeros((B, tick.CONTROL_COLS), np.int32)
    control[:, 0] = tick.RESET_ALL
    agree = 0
    for pcm in frames(10, B, seed=8):
        (a, ta), (b, tb) = [(np.array(x), np.array(t)) for x, t in (r(mx.array(pcm), mx.array(control))
                                                                     for r in runners)]
        control[:, 0] = 0
        if not (ta == tb).all():  # a near-tie went the other way: the conversations part here
            break
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-3 * max(1.0, np.abs(b).max()))
        agree += 1
    assert agree >= 5


def test_dense_projections_by_tensor_cores_up_to_8_rows_or_when_asked(monkeypatch):
    """A dense projection of up to 8 rows of 16-bit x with whole 256-wide K steps is one
    matvec op (matvec's tensor-core path on CUDA) instead of the GEMM forms (norm, GEMM,
    gate); with PERSONAPLEX_DENSE_PROJ=tc up to 64 rows; otherwise the GEMM forms from
    GEMM_MIN_ROWS (4) rows."""
    import mlx.nn as nn

    from personaplex_fast.tick import builder

    class Norm:
        alpha, eps = mx.ones((256,), dtype=mx.bfloat16), 1e-5

    def ops_for(M, K=256, dtype=mx.bfloat16):
        b = builder.Builder(slots=M, gpu=False, gemm_forms=True)
        layer = nn.Linear(K, 2 * 128, bias=False)
        layer.set_dtype(dtype)
        x, out = b.buf((M, K), dtype), b.buf((M, 128), dtype)
        before = b.p.ops
        b.project(layer, x, out, M, K, 128, norm=Norm() if K == 256 else None, gate=True)
        return b.p.ops - before

    monkeypatch.delenv("PERSONAPLEX_DENSE_PROJ", raising=False)
    assert [ops_for(M) for M in (3, 4, 8, 9, 16)] == [1, 1, 1, 3, 3]  # 9+: norm, GEMM, gate
    assert ops_for(4, K=320) == 2 and ops_for(4, dtype=mx.float32) == 3  # K not whole steps; float32
    monkeypatch.setenv("PERSONAPLEX_DENSE_PROJ", "tc")
    assert [ops_for(M) for M in (8, 9, 64, 65)] == [1, 1, 1, 3]
    assert ops_for(16, K=320) == 2 and ops_for(16, dtype=mx.float32) == 3  # K not whole steps; float32


def test_every_cuda_kernel_waits_for_its_predecessor_first():
    """The GPU tick program launches a kernel that follows one of ours before that one has
    ended (programmatic dependent launch, csrc/tick_cuda.cpp); that is only sound if every
    kernel's first statement is pp_grid_dependency() (kernels/portable.h), which waits. The
    one exception: the projections (matvec_...) hand the wait to their body as a callable,
    which loads weights before it and nothing a kernel writes (the kernel emulator keeps x
    and inv_rms NaN until the wait: test_matvec_tc_early_weights, test_matvec_kernel)."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "kernels" / "cuda"
    seen = 0
    for f in sorted(root.glob("*.cu")):
        src = f.read_text().replace("\\\n", "\n")
        for m in re.finditer(r"__global__", src):
            head = src[m.start():]
            # the parameter list's ')' is the first ') {' after the kernel's name
            body = head[head.index(") {") + 3:].lstrip()
            name = re.search(r"\)\s+(\w+)", head).group(1)
            own = body.split("__global__")[0]
            handed = name.startswith("matvec_") and "[] { pp_grid_dependency(); }" in own
            waits = body.startswith("pp_grid_dependency();") or handed
            assert waits, f"{f.name}: kernel {name} does not begin by waiting"
            seen += 1
    assert seen >= 29
