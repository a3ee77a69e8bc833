// Graph construction and the CPU path of ConvTranspose1dStream (see conv_transpose1d_stream.h).

#include "conv_transpose1d_stream.h"

#include <algorithm>
#include <vector>

#include "codec_common.h"
#include "cpu_kernels.h"
#include "mlx/backend/cpu/encoder.h"

namespace personaplex {

namespace {

using codec::check;
using codec::shape_str;
constexpr const char* kOp = "conv_transpose1d_stream";

struct Dims {
  int B, T, C_in, C_out, K, stride, groups;
};

template <typename T>
void conv_transpose1d_stream_cpu(const T* x, const T* partial, const T* w, const T* bias, T* y,
                                 T* partial_out, const Dims& d, bool elu_input) {
  const int cin_g = d.C_in / d.groups, cout_g = d.C_out / d.groups;
  const int overlap = d.K - d.stride, n_out = d.T * d.stride;
  std::vector<T> xin(static_cast<size_t>(d.T) * d.C_in);
  std::vector<float> acc(static_cast<size_t>(n_out + overlap) * d.C_out);
  for (int b = 0; b < d.B; ++b) {
    const T* xb = x + static_cast<size_t>(b) * d.T * d.C_in;
    for (size_t i = 0; i < xin.size(); ++i) xin[i] = elu_input ? codec::elu(xb[i]) : xb[i];
    const T* pb = partial + static_cast<size_t>(b) * overlap * d.C_out;
    for (size_t i = 0; i < static_cast<size_t>(overlap) * d.C_out; ++i) acc[i] = static_cast<float>(pb[i]);
    std::fill(acc.begin() + static_cast<size_t>(overlap) * d.C_out, acc.end(), 0.f);
    // Weight row w[co, k, :] stays in cache while it meets every input frame.
    for (int co = 0; co < d.C_out; ++co) {
      const int g = co / cout_g;
      for (int k = 0; k < d.K; ++k) {
        const T* wrow = w + (static_cast<size_t>(co) * d.K + k) * cin_g;
        for (int t = 0; t < d.T; ++t) {
          acc[static_cast<size_t>(t * d.stride + k) * d.C_out + co] +=
              codec::dot(wrow, xin.data() + static_cast<size_t>(t) * d.C_in + g * cin_g, cin_g);
        }
      }
    }
    T* yb = y + static_cast<size_t>(b) * n_out * d.C_out;
    for (int r = 0; r < n_out; ++r) {
      for (int co = 0; co < d.C_out; ++co) {
        const float v = acc[static_cast<size_t>(r) * d.C_out + co];
        yb[static_cast<size_t>(r) * d.C_out + co] = static_cast<T>(bias ? v + static_cast<float>(bias[co]) : v);
      }
    }
    T* po = partial_out + static_cast<size_t>(b) * overlap * d.C_out;
    const float* tail = acc.data() + static_cast<size_t>(n_out) * d.C_out;
    for (size_t i = 0; i < static_cast<size_t>(overlap) * d.C_out; ++i) po[i] = static_cast<T>(tail[i]);
  }
}

}  // namespace

std::vector<mx::array> conv_transpose1d_stream(const mx::array& x, const mx::array& partial,
                                               const mx::array& weight,
                                               const std::optional<mx::array>& bias, int stride,
                                               int groups, bool elu_input, mx::StreamOrDevice s) {
  check(x.ndim() == 3, kOp, "x must be [B, T, C_in], got " + shape_str(x));
  check(weight.ndim() == 3, kOp, "weight must be [C_out, K, C_in / groups], got " + shape_str(weight));
  check(stride >= 1 && groups >= 1, kOp, "stride and groups must be >= 1");
  const int B = x.shape(0), T = x.shape(1), C_in = x.shape(2);
  const int C_out = weight.shape(0), K = weight.shape(1);
  check(K >= stride, kOp, "kernel " + std::to_string(K) + " shorter than stride " + std::to_string(stride));
  check(C_in % groups == 0 && C_out % groups == 0 && weight.shape(2) * groups == C_in, kOp,
        "weight " + shape_str(weight) + " does not fit " + std::to_string(C_in) +
            " input channels in " + std::to_string(groups) + " groups");
  const int overlap = K - stride;
  check(partial.ndim() == 3 && partial.shape(0) == B && partial.shape(1) == overlap &&
            partial.shape(2) == C_out,
        kOp, "partial must be [B, K - stride, C_out] = [" + std::to_string(B) + ", " +
                 std::to_string(overlap) + ", " + std::to_string(C_out) + "], got " + shape_str(partial));
  const auto dt = x.dtype();
  check(partial.dtype() == dt && weight.dtype() == dt, kOp, "x, partial and weight must share one dtype");
  auto st = mx::to_stream(s);
  auto c = [&](const mx::array& a) { return mx::contiguous(a, false, st); };
  std::vector<mx::array> inputs = {c(x), c(partial), dense_input(weight, st)};
  if (bias) {
    check(bias->ndim() == 1 && bias->shape(0) == C_out, kOp, "bias must be [C_out], got " + shape_str(*bias));
    inputs.push_back(dense_input(mx::astype(*bias, dt, st), st));
  }
  auto prim = std::make_shared<ConvTranspose1dStream>(st, stride, groups, elu_input, bias.has_value());
  return mx::array::make_arrays({{B, T * stride, C_out}, partial.shape()}, {dt, dt}, prim, inputs);
}

bool ConvTranspose1dStream::is_equivalent(const mx::Primitive& other) const {
  auto& o = static_cast<const ConvTranspose1dStream&>(other);
  return stride_ == o.stride_ && groups_ == o.groups_ && elu_input_ == o.elu_input_ &&
         has_bias_ == o.has_bias_;
}

std::vector<mx::Shape> ConvTranspose1dStream::output_shapes(const std::vector<mx::array>& inputs) {
  const auto& x = inputs[0];
  return {{x.shape(0), x.shape(1) * stride_, inputs[2].shape(0)}, inputs[1].shape()};
}

void ConvTranspose1dStream::eval_cpu(const std::vector<mx::array>& inputs,
                                     std::vector<mx::array>& outputs) {
  alloc_outputs(outputs);
  auto& enc = cpu_encoder(stream(), inputs, outputs);
  const auto& x = inputs[0];
  const auto& w = inputs[2];
  const Dims d{.B = x.shape(0), .T = x.shape(1), .C_in = x.shape(2), .C_out = w.shape(0), .K = w.shape(1),
               .stride = stride_, .groups = groups_};
  const mx::array* bias = has_bias_ ? &inputs[3] : nullptr;
  codec::dispatch_float(kOp, x.dtype(), [&](auto zero) {
    using T = decltype(zero);
    enc.dispatch([x = x.data<T>(), partial = inputs[1].data<T>(), w = w.data<T>(),
                  b = bias ? bias->data<T>() : nullptr, y = outputs[0].data<T>(),
                  partial_out = outputs[1].data<T>(), d, elu = elu_input_]() {
      conv_transpose1d_stream_cpu<T>(x, partial, w, b, y, partial_out, d, elu);
    });
  });
}

void cpu::conv_transpose1d_stream(mx::Dtype dtype, const void* x, const void* partial, const void* w,
                                  const void* bias, void* y, void* partial_out, int B, int T, int C_in,
                                  int C_out, int K, int stride, int groups, bool elu_input) {
  const Dims d{.B = B, .T = T, .C_in = C_in, .C_out = C_out, .K = K, .stride = stride, .groups = groups};
  codec::dispatch_float(kOp, dtype, [&](auto zero) {
    using T_ = decltype(zero);
    conv_transpose1d_stream_cpu<T_>(static_cast<const T_*>(x), static_cast<const T_*>(partial),
                                    static_cast<const T_*>(w), static_cast<const T_*>(bias), static_cast<T_*>(y),
                                    static_cast<T_*>(partial_out), d, elu_input);
  });
}

}  // namespace personaplex
