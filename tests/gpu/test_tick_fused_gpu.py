"""The tick program's fused runs (PERSONAPLEX_TICK_FUSE=1, kernels/tick_fused.cuh): runs of
the program's small kernels executed by one persistent kernel, phase after phase with a
grid-wide barrier between them, over the same bodies and grids as their own launches.
Every body is deterministic, so a fused tick must equal the unfused one to the bit, tick
after tick (a phase reading what the one before it wrote before every block had written it,
or a virtual block of 128 threads waiting on its neighbour's barrier, would not).

Two shapes: the tiny checkpoint (its projections too narrow for the tensor-core path: the
streaming matvec, the rings' finish, embeddings, sampling and the norm fuse; its heads of
32 and 16 do not) and a small one whose every projection takes the tensor-core path and
whose heads (128 temporal, 64 depformer) the fused attention covers.
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from personaplex_fast import tick
from personaplex_fast.checkpoint import quantizable
from personaplex_fast.config import DepformerConfig, LMConfig
from personaplex_fast.loading import load_model
from personaplex_fast.sampling import SamplingConfig
from personaplex_fast.tiny import make_tiny

pytestmark = pytest.mark.usefixtures("poison")

SMALL = LMConfig(dim=512, num_heads=4, num_layers=2, context=250, text_card=1000, card=64, hidden_scale=3.0,
                 depformer=DepformerConfig(dim=256, num_heads=4, num_layers=2, dim_feedforward=768))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("small"), cfg=SMALL)


def frames(n, B, seed):
    rng = np.random.default_rng(seed)
    return [(0.3 * rng.standard_normal((B, 1920))).astype(np.float32) for _ in range(n)]


def ticks(runner, pcms, seeds):
    control = np.zeros((runner.slots, tick.CONTROL_COLS), np.int32)
    control[:, 0], control[:, 1] = tick.RESET_ALL, seeds
    out = []
    for pcm in pcms:
        audio, tokens = runner(mx.array(pcm), mx.array(control))
        mx.eval(audio, tokens)
        control[:, 0] = 0
        out.append((np.array(audio), np.array(tokens)))
    return out


@pytest.mark.parametrize("shape", ["tiny", "small"])
@pytest.mark.parametrize("form", ["bf16", "q4", "q8", "bf16-8bit-cache"])
@pytest.mark.parametrize("B", [1, 5])
def test_fused_ticks_equal_unfused(request, monkeypatch, shape, form, B):
    model = load_model(request.getfixturevalue(shape), dtype=mx.bfloat16)
    if form in ("q4", "q8"):
        nn.quantize(model.lm, group_size=64, bits=int(form[1]), class_predicate=quantizable(64))
    kv_bits = 8 if form.endswith("8bit-cache") else None
    pcms = frames(10, B, seed=B)
    seeds = list(range(3, 3 + B))
    outs, runs = [], []
    for fuse in ("0", "1"):
        monkeypatch.setenv("PERSONAPLEX_TICK_FUSE", fuse)  # read when the graph is captured (the first tick)
        runner = tick.TickRunner(model.lm, model.mimi, B, SamplingConfig(), gpu=True, kv_bits=kv_bits)
        outs.append(ticks(runner, pcms, seeds))
        runs.append(list(runner.program.fused_runs))
    assert runs[0] == []
    assert runs[1] and min(runs[1]) >= 2, runs[1]
    if shape == "small":
        # the LM step's layers run fused: at least one run holds a whole decoder layer
        assert max(runs[1]) >= 8, runs[1]
    for n, ((pa, ta), (pb, tb)) in enumerate(zip(*outs)):
        np.testing.assert_array_equal(tb, ta, err_msg=f"{shape} {form} B={B}: tokens of frame {n}")
        np.testing.assert_array_equal(pb, pa, err_msg=f"{shape} {form} B={B}: audio of frame {n}")
    assert np.isfinite(outs[1][-1][0]).all()
    assert (outs[1][-1][1][:, 1:] >= 0).any()  # tokens were generated, not only the initial ones
