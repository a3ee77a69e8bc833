"""Micro-benchmarks of the codec primitives and one tiny Mimi frame, fused vs reference.

Small CPU shapes for CI (`pytest bench/`): SEANet-like convs at 64-128 channels, the
RVQ at Mimi's real size (8 codebooks x 2048 x 256), the tiny random Mimi checkpoint.
"""

import mlx.core as mx
import numpy as np
import pytest

from personaplex_fast import ops
from personaplex_fast.mimi_checkpoint import load_mimi, write_tiny_mimi

PATHS = ["fused", "reference"]


def rand(rng, *shape):
    return mx.array(rng.standard_normal(shape).astype(np.float32))


def run(benchmark, path, fn):
    with ops.use_mode(path):
        mx.eval(fn())
        benchmark(lambda: mx.eval(fn()))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("K,stride", [(3, 1), (8, 4)])
def test_conv1d_stream(benchmark, path, K, stride):
    rng = np.random.default_rng(0)
    B, T, C = 2, 480, 64
    x, w, b = rand(rng, B, T, C), 0.1 * rand(rng, 2 * C, K, C), rand(rng, 2 * C)
    prev = rand(rng, B, K - stride, C)
    run(benchmark, path, lambda: ops.conv1d_stream(x, prev, w, b, stride=stride, elu_input=True))


@pytest.mark.parametrize("path", PATHS)
def test_conv_transpose1d_stream(benchmark, path):
    rng = np.random.default_rng(1)
    B, T, C, K, stride = 2, 60, 128, 8, 4
    x, w, b = rand(rng, B, T, C), 0.1 * rand(rng, C // 2, K, C), rand(rng, C // 2)
    partial = rand(rng, B, K - stride, C // 2)
    run(benchmark, path,
        lambda: ops.conv_transpose1d_stream(x, partial, w, b, stride=stride, elu_input=True))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("op", ["rvq_encode", "rvq_decode"])
def test_rvq(benchmark, path, op):
    rng = np.random.default_rng(2)
    books, x = rand(rng, 8, 2048, 256), rand(rng, 2, 1, 256)
    codes = ops.rvq_encode(x, books)
    if op == "rvq_encode":
        run(benchmark, path, lambda: ops.rvq_encode(x, books))
    else:
        run(benchmark, path, lambda: ops.rvq_decode(codes, books))


@pytest.fixture(scope="module")
def tiny_mimi(tmp_path_factory):
    path = tmp_path_factory.mktemp("mimi") / "tiny_mimi.safetensors"
    write_tiny_mimi(path, seed=0)
    return load_mimi(path)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("direction", ["encode", "decode"])
def test_tiny_mimi_frame(benchmark, tiny_mimi, path, direction):
    B, frame = 2, tiny_mimi.cfg.frame_size
    pcm = mx.array(0.1 * np.random.default_rng(3).standard_normal((B, frame)).astype(np.float32))
    with ops.use_mode(path):
        if direction == "encode":
            state = tiny_mimi.new_encoder_state(B)
            step = lambda: tiny_mimi.encode_step(pcm, state)  # noqa: E731
        else:
            codes, state = tiny_mimi.encode(pcm)[:, :, 0], tiny_mimi.new_decoder_state(B)
            step = lambda: tiny_mimi.decode_step(codes, state)  # noqa: E731

        def frame_step():
            out = step()
            mx.eval(out, *state.arrays())

        frame_step()
        benchmark(frame_step)
