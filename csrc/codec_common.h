// Small helpers shared by the codec primitives (conv1d_stream,
// conv_transpose1d_stream, rvq): dtype dispatch, argument checks, the ELU and a
// float32 dot product for the CPU paths; kernel names and lane counts for the GPU.

#pragma once

#include <cmath>
#include <stdexcept>
#include <string>

#include "common.h"

namespace personaplex::codec {

using personaplex::check;
using personaplex::dispatch_float;
using personaplex::shape_str;

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
