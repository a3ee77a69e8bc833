"""The tick program on the GPU (csrc/tick_cuda.cpp: the ops captured into one CUDA
graph, replayed per tick on MLX's stream), against the same program on the CPU and
against the op-by-op engine on the GPU, outputs poisoned first.

Greedy ticks are compared until the first frame whose text tokens differ (summation
order differs between the devices, so a near-tie may flip a token, after which the
conversations diverge); at least the first 8 frames must agree, with the audio of the
agreeing frames equal to 1e-3 of its scale (float32 models).
"""

import mlx.core as mx
import numpy as np
import pytest

from personaplex_fast import tick
from personaplex_fast.engine import Engine
from personaplex_fast.loading import load_model
from personaplex_fast.sampling import SamplingConfig
from personaplex_fast.tiny import make_tiny

GREEDY = SamplingConfig(greedy=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny"))


pytestmark = pytest.mark.usefixtures("poison")


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


def test_engine_on_gpu_takes_the_program_and_matches_op_by_op(tiny):
    model = load_model(tiny)
    prog = Engine(model.lm, model.mimi, slots=2, sampling=GREEDY)
    per_op = Engine(model.lm, model.mimi, slots=2, sampling=GREEDY, program=False)
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
    agree(a, b, "program vs op by op on the GPU")


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
