// Graph construction and the CPU path of Conv1dStream (see conv1d_stream.h).

#include "conv1d_stream.h"

#include <cstring>
#include <vector>

#include "codec_common.h"
#include "cpu_kernels.h"
#include "mlx/backend/cpu/encoder.h"

namespace personaplex {

namespace {

using codec::check;
using codec::shape_str;
constexpr const char* kOp = "conv1d_stream";

struct Dims {
  int B, T, C_in, C_out, K, context, stride, dilation, groups;
};

// One session: `buf` holds [context + T, C_in] conv inputs (previous or the
// replicated first sample, then the new, possibly ELU'd, samples).
template <typename T>
void conv_session(const T* buf, const T* w, const T* bias, T* y, const Dims& d) {
  const int cin_g = d.C_in / d.groups, cout_g = d.C_out / d.groups;
  const int T_out = d.T / d.stride;
  // With dilation 1 and one group, a window of K rows is one contiguous run, as
  // is a weight row [K, C_in]: one dot product of K * C_in per output.
  const bool contiguous = d.dilation == 1 && d.groups == 1;
  for (int co = 0; co < d.C_out; ++co) {
    const int g = co / cout_g;
    const T* wrow = w + static_cast<size_t>(co) * d.K * cin_g;
    const float b = bias ? static_cast<float>(bias[co]) : 0.f;
    for (int t = 0; t < T_out; ++t) {
      const T* win = buf + static_cast<size_t>(t) * d.stride * d.C_in;
      float acc = b;
      if (contiguous) {
        acc += codec::dot(wrow, win, d.K * d.C_in);
      } else {
        for (int k = 0; k < d.K; ++k) {
          acc += codec::dot(wrow + k * cin_g,
                            win + static_cast<size_t>(k) * d.dilation * d.C_in + g * cin_g, cin_g);
        }
      }
      y[static_cast<size_t>(t) * d.C_out + co] = static_cast<T>(acc);
    }
  }
}

template <typename T>
void conv1d_stream_cpu(const T* x, const T* prev, const T* w, const T* bias, const bool* first,
                       T* y, T* prev_out, const Dims& d, bool elu_input) {
  const size_t row = d.C_in;
  std::vector<T> buf(static_cast<size_t>(d.context + d.T) * row);
  for (int b = 0; b < d.B; ++b) {
    const T* xb = x + static_cast<size_t>(b) * d.T * row;
    T* fresh = buf.data() + static_cast<size_t>(d.context) * row;
    for (size_t i = 0; i < static_cast<size_t>(d.T) * row; ++i) {
      fresh[i] = elu_input ? codec::elu(xb[i]) : xb[i];
    }
    if (first && first[b] && d.T > 0) {  // no new sample to repeat: keep `previous`
      for (int r = 0; r < d.context; ++r) std::memcpy(buf.data() + r * row, fresh, sizeof(T) * row);
    } else if (d.context) {
      std::memcpy(buf.data(), prev + static_cast<size_t>(b) * d.context * row,
                  sizeof(T) * d.context * row);
    }
    conv_session(buf.data(), w, bias, y + static_cast<size_t>(b) * (d.T / d.stride) * d.C_out, d);
    if (d.context) {
      std::memcpy(prev_out + static_cast<size_t>(b) * d.context * row,
                  buf.data() + static_cast<size_t>(d.T) * row, sizeof(T) * d.context * row);
    }
  }
}

}  // namespace

std::vector<mx::array> conv1d_stream(const mx::array& x, const mx::array& previous,
                                     const mx::array& weight, const std::optional<mx::array>& bias,
                                     const std::optional<mx::array>& first, int stride, int dilation,
                                     int groups, bool elu_input, mx::StreamOrDevice s) {
  check(x.ndim() == 3, kOp, "x must be [B, T, C_in], got " + shape_str(x));
  check(weight.ndim() == 3, kOp, "weight must be [C_out, K, C_in / groups], got " + shape_str(weight));
  check(stride >= 1 && dilation >= 1 && groups >= 1, kOp, "stride, dilation and groups must be >= 1");
  const int B = x.shape(0), T = x.shape(1), C_in = x.shape(2);
  const int C_out = weight.shape(0), K = weight.shape(1);
  const int context = (K - 1) * dilation + 1 - stride;
  check(context >= 0, kOp, "kernel reach (K - 1) * dilation + 1 must be >= stride");
  check(C_in % groups == 0 && C_out % groups == 0 && weight.shape(2) * groups == C_in, kOp,
        "weight " + shape_str(weight) + " does not fit " + std::to_string(C_in) +
            " input channels in " + std::to_string(groups) + " groups");
  check(T % stride == 0, kOp,
        "input of " + std::to_string(T) + " steps is not a multiple of stride " + std::to_string(stride));
  check(previous.ndim() == 3 && previous.shape(0) == B && previous.shape(1) == context &&
            previous.shape(2) == C_in,
        kOp, "previous must be [B, " + std::to_string(context) + ", C_in] = [" + std::to_string(B) +
                 ", " + std::to_string(context) + ", " + std::to_string(C_in) + "], got " +
                 shape_str(previous));
  const auto dt = x.dtype();
  check(previous.dtype() == dt && weight.dtype() == dt, kOp, "x, previous and weight must share one dtype");
  auto st = mx::to_stream(s);
  auto c = [&](const mx::array& a) { return mx::contiguous(a, false, st); };
  std::vector<mx::array> inputs = {c(x), c(previous), dense_input(weight, st)};
  if (bias) {
    check(bias->ndim() == 1 && bias->shape(0) == C_out, kOp, "bias must be [C_out], got " + shape_str(*bias));
    inputs.push_back(dense_input(mx::astype(*bias, dt, st), st));
  }
  if (first) {
    check(first->ndim() == 1 && first->shape(0) == B, kOp, "first must be [B], got " + shape_str(*first));
    inputs.push_back(c(mx::astype(*first, mx::bool_, st)));
  }
  auto prim = std::make_shared<Conv1dStream>(st, stride, dilation, groups, elu_input,
                                             bias.has_value(), first.has_value());
  return mx::array::make_arrays({{B, T / stride, C_out}, previous.shape()}, {dt, dt}, prim, inputs);
}

bool Conv1dStream::is_equivalent(const mx::Primitive& other) const {
  auto& o = static_cast<const Conv1dStream&>(other);
  return stride_ == o.stride_ && dilation_ == o.dilation_ && groups_ == o.groups_ &&
         elu_input_ == o.elu_input_ && has_bias_ == o.has_bias_ && has_first_ == o.has_first_;
}

std::vector<mx::Shape> Conv1dStream::output_shapes(const std::vector<mx::array>& inputs) {
  const auto& x = inputs[0];
  return {{x.shape(0), x.shape(1) / stride_, inputs[2].shape(0)}, inputs[1].shape()};
}

void Conv1dStream::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  alloc_outputs(outputs);
  auto& enc = cpu_encoder(stream(), inputs, outputs);
  const auto& x = inputs[0];
  const auto& w = inputs[2];
  const Dims d{.B = x.shape(0), .T = x.shape(1), .C_in = x.shape(2), .C_out = w.shape(0), .K = w.shape(1),
               .context = inputs[1].shape(1), .stride = stride_, .dilation = dilation_, .groups = groups_};
  const mx::array* bias = has_bias_ ? &inputs[3] : nullptr;
  const mx::array* first = has_first_ ? &inputs[3 + has_bias_] : nullptr;
  codec::dispatch_float(kOp, x.dtype(), [&](auto zero) {
    using T = decltype(zero);
    enc.dispatch([x = x.data<T>(), prev = inputs[1].data<T>(), w = w.data<T>(),
                  b = bias ? bias->data<T>() : nullptr, f = first ? first->data<bool>() : nullptr,
                  y = outputs[0].data<T>(), prev_out = outputs[1].data<T>(), d,
                  elu = elu_input_]() { conv1d_stream_cpu<T>(x, prev, w, b, f, y, prev_out, d, elu); });
  });
}

void cpu::conv1d_stream(mx::Dtype dtype, const void* x, const void* prev, const void* w, const void* bias,
                        const bool* first, void* y, void* prev_out, int B, int T, int C_in, int C_out,
                        int K, int context, int stride, int dilation, int groups, bool elu_input) {
  const Dims d{.B = B, .T = T, .C_in = C_in, .C_out = C_out, .K = K, .context = context, .stride = stride,
               .dilation = dilation, .groups = groups};
  codec::dispatch_float(kOp, dtype, [&](auto zero) {
    using T_ = decltype(zero);
    conv1d_stream_cpu<T_>(static_cast<const T_*>(x), static_cast<const T_*>(prev), static_cast<const T_*>(w),
                          static_cast<const T_*>(bias), first, static_cast<T_*>(y), static_cast<T_*>(prev_out),
                          d, elu_input);
  });
}

}  // namespace personaplex
