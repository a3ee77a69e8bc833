// Graph construction and the CPU path of Matvec (see matvec.h).
// The CUDA path lives in matvec_cuda.cpp; the Metal source is kernels/metal/matvec.metal.

#include "matvec.h"

#include "common.h"
#include "cpu_kernels.h"

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "mlx/backend/cpu/encoder.h"

namespace personaplex {

namespace {

void check(bool ok, const std::string& msg) { personaplex::check(ok, "matvec", msg); }

// The storage type's rounding, applied where the reference rounds.
template <typename T>
float rt(float v) {
  return static_cast<float>(static_cast<T>(v));
}

struct Dims {
  int M, K, N, n_out, bits;
  bool norm, gate, residual;
  float eps;
};

// One row of W (row n) as float32, dense or affine-dequantized.
template <typename T>
void weight_row(const void* w, const T* scales, const T* biases, int n, const Dims& d, float* out) {
  if (d.bits == 0) {
    const T* row = static_cast<const T*>(w) + static_cast<size_t>(n) * d.K;
    for (int k = 0; k < d.K; ++k) out[k] = static_cast<float>(row[k]);
    return;
  }
  const int per = 32 / d.bits, groups = d.K / 64;
  const uint32_t mask = (1u << d.bits) - 1u;
  const uint32_t* row = static_cast<const uint32_t*>(w) + static_cast<size_t>(n) * d.K / per;
  for (int k = 0; k < d.K; ++k) {
    const float q = static_cast<float>((row[k / per] >> (d.bits * (k % per))) & mask);
    const size_t g = static_cast<size_t>(n) * groups + k / 64;
    out[k] = static_cast<float>(scales[g]) * q + static_cast<float>(biases[g]);
  }
}

template <typename T>
void matvec_cpu(const T* x, const void* w, const T* scales, const T* biases, const T* alpha,
                const T* residual, T* out, const Dims& d) {
  // The (normalized) activations, float32 after the reference's rounding.
  std::vector<float> xs(static_cast<size_t>(d.M) * d.K);
  for (int m = 0; m < d.M; ++m) {
    const T* xr = x + static_cast<size_t>(m) * d.K;
    float* xo = xs.data() + static_cast<size_t>(m) * d.K;
    float inv = 1.f;
    if (d.norm) {
      float ss = 0.f;
      for (int k = 0; k < d.K; ++k) ss += static_cast<float>(xr[k]) * static_cast<float>(xr[k]);
      inv = 1.f / std::sqrt(ss / static_cast<float>(d.K) + d.eps);
    }
    for (int k = 0; k < d.K; ++k) {
      xo[k] = d.norm ? rt<T>(static_cast<float>(alpha[k]) * (static_cast<float>(xr[k]) * inv))
                     : static_cast<float>(xr[k]);
    }
  }
  std::vector<float> wrow(d.K), z(static_cast<size_t>(d.M) * d.N);
  for (int n = 0; n < d.N; ++n) {
    weight_row<T>(w, scales, biases, n, d, wrow.data());
    for (int m = 0; m < d.M; ++m) {
      const float* xo = xs.data() + static_cast<size_t>(m) * d.K;
      float s = 0.f;
      for (int k = 0; k < d.K; ++k) s += wrow[k] * xo[k];
      z[static_cast<size_t>(m) * d.N + n] = rt<T>(s);
    }
  }
  for (int m = 0; m < d.M; ++m) {
    for (int j = 0; j < d.n_out; ++j) {
      const size_t at = static_cast<size_t>(m) * d.n_out + j;
      float y = z[static_cast<size_t>(m) * d.N + j];
      if (d.gate) {
        const float v = z[static_cast<size_t>(m) * d.N + d.n_out + j];
        const float sig = rt<T>(1.f / (1.f + std::exp(-y)));
        y = rt<T>(rt<T>(y * sig) * v);
      }
      if (d.residual) y = rt<T>(static_cast<float>(residual[at]) + y);
      out[at] = static_cast<T>(y);
    }
  }
}

}  // namespace

void cpu::matvec(mx::Dtype dtype, const void* x, const void* w, const void* scales,
                 const void* biases, const void* alpha, const void* residual, void* out, int M, int K,
                 int N, int bits, bool gate, float eps) {
  const Dims d{.M = M, .K = K, .N = N, .n_out = gate ? N / 2 : N, .bits = bits, .norm = alpha != nullptr,
               .gate = gate, .residual = residual != nullptr, .eps = eps};
  dispatch_float("matvec", dtype, [&](auto zero) {
    using T = decltype(zero);
    matvec_cpu<T>(static_cast<const T*>(x), w, static_cast<const T*>(scales),
                  static_cast<const T*>(biases), static_cast<const T*>(alpha),
                  static_cast<const T*>(residual), static_cast<T*>(out), d);
  });
}

mx::array matvec(const mx::array& x, const mx::array& w, const std::optional<mx::array>& scales,
                 const std::optional<mx::array>& biases, const std::optional<mx::array>& alpha,
                 const std::optional<mx::array>& residual, int bits, bool gate, float eps,
                 mx::StreamOrDevice s) {
  check(x.ndim() == 2, "x must be [M, K], got " + shape_str(x));
  const auto dt = x.dtype();
  check(dt == mx::float32 || dt == mx::bfloat16 || dt == mx::float16,
        "x must be float32, bfloat16 or float16");
  const int M = x.shape(0), K = x.shape(1);
  check(w.ndim() == 2, "w must be 2-D, got " + shape_str(w));
  const int N = w.shape(0);
  if (bits == 0) {
    check(w.shape(1) == K, "w must be [N, K] with K = " + std::to_string(K) + ", got " + shape_str(w));
    check(w.dtype() == dt, "dense w must have x's dtype");
    check(!scales && !biases, "scales and biases are for quantized w (bits 4 or 8)");
  } else {
    check(bits == 4 || bits == 8, "bits must be 0 (dense), 4 or 8, got " + std::to_string(bits));
    check(K % 64 == 0, "quantized w needs K divisible by the group size 64, got K = " + std::to_string(K));
    check(w.dtype() == mx::uint32 && w.shape(1) == K * bits / 32,
          "quantized w must be uint32 [N, K * bits / 32] = [" + std::to_string(N) + ", " +
              std::to_string(K * bits / 32) + "], got " + shape_str(w));
    check(scales && biases, "quantized w needs scales and biases");
    for (auto* a : {&*scales, &*biases}) {
      check(a->ndim() == 2 && a->shape(0) == N && a->shape(1) == K / 64,
            "scales and biases must be [N, K / 64], got " + shape_str(*a));
      check(a->dtype() == dt, "scales and biases must have x's dtype");
    }
  }
  check(!gate || N % 2 == 0, "a gated matvec needs an even number of weight rows");
  const int n_out = gate ? N / 2 : N;
  if (alpha) check(alpha->size() == static_cast<size_t>(K), "alpha must hold K values, got " + shape_str(*alpha));
  if (residual) {
    check(residual->ndim() == 2 && residual->shape(0) == M && residual->shape(1) == n_out,
          "residual must be [M, n_out] = [" + std::to_string(M) + ", " + std::to_string(n_out) +
              "], got " + shape_str(*residual));
  }
  auto st = mx::to_stream(s);
  auto c = [&](const mx::array& a) { return mx::contiguous(a, false, st); };
  std::vector<mx::array> inputs = {c(x), dense_input(w, st)};
  if (bits) {
    inputs.push_back(dense_input(*scales, st));
    inputs.push_back(dense_input(*biases, st));
  }
  if (alpha) inputs.push_back(gain_input(*alpha, K, dt, st));
  if (residual) inputs.push_back(c(mx::astype(*residual, dt, st)));
  auto prim = std::make_shared<Matvec>(st, bits, alpha.has_value(), gate, residual.has_value(), eps);
  return mx::array({M, n_out}, dt, prim, std::move(inputs));
}

bool Matvec::is_equivalent(const mx::Primitive& other) const {
  auto& o = static_cast<const Matvec&>(other);
  return bits_ == o.bits_ && norm_ == o.norm_ && gate_ == o.gate_ && residual_ == o.residual_ &&
         eps_ == o.eps_;
}

std::vector<mx::Shape> Matvec::output_shapes(const std::vector<mx::array>& inputs) {
  const int N = inputs[1].shape(0);
  return {{inputs[0].shape(0), gate_ ? N / 2 : N}};
}

void Matvec::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  alloc_outputs(outputs);
  auto& enc = cpu_encoder(stream(), inputs, outputs);
  auto& out = outputs[0];
  const auto& x = inputs[0];
  const int N = inputs[1].shape(0);
  size_t i = 2;
  auto next = [&](bool present) -> const void* { return present ? inputs[i++].data<void>() : nullptr; };
  const void* scales = next(bits_);
  const void* biases = next(bits_);
  const void* alpha = next(norm_);
  const void* residual = next(residual_);
  enc.dispatch([dt = x.dtype(), x = x.data<void>(), w = inputs[1].data<void>(), scales, biases, alpha,
                residual, o = out.data<void>(), M = x.shape(0), K = x.shape(1), N, bits = bits_,
                gate = gate_, eps = eps_]() {
    cpu::matvec(dt, x, w, scales, biases, alpha, residual, o, M, K, N, bits, gate, eps);
  });
}

}  // namespace personaplex
