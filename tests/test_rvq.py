"""rvq_encode / rvq_decode: the fused residual VQ against its pure-MLX reference.

Codes must agree exactly: distances are float32 |r|^2 - 2 r.e + |e|^2 in both, and
random data leaves no near-ties within the summation-order error (~1e-5 relative).
Exact ties (integer data, duplicated entries) go to the lowest index in both.
Decoding sums the entries in codebook order in float32 in both: bit-exact.
"""

import mlx.core as mx
import numpy as np
import pytest
from test_conv1d_stream import poison_allocator, rand, rng_for

from personaplex_fast import ops, reference


def residual_books(rng, n_q, bins, D):
    """Codebooks at shrinking scales, as trained residual codebooks are."""
    return mx.array(np.stack([0.6**q * rng.standard_normal((bins, D)) for q in range(n_q)])
                    .astype(np.float32))


# (leading shape of x, n_q, bins, D): one frame, B sessions x T frames, Mimi's
# semantic (1 book) and acoustic (7 books) split at reduced bins, D past the 8-lane dot.
SHAPES = [((1, 1), 1, 16, 8), ((3, 4), 7, 64, 32), ((2, 5), 8, 128, 20), ((6,), 4, 33, 3),
          ((2, 1, 3), 3, 256, 64)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_encode_and_decode_match_reference(shape, dtype):
    lead, n_q, bins, D = shape
    rng = rng_for(shape, str(dtype))
    books = residual_books(rng, n_q, bins, D)
    x = rand(rng, (*lead, D), dtype)
    poison_allocator((*lead, n_q), (*lead, D))
    codes = ops.rvq_encode(x, books)
    assert codes.dtype == mx.int32 and codes.shape == (*lead, n_q)
    np.testing.assert_array_equal(np.array(codes), np.array(reference.rvq_encode(x, books)))
    out = ops.rvq_decode(codes, books)
    assert out.dtype == mx.float32 and out.shape == (*lead, D)
    np.testing.assert_array_equal(np.array(out), np.array(reference.rvq_decode(codes, books)))


def test_residual_shrinks_with_each_codebook():
    """Quantising with more codebooks of the same set reconstructs better."""
    rng = np.random.default_rng(1)
    books, x = residual_books(rng, 6, 256, 16), rand(rng, (40, 16))
    errors = [float(mx.square(x - ops.rvq_decode(ops.rvq_encode(x, books[:n]), books[:n])).mean())
              for n in range(1, 7)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors


def test_ties_go_to_the_lowest_index():
    """Integer data make every distance exact, so duplicated entries tie exactly."""
    rng = np.random.default_rng(2)
    n_q, bins, D = 3, 12, 5
    books = rng.integers(-3, 4, size=(n_q, bins, D)).astype(np.float32)
    books[:, 7] = books[:, 2]  # 7 duplicates 2: never chosen
    books[:, 11] = books[:, 9]
    x = mx.array(rng.integers(-4, 5, size=(4, 50, D)).astype(np.float32))
    codes = np.array(ops.rvq_encode(x, mx.array(books)))
    np.testing.assert_array_equal(codes, np.array(reference.rvq_encode(x, mx.array(books))))
    assert not np.isin(codes, [7, 11]).any()
    assert np.isin(codes, [2, 9]).any()


def test_codes_outside_the_codebook_are_clamped_in_both_paths():
    """A code past the codebook (or negative) reads the nearest entry in the fused
    decode and in its reference alike, never memory past the codebook."""
    rng = np.random.default_rng(3)
    books = residual_books(rng, 3, 16, 8)
    wild = np.array([[16, 5000, -1], [2**31 - 1, -(2**31), 7]], np.int32)
    want = np.array(reference.rvq_decode(mx.array(np.clip(wild, 0, 15)), books))
    np.testing.assert_array_equal(np.array(reference.rvq_decode(mx.array(wild), books)), want)
    np.testing.assert_array_equal(np.array(ops.rvq_decode(mx.array(wild), books)), want)


def test_bad_shapes_are_rejected_with_a_message():
    books = mx.zeros((4, 16, 8))
    with pytest.raises(ValueError, match="must end in the codebook dim 8"):
        ops.rvq_encode(mx.zeros((2, 6)), books)
    with pytest.raises(ValueError, match="must end in n_q = 4"):
        ops.rvq_decode(mx.zeros((2, 3), mx.int32), books)
    with pytest.raises(ValueError, match=r"codebooks must be \[n_q, bins, D\]"):
        ops.rvq_encode(mx.zeros((2, 8)), mx.zeros((16, 8)))
