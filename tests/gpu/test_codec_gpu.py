"""The codec primitives on CUDA: conv1d_stream, conv_transpose1d_stream, rvq_encode and
rvq_decode. Each fused GPU kernel against the same op on the CPU stream (the C++ CPU
path) and against reference.py run on the CPU stream; every buffer the kernels allocate
is poisoned first (_ext.set_gpu_poison: NaN for floats, -1 for int32), so an unwritten
output shows.

Tolerances, max abs error relative to max(1, max |expected|) (inputs ~N(0, 1), weights
~1/sqrt(fan in), so outputs are O(1)):
- convs, float32 1e-5: GPU and CPU both accumulate in float32 and round once, in another
  order (lane groups, FMA) over up to 16 x 1024 products (the CPU tests allow 2e-6 over
  at most 400). bfloat16 1.6e-2 / float16 2e-3, four units in the last place, as the CPU
  tests: a sum one rounding away, or an ELU whose exp differs by a float32 ulp between
  CUDA's expf and glibc's, rounds the other way.
- previous' (conv inputs, copied): exact without ELU, the same allowance with it.
- rvq_encode: codes equal the CPU path's exactly, since the kernel forms every distance
  in the CPU path's order with unfused products (kernels/rvq.cuh); equal to the
  reference's on random data, as in tests/test_rvq.py. rvq_decode: bit-exact.
- Where the expected values come from MLX ops on the GPU (the lazy-input test, the Mimi
  decoder), MLX's float32 matmul and conv on CUDA round like TF32: 2e-3, and 1e-2
  relative (L2) for the whole Mimi decoder.
"""


import mlx.core as mx
import numpy as np
import pytest

from personaplex_fast import _ext, ops, reference
from personaplex_fast.mimi_checkpoint import load_mimi, write_tiny_mimi
from tests.test_conv1d_stream import assert_close, rand, rng_for
from tests.test_mimi import _stream_decode

TOL = {mx.float32: 1e-5, mx.bfloat16: 1.6e-2, mx.float16: 2e-3}
DTYPES = [mx.float32, mx.bfloat16, mx.float16]


pytestmark = pytest.mark.usefixtures("poison")




def evaluated(xs):
    mx.eval(xs)
    return xs


def on_cpu(fn, *args, **kw):
    with mx.stream(mx.cpu):
        return evaluated(fn(*args, **kw))


# ------------------------------------------------------------------------ conv1d_stream

# (T, C_in, C_out, K, stride, dilation, groups, elu, bias, replicate) of one 80 ms Mimi
# frame at the real widths: the SEANet encoder (input conv, residual units, 4/5/6/8x
# downsamples, output conv), the 12.5 Hz downsample (replicate padding) and the decoder's
# input and output convs (its residual units have the encoder's shapes).
MIMI_CONVS = [
    (1920, 1, 64, 7, 1, 1, 1, False, True, False),
    (1920, 64, 32, 3, 1, 1, 1, True, True, False), (1920, 32, 64, 1, 1, 1, 1, True, True, False),
    (1920, 64, 128, 8, 4, 1, 1, True, True, False),
    (480, 128, 64, 3, 1, 1, 1, True, True, False), (480, 64, 128, 1, 1, 1, 1, True, True, False),
    (480, 128, 256, 10, 5, 1, 1, True, True, False),
    (96, 256, 128, 3, 1, 1, 1, True, True, False), (96, 128, 256, 1, 1, 1, 1, True, True, False),
    (96, 256, 512, 12, 6, 1, 1, True, True, False),
    (16, 512, 256, 3, 1, 1, 1, True, True, False), (16, 256, 512, 1, 1, 1, 1, True, True, False),
    (16, 512, 1024, 16, 8, 1, 1, True, True, False),
    (2, 1024, 512, 3, 1, 1, 1, True, True, False),
    (2, 512, 512, 4, 2, 1, 1, False, False, True),
    (2, 512, 1024, 7, 1, 1, 1, False, True, False),
    (1920, 64, 1, 3, 1, 1, 1, True, True, False),
]

