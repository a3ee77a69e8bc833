"""sample_topk: temperature, top-k and the Gumbel-max draw as one primitive.

Given the same noise, the fused tokens must equal the pure-MLX reference's exactly
(both compare the same float32 values), including where many logits tie at the
k-th value; and the draws must follow softmax(logits / temp) over the top k.
"""

import mlx.core as mx
import numpy as np
import pytest

from personaplex_fast import _ext, ops, reference
from personaplex_fast.sampling import sample

DTYPES = [mx.float32, mx.bfloat16, mx.float16]


def fused_and_reference(logits, noise, forced, **kw):
    with ops.use_mode("fused"):
        fused = ops.sample_topk(logits, noise, forced, **kw)
    return np.array(fused), np.array(reference.sample_topk(logits, noise, forced, **kw))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [1, 7, 64, 2048])
@pytest.mark.parametrize("top_k", [0, 1, 5, 250])
def test_equals_reference(dtype, V, top_k):
    rng = np.random.default_rng(V * 31 + top_k)
    logits = mx.array(3 * rng.standard_normal((5, V)).astype(np.float32)).astype(dtype)
    noise = mx.random.gumbel((5, V), key=mx.random.key(V + top_k))
    forced = mx.array([-1, 3 % V, -1, -1, 0], mx.int32)
    for temp in (0.7, 1.3):
        for f in (None, forced):
            fused, ref = fused_and_reference(logits, noise, f, temp=temp, top_k=top_k)
            np.testing.assert_array_equal(fused, ref)
    fused, ref = fused_and_reference(logits, noise, forced, temp=0.8, top_k=top_k, greedy=True)
    np.testing.assert_array_equal(fused, ref)
    np.testing.assert_array_equal(fused[[0, 2, 3]], np.argmax(np.array(logits.astype(mx.float32)), -1)[[0, 2, 3]])


def test_ties_at_the_kth_value_are_all_kept():
    # Small integers: many logits equal the k-th largest; every one of them is kept.
    rng = np.random.default_rng(1)
    logits = mx.array(rng.integers(0, 4, (64, 40)).astype(np.float32))
    noise = mx.random.gumbel((64, 40), key=mx.random.key(2))
    for k in (1, 3, 10, 39):
        fused, ref = fused_and_reference(logits, noise, None, temp=1.0, top_k=k)
        np.testing.assert_array_equal(fused, ref)
    # Without noise the pick is the first maximal scaled logit.
    fused, _ = fused_and_reference(logits, None, None, temp=1.0, top_k=3)
    np.testing.assert_array_equal(fused, np.argmax(np.array(logits), -1))


def test_large_vocabulary_leading_dims_and_zero_temperature():
    rng = np.random.default_rng(3)
    logits = mx.array(rng.standard_normal((2, 3, 32000)).astype(np.float32)).astype(mx.bfloat16)
    noise = mx.random.gumbel(logits.shape, key=mx.random.key(4))
    fused, ref = fused_and_reference(logits, noise, None, temp=0.7, top_k=25)
    assert fused.shape == (2, 3)
    np.testing.assert_array_equal(fused, ref)
    fused, _ = fused_and_reference(logits, noise, None, temp=0.0, top_k=25)  # temp 0: greedy
    np.testing.assert_array_equal(fused, np.argmax(np.array(logits.astype(mx.float32)), -1))


def test_draws_follow_the_top_k_softmax():
    logits = mx.array([2.0, 1.0, 0.5, 0.0, -1.0, 3.0], mx.float32)
    n, temp, k = 40000, 0.8, 3
    tokens = np.array(sample(mx.broadcast_to(logits, (n, 6)), temp, k, False, mx.random.key(5)))
    freq = np.bincount(tokens, minlength=6) / n
    s = np.array(logits) / temp
    keep = np.argsort(-s)[:k]
    p = np.zeros(6)
    p[keep] = np.exp(s[keep] - s[keep].max())
    p /= p.sum()
    np.testing.assert_allclose(freq, p, atol=0.01)  # ~4.6 sigma of a binomial at n = 40000
    assert set(np.unique(tokens)) <= set(keep.tolist())


def test_check_mode_records_no_difference():
    logits = mx.random.normal((4, 100))
    noise = mx.random.gumbel((4, 100), key=mx.random.key(0))
    ops.reset_check_report()
    with ops.use_mode("check"):
        mx.eval(ops.sample_topk(logits, noise, None, temp=0.9, top_k=10))
    assert ops.check_report()["sample_topk"] == 0.0


def test_bad_operands_raise():
    logits = mx.zeros((3, 10))
    with pytest.raises(ValueError, match="noise must have the logits' shape"):
        _ext.sample_topk(logits, mx.zeros((3, 9)), None, 1.0, 5, False)
    with pytest.raises(ValueError, match="forced must be"):
        _ext.sample_topk(logits, None, mx.zeros((2,), mx.int32), 1.0, 5, False)
    with pytest.raises(ValueError, match="logits must be"):
        _ext.sample_topk(mx.zeros((10,)), None, None, 1.0, 5, False)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        _ext.sample_topk(mx.zeros((3, 10), mx.int32), None, None, 1.0, 5, False)


def test_nan_logits_are_ignored():
    """NaN logits never win and never count towards the top k (the reference is
    undefined there: checked against numpy)."""
    rng = np.random.default_rng(7)
    R, V, k, temp = 6, 50, 4, 0.9
    base = rng.standard_normal((R, V)).astype(np.float32)
    base[:, ::3] = np.nan
    base[0, :] = np.nan
    base[0, 7] = 1.0  # fewer numbers than k: all of them are kept
    noise = np.array(mx.random.gumbel((R, V), key=mx.random.key(8)))
    with ops.use_mode("fused"):
        got = np.array(ops.sample_topk(mx.array(base), mx.array(noise), None, temp=temp, top_k=k))
    for r in range(R):
        s = base[r] / np.float32(temp)
        finite = s[~np.isnan(s)]
        kth = np.sort(finite)[::-1][k - 1] if finite.size >= k else -np.inf
        score = np.where(~np.isnan(s) & (s >= kth), s + noise[r], -np.inf)
        assert got[r] == np.argmax(score), r
