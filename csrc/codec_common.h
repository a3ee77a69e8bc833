// Small helpers shared by the codec primitives' CPU paths (conv1d_stream,
// conv_transpose1d_stream, rvq): dtype dispatch, argument checks, the ELU and
// a float32 dot product.

#pragma once

#include <cmath>
#include <sstream>
#include <stdexcept>
#include <string>

#include "mlx/array.h"

namespace personaplex::codec {

namespace mx = mlx::core;

inline std::string shape_str(const mx::array& a) {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < a.shape().size(); ++i) os << (i ? ", " : "") << a.shape()[i];
  os << ")";
  return os.str();
}

inline void check(bool ok, const char* op, const std::string& msg) {
  if (!ok) throw std::invalid_argument(std::string(op) + ": " + msg);
}

template <typename F>
void dispatch_float(const char* op, mx::Dtype dtype, F&& f) {
  if (dtype == mx::float32) {
    f(float{});
  } else if (dtype == mx::bfloat16) {
    f(mx::bfloat16_t{});
  } else if (dtype == mx::float16) {
    f(mx::float16_t{});
  } else {
    throw std::invalid_argument(std::string(op) + ": dtype must be float32, bfloat16 or float16");
  }
}

// ELU as mlx.nn.elu computes it in the storage type: exp rounded to T, minus one
// rounded to T (so bfloat16 results agree with the reference bit for bit).
template <typename T>
inline T elu(T x) {
  const float v = static_cast<float>(x);
  if (v > 0.f) return x;
  const T e = static_cast<T>(std::exp(v));
  return static_cast<T>(static_cast<float>(e) - 1.f);
}

// Dot product accumulated in float32 over 8 independent lanes: the compiler
// vectorises the lanes without reassociating a single running sum.
template <typename T>
inline float dot(const T* a, const T* b, int n) {
  float lane[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) lane[j] += static_cast<float>(a[i + j]) * static_cast<float>(b[i + j]);
  }
  float s = ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
  for (; i < n; ++i) s += static_cast<float>(a[i]) * static_cast<float>(b[i]);
  return s;
}

}  // namespace personaplex::codec
