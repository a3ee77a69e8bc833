"""sample_topk on CUDA: the same tokens as the CPU path and the pure-MLX reference,
exactly (the same float32 comparisons), output poisoned first. Shapes: the
depformer's rows (V 2048, top 250) and the text head's (V 32000, top 25), up to
32 sessions; ties at the k-th value; greedy; forced tokens."""

import mlx.core as mx
import numpy as np
import pytest

from personaplex_fast import ops, reference


pytestmark = pytest.mark.usefixtures("poison")


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
@pytest.mark.parametrize("R, V, top_k", [(1, 2048, 250), (32, 2048, 250), (8, 32000, 25), (5, 7, 3),
                                         (3, 300, 0), (3, 300, 299), (2, 1, 1)])
def test_sample_topk_gpu(dtype, R, V, top_k):
    rng = np.random.default_rng(R * V + top_k)
    logits = mx.array(3 * rng.standard_normal((R, V)).astype(np.float32)).astype(dtype)
    noise = mx.random.gumbel((R, V), key=mx.random.key(R + V))
    forced = mx.array(np.where(rng.random(R) < 0.3, rng.integers(0, V, R), -1).astype(np.int32))
    for kw in (dict(temp=0.8), dict(temp=1.3), dict(temp=0.8, greedy=True)):
        for f in (None, forced):
            with mx.stream(mx.gpu):
                gpu = ops.sample_topk(logits, noise, f, top_k=top_k, **kw)
            with mx.stream(mx.cpu):
                cpu = ops.sample_topk(logits, noise, f, top_k=top_k, **kw)
                ref = reference.sample_topk(logits, noise, f, top_k=top_k, **kw)
            np.testing.assert_array_equal(np.array(gpu), np.array(cpu))
            np.testing.assert_array_equal(np.array(gpu), np.array(ref))


def test_ties_gpu():
    rng = np.random.default_rng(0)
    logits = mx.array(rng.integers(0, 4, (64, 2048)).astype(np.float32)).astype(mx.bfloat16)
    noise = mx.random.gumbel((64, 2048), key=mx.random.key(1))
    for k in (1, 10, 250, 2047):
        with mx.stream(mx.gpu):
            gpu = ops.sample_topk(logits, noise, None, temp=1.0, top_k=k)
        with mx.stream(mx.cpu):
            cpu = ops.sample_topk(logits, noise, None, temp=1.0, top_k=k)
        np.testing.assert_array_equal(np.array(gpu), np.array(cpu))