# Small shapes past the corners: dilation, groups, odd widths, a chunk shorter than the
# context, 1x1 without context or ELU (the conv reads x directly).
SMALL_CONVS = [(4, 1, 8, 7, 1, 1, 1), (6, 16, 8, 3, 1, 2, 1), (8, 12, 24, 8, 4, 1, 1),
               (5, 19, 13, 1, 1, 1, 1), (4, 8, 12, 3, 2, 3, 4), (2, 40, 33, 7, 1, 1, 1),
               (10, 24, 48, 10, 5, 1, 1), (3, 300, 7, 1, 1, 1, 1), (2, 48, 48, 3, 1, 1, 48)]


def conv1d_inputs(rng, B, T, C_in, C_out, K, stride, dilation, groups, dtype, bias, replicate):
    context = (K - 1) * dilation + 1 - stride
    x, prev = rand(rng, (B, T, C_in), dtype), rand(rng, (B, context, C_in), dtype)
    w = rand(rng, (C_out, K, C_in // groups), dtype, 1 / np.sqrt(K * C_in / groups))
    b = rand(rng, (C_out,), dtype) if bias else None
    first = mx.array(np.arange(B) % 2 == 0) if replicate else None
    return x, prev, w, b, first


def check_conv1d(B, T, C_in, C_out, K, stride, dilation, groups, elu, bias, replicate, dtype):
    rng = rng_for("conv1d", B, T, C_in, C_out, K, stride, dilation, groups, elu, bias, replicate,
                  str(dtype))
    x, prev, w, b, first = conv1d_inputs(rng, B, T, C_in, C_out, K, stride, dilation, groups,
                                         dtype, bias, replicate)
    args = (x, prev, w, b, first, stride, dilation, groups, elu)
    got = evaluated(_ext.conv1d_stream(*args, stream=mx.gpu))
    cpu = evaluated(_ext.conv1d_stream(*args, stream=mx.cpu))
    ref = on_cpu(reference.conv1d_stream, x, prev, w, b, stride=stride, dilation=dilation,
                 elu_input=elu, groups=groups, first=first)
    state_tol = TOL[dtype] if elu else 0.0
    assert_close(got[0], cpu[0], TOL[dtype], "y vs CPU path")
    assert_close(got[1], cpu[1], state_tol, "previous' vs CPU path")
    assert_close(got[0], ref[0], TOL[dtype], "y vs reference")
    assert_close(got[1], ref[1], state_tol, "previous' vs reference")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B", [1, 3, 8])
@pytest.mark.parametrize("shape", MIMI_CONVS)
def test_conv1d_mimi_shapes(shape, B, dtype):
    check_conv1d(B, *shape, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SMALL_CONVS)
@pytest.mark.parametrize("elu,bias,replicate", [(False, True, False), (True, True, False),
                                                (True, False, True), (False, False, True)])
def test_conv1d_small_shapes(shape, dtype, elu, bias, replicate):
    check_conv1d(3, *shape, elu, bias, replicate, dtype)


# ---------------------------------------------------------------- conv_transpose1d_stream

# (T, C_in, C_out, K, stride, groups, elu, bias) of one Mimi frame: the depthwise 25 Hz
# upsample and the SEANet decoder's 8/6/5/4x upsamples.
MIMI_CONVTRS = [(1, 512, 512, 4, 2, 512, False, False), (2, 1024, 512, 16, 8, 1, True, True),
                (16, 512, 256, 12, 6, 1, True, True), (96, 256, 128, 10, 5, 1, True, True),
                (480, 128, 64, 8, 4, 1, True, True)]

SMALL_CONVTRS = [(1, 8, 4, 16, 8, 1), (3, 12, 6, 4, 2, 1), (2, 16, 16, 4, 2, 16), (4, 9, 5, 3, 3, 1),
                 (5, 12, 8, 10, 5, 4), (2, 40, 20, 12, 6, 1), (1, 10, 4, 10, 2, 1),
                 (3, 300, 6, 4, 2, 1)]


def check_convtr(B, T, C_in, C_out, K, stride, groups, elu, bias, dtype):
    rng = rng_for("convtr", B, T, C_in, C_out, K, stride, groups, elu, bias, str(dtype))
    x, partial = rand(rng, (B, T, C_in), dtype), rand(rng, (B, K - stride, C_out), dtype)
    w = rand(rng, (C_out, K, C_in // groups), dtype, 1 / np.sqrt(C_in / groups))
    b = rand(rng, (C_out,), dtype) if bias else None
    args = (x, partial, w, b, stride, groups, elu)
    got = evaluated(_ext.conv_transpose1d_stream(*args, stream=mx.gpu))
    cpu = evaluated(_ext.conv_transpose1d_stream(*args, stream=mx.cpu))
    ref = on_cpu(reference.conv_transpose1d_stream, x, partial, w, b, stride=stride,
                 groups=groups, elu_input=elu)
    for name, g, c, r in zip(("y", "partial'"), got, cpu, ref):
        assert_close(g, c, TOL[dtype], f"{name} vs CPU path")
        assert_close(g, r, TOL[dtype], f"{name} vs reference")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B", [1, 3, 8])
@pytest.mark.parametrize("shape", MIMI_CONVTRS)
def test_convtr_mimi_shapes(shape, B, dtype):
    check_convtr(B, *shape, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SMALL_CONVTRS)
@pytest.mark.parametrize("elu,bias", [(False, True), (True, True), (True, False)])
def test_convtr_small_shapes(shape, dtype, elu, bias):
    check_convtr(3, *shape, elu, bias, dtype)


# ------------------------------------------------------------------------------- rvq


def residual_books(rng, n_q, bins, D):
    return mx.array(np.stack([0.6**q * rng.standard_normal((bins, D)) for q in range(n_q)])
                    .astype(np.float32))


# (leading shape of x, n_q, bins, D): Mimi's frame per session (semantic 1 book, acoustic
# 7 of PersonaPlex's 8, or all 31 of the 32 stored), two frames per step, 20 and 32
# sessions (2 and 4 vectors a block), small corners; more chunks of bins than blocks
# (16400 bins), more codebooks than a block's warps (10), residuals past 48 KB of
# shared memory for 4 vectors a block (3100: the host takes 2) and for one (13000:
# opted in).
RVQ_SHAPES = [((B, 1), n_q, 2048, 256) for B in (1, 3, 8) for n_q in (1, 7, 31)] + [
    ((3, 2), 8, 2048, 256), ((20, 1), 8, 2048, 256), ((32, 1), 8, 2048, 256), ((1, 1), 1, 16, 8),
    ((3, 4), 7, 64, 32), ((2, 5), 8, 128, 20), ((6,), 4, 33, 3), ((2, 1, 3), 3, 256, 64),
    ((700,), 2, 600, 13), ((1,), 2, 16400, 3), ((10,), 10, 70, 9), ((5,), 2, 100, 3100),
    ((2,), 2, 64, 13000)]


@pytest.mark.parametrize("shape", RVQ_SHAPES)
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_rvq_matches_cpu_path_and_reference(shape, dtype):
    lead, n_q, bins, D = shape
    rng = rng_for("rvq", shape, str(dtype))
    books, x = residual_books(rng, n_q, bins, D), rand(rng, (*lead, D), dtype)
    codes = evaluated(_ext.rvq_encode(x, books, stream=mx.gpu))
    assert codes.dtype == mx.int32 and codes.shape == (*lead, n_q)
    np.testing.assert_array_equal(np.array(codes), np.array(_ext.rvq_encode(x, books, stream=mx.cpu)))
    np.testing.assert_array_equal(np.array(codes), np.array(on_cpu(reference.rvq_encode, x, books)))
    # Decode the codes, with every fifth one out of range (clamped, as the CPU path does).
    c = np.array(codes)
    c.flat[::5] = rng.integers(-3, bins + 3, size=c.flat[::5].shape)
    c = mx.array(c)
    out = evaluated(_ext.rvq_decode(c, books, stream=mx.gpu))
    assert out.dtype == mx.float32 and out.shape == (*lead, D)
    np.testing.assert_array_equal(np.array(out), np.array(_ext.rvq_decode(c, books, stream=mx.cpu)))
    inside = mx.array(np.array(codes))
    np.testing.assert_array_equal(np.array(_ext.rvq_decode(inside, books, stream=mx.gpu)),
                                  np.array(on_cpu(reference.rvq_decode, inside, books)))


def test_rvq_ties_go_to_the_lowest_index():
    rng = np.random.default_rng(2)
    n_q, bins, D = 3, 700, 5  # 11 chunks of 64 bins: ties across threads, warps and blocks
    books = rng.integers(-3, 4, size=(n_q, bins, D)).astype(np.float32)
    books[:, 650] = books[:, 2]
    books[:, 699] = books[:, 9]
    books = mx.array(books)
    x = mx.array(rng.integers(-4, 5, size=(4, 50, D)).astype(np.float32))
    got = np.array(evaluated(_ext.rvq_encode(x, books, stream=mx.gpu)))
    np.testing.assert_array_equal(got, np.array(_ext.rvq_encode(x, books, stream=mx.cpu)))
    assert not np.isin(got, [650, 699]).any()


@pytest.mark.parametrize("n", [1, 3, 40])
@pytest.mark.parametrize("D", [37, 256])
def test_rvq_rounds_as_the_cpu_path(n, D):
    """Codebooks whose entries are permutations of one vector of integers (|e|^2 exact
    in any order) and constant inputs near twice their mean: every distance of codebook
    0 is the same number but for the rounding of r.e, so the codes show any change in
    the order of the sums or a fused multiply-add (as tests/test_codec_emulator.py)."""
    rng = np.random.default_rng(n * 1000 + D)
    n_q, bins = 2, 2048
    base = np.round(2.0 ** rng.uniform(0, 6, (n_q, D)))
    books = mx.array(np.stack([[b[rng.permutation(D)] for _ in range(bins)] for b in base])
                     .astype(np.float32))
    x = mx.array(np.repeat(2 * base[0].mean() * rng.uniform(0.9, 1.1, (n, 1)), D, axis=1)
                 .astype(np.float32))
    want = np.array(_ext.rvq_encode(x, books, stream=mx.cpu))
    assert n == 1 or len(np.unique(want[:, 0])) > 1
    np.testing.assert_array_equal(np.array(evaluated(_ext.rvq_encode(x, books, stream=mx.gpu))), want)


def test_rvq_encode_of_no_vectors():
    books = mx.array(np.random.default_rng(3).standard_normal((4, 64, 16)).astype(np.float32))
    codes = evaluated(_ext.rvq_encode(mx.zeros((0, 16)), books, stream=mx.gpu))
    assert codes.shape == (0, 4) and codes.dtype == mx.int32


# ------------------------------------------------------------------ streams and graphs


def test_streaming_steps_match_the_cpu_chain():
    """SEANet-like steps with state carried: a replicate-padded strided conv (first flags
    set on the first step only), a dilated residual conv and a transposed conv, six steps
    on each device; every output and the final states compared."""
    rng = np.random.default_rng(7)
    B, C, stride, steps = 3, 48, 2, 6
    w_down = rand(rng, (C, 2 * stride, C), scale=1 / np.sqrt(2 * stride * C))
    w_res = rand(rng, (C, 3, C), scale=1 / np.sqrt(3 * C))
    b_res = rand(rng, (C,))
    w_up = rand(rng, (C, 2 * stride, C), scale=1 / np.sqrt(C))
    b_up = rand(rng, (C,))
    frames = [rand(rng, (B, 4 * stride, C)) for _ in range(steps)]

    def run(device):
        prev_down = mx.zeros((B, stride, C))
        prev_res = mx.zeros((B, 4, C))
        partial = mx.zeros((B, stride, C))
        first = mx.ones((B,), mx.bool_)
        outs = []
        for x in frames:
            h, prev_down = _ext.conv1d_stream(x, prev_down, w_down, None, first, stride, 1, 1, True,
                                              stream=device)
            first = mx.zeros_like(first)
            r, prev_res = _ext.conv1d_stream(h, prev_res, w_res, b_res, None, 1, 2, 1, True,
                                             stream=device)
            y, partial = _ext.conv_transpose1d_stream(h + r, partial, w_up, b_up, stride, 1, True,
                                                      stream=device)
            mx.eval(y, prev_down, prev_res, partial)
            outs.append(y)
        return outs, [prev_down, prev_res, partial]

    with mx.stream(mx.gpu):
        gpu_outs, gpu_states = run(mx.gpu)
    with mx.stream(mx.cpu):
        cpu_outs, cpu_states = run(mx.cpu)
    for i, (g, c) in enumerate(zip(gpu_outs, cpu_outs)):
        assert_close(g, c, 1e-5, f"step {i}")
    for g, c in zip(gpu_states, cpu_states):
        assert_close(g, c, 1e-5, "final state")


def test_lazy_inputs_shared_with_mlx_ops_in_one_eval():
    """The fused ops and plain MLX ops over the same unevaluated inputs, in one GPU graph,
    with an input that starts at an offset into its buffer."""
    rng = np.random.default_rng(5)
    a, c, d = rand(rng, (4, 8, 64)), rand(rng, (4, 2, 64)), rand(rng, (4, 1, 256))
    w, b = rand(rng, (32, 3, 64), scale=1 / np.sqrt(192)), rand(rng, (32,))
    w_tr = rand(rng, (16, 4, 64), scale=1 / 8)
    books = residual_books(rng, 4, 512, 256)
    mx.eval(a, c, d, w, b, w_tr, books)
    with mx.stream(mx.gpu):
        x, prev = (2.5 * a - 1)[1:], (c * c)[1:]  # lazy, and [1:] starts past row 0
        conv = ops.conv1d_stream(x, prev, w, b, elu_input=True)
        convtr = ops.conv_transpose1d_stream(x, mx.zeros((3, 2, 16)) + 0.5, w_tr, stride=2,
                                             elu_input=True)
        codes = ops.rvq_encode(d * 0.5, books)
        decoded = ops.rvq_decode(codes, books)
        plain = mx.abs(x).sum() + prev.sum() + conv[0].sum()
        ref_conv = reference.conv1d_stream(x, prev, w, b, elu_input=True)
        ref_convtr = reference.conv_transpose1d_stream(x, mx.zeros((3, 2, 16)) + 0.5, w_tr,
                                                       stride=2, elu_input=True)
        mx.eval(*conv, *convtr, codes, decoded, plain, *ref_conv, *ref_convtr)
    for f, r in zip((*conv, *convtr), (*ref_conv, *ref_convtr)):
        assert_close(f, r, 2e-3, "lazy")
    np.testing.assert_array_equal(np.array(codes),
                                  np.array(_ext.rvq_encode(d * 0.5, books, stream=mx.cpu)))
    np.testing.assert_array_equal(np.array(decoded),
                                  np.array(_ext.rvq_decode(codes, books, stream=mx.cpu)))
    with mx.stream(mx.cpu):
        expected = mx.abs(x).sum() + prev.sum() + conv[0].sum()
    assert abs(float(plain) - float(expected)) <= 1e-4 * max(1.0, abs(float(expected)))


def test_mimi_decoder_streams_as_on_the_cpu(tmp_path):
    """The tiny Mimi's decoder, four frames for three sessions with state carried: every
    codec op fused on the GPU, everything else MLX on the GPU, against the whole thing on
    the CPU stream."""
    path = tmp_path / "tiny_mimi.safetensors"
    write_tiny_mimi(path, seed=0)
    mimi = load_mimi(path)
    cfg = mimi.cfg
    codes = np.random.default_rng(9).integers(0, cfg.quantizer.bins, (3, cfg.num_codebooks, 4))

    def decode(device):
        with mx.stream(device), ops.use_mode("fused"):
            return _stream_decode(mimi, codes)

    gpu, cpu = decode(mx.gpu), decode(mx.cpu)
    assert np.isfinite(gpu).all()
    assert np.linalg.norm(gpu - cpu) <= 1e-2 * np.linalg.norm(cpu)
