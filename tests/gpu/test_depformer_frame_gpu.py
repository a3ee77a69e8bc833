"""depformer_frame on CUDA, output and scratch poisoned first:
- exactly the per-op loop over the fused ops on the GPU (the same kernels in the
  same order; the embedding add is MLX's own there): codes and logits equal;
- close to the CPU primitive, teacher-forced with the GPU's codes (per element,
  relative to the largest logit of the row: float32 1e-5 + 1e-4, bfloat16
  2^-6 + 4e-2; summation orders differ between the CPU loops and the GPU's
  split sums), and sampled codes equal to the reference sampling of the GPU's
  own logits.
Shapes: the tiny model's, and the 7B depformer's (D 1024, 16 heads, hidden 2816,
2048 bins, 8 codebooks) with 2 layers per step instead of 6 (time, not coverage)."""

import mlx.core as mx
import numpy as np
import pytest

from personaplex_fast import ops, reference
from tests.test_decoder_layers import np32
from tests.test_depformer_frame import frame_and_per_op_loop, make_frame, run


pytestmark = pytest.mark.usefixtures("poison")


def close(a, b, dtype):
    a, b = np32(a), np32(b)
    rel, tol = (1e-5, 1e-4) if dtype == mx.float32 else (2.0**-6, 4e-2)
    scale = np.abs(b).max(axis=-1, keepdims=True)
    assert (np.abs(a - b) <= rel * scale + tol).all(), np.abs(a - b).max()


SHAPES = [  # B, Q, C_in, D, heads, hidden, V, L
    (1, 4, 128, 64, 4, 128, 64, 2),
    (3, 8, 4096, 1024, 16, 2816, 2048, 2),
    (8, 8, 4096, 1024, 16, 2816, 2048, 2),
]


@pytest.mark.parametrize("bits", [0, 4])
@pytest.mark.parametrize("dtype, B, Q, C_in, D, heads, hidden, V, L", [
    (dtype, *shape) for shape in SHAPES for dtype in (mx.float32, mx.bfloat16)
    if not (dtype == mx.float32 and shape[0] == 8)])  # float32 at B=8 adds only time
def test_depformer_frame_gpu(dtype, bits, B, Q, C_in, D, heads, hidden, V, L):
    rng = np.random.default_rng(B + D + bits)
    f = make_frame(rng, B=B, Q=Q, C_in=C_in, D=D, heads=heads, hidden=hidden, V=V, L=L, bits=bits,
                   dtype=dtype)
    noise = mx.random.gumbel((Q, B, V), key=mx.random.key(B))
    forced = mx.array(np.where(rng.random((Q, B)) < 0.2, rng.integers(0, V, (Q, B)), -1).astype(np.int32))
    pick = dict(temp=0.8, top_k=min(250, V - 1))
    with mx.stream(mx.gpu):
        codes, logits = run(ops.depformer_frame, f, forced, noise, **pick)
        mx.eval(codes, logits)
    assert np.isfinite(np32(logits)).all()
    np.testing.assert_array_equal(np.array(codes), np.array(reference.sample_topk(logits, noise, forced, **pick)))
    with mx.stream(mx.cpu):
        _, cpu_logits = run(ops.depformer_frame, f, codes, noise, **pick)
        mx.eval(cpu_logits)
    close(logits, cpu_logits, dtype)


@pytest.mark.parametrize("dtype,bits", [(mx.float32, 0), (mx.bfloat16, 0), (mx.bfloat16, 4)])
def test_model_frame_equals_per_op_loop_gpu(dtype, bits, monkeypatch):
    with mx.stream(mx.gpu):
        fused, loop = frame_and_per_op_loop(dtype, bits, monkeypatch, 5)
    np.testing.assert_array_equal(fused, loop)
