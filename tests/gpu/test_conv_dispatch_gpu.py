"""ops' hand-off of large streaming conv steps to MLX's own convolution on the GPU
(ops.CONV_KERNEL_MAX_MACS): both sides of the threshold compute the same step as
our kernel, states included (float32; 2e-3 relative to the largest value, as
MLX's convolution may run on TF32 tensor cores, as PyTorch's cuDNN convolutions
do by default)."""

import mlx.core as mx
import numpy as np
import pytest

from personaplex_fast import _ext, ops
from tests.test_conv1d_stream import assert_close, rand


@pytest.mark.parametrize("B", [1, 8])
def test_large_convs_take_mlx_and_agree_with_the_kernel(B, monkeypatch):
    rng = np.random.default_rng(B)
    T, C_in, C_out, K, stride = 1920, 64, 128, 8, 4  # 31M MACs per session: above the threshold
    x, prev = rand(rng, (B, T, C_in)), rand(rng, (B, K - stride, C_in))
    w, b = rand(rng, (C_out, K, C_in), scale=1 / np.sqrt(K * C_in)), rand(rng, (C_out,))
    x_tr, part = rand(rng, (B, 480, 128)), rand(rng, (B, 4, 64))
    w_tr = rand(rng, (64, 8, 128), scale=1 / np.sqrt(8 * 128))
    assert ops._conv_as_gemm(B * (T // stride) * w.size)
    with mx.stream(mx.gpu):
        kernel = _ext.conv1d_stream(x, prev, w, b, None, stride, 1, 1, True)
        kernel_tr = _ext.conv_transpose1d_stream(x_tr, part, w_tr, b[:64], 4, 1, True)
        via_ops = ops.conv1d_stream(x, prev, w, b, stride=stride, elu_input=True)
        via_ops_tr = ops.conv_transpose1d_stream(x_tr, part, w_tr, b[:64], stride=4, elu_input=True)
        monkeypatch.setattr(ops, "CONV_KERNEL_MAX_MACS", None)
        assert not ops._conv_as_gemm(10**12)
        mx.eval(kernel, kernel_tr, via_ops, via_ops_tr)
    for f, r in zip((*via_ops, *via_ops_tr), (*kernel, *kernel_tr)):
        assert_close(f, r, 2e-3, "conv hand-off")
