"""Micro-benchmark of one LM frame (temporal + depformer + sampling) at tiny sizes.

Runs on the CPU in CI (`pytest bench/`); the real 7B shapes are timed on the
GPU by the device script, not here.
"""

import mlx.core as mx
import pytest

from personaplex_fast import ops
from personaplex_fast.checkpoint import load_lm
from personaplex_fast.sampling import SamplingConfig
from personaplex_fast.tiny import TINY, write_lm


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    return load_lm(write_lm(tmp_path_factory.mktemp("lm"), TINY))


@pytest.mark.parametrize("path", ["fused", "reference"])
@pytest.mark.parametrize("batch", [1, 8])
def test_lm_frame(benchmark, tiny_lm, batch, path):
    state = tiny_lm.new_state(batch)
    user = mx.zeros((batch, TINY.user_q), dtype=mx.int32)
    sampling = SamplingConfig()

    def frame():
        out = tiny_lm.step(state, user, sampling)
        mx.eval(out.text, out.audio)

    with ops.use_reference(path == "reference"):
        frame()
        benchmark(frame)
