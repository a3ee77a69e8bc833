// Where each layer's weights sit among DecoderLayers' inputs (see decoder_layers.h):
// per layer alpha1, in_proj, out_proj, alpha2, linear_in, linear_out, each
// projection 1 array (dense) or 3 (w, scales, biases).

#pragma once

#include <string>
#include <vector>

#include "mlx/array.h"

namespace personaplex {

struct Proj {
  int w, scales, biases;  // input indices; scales = biases = -1 when dense
};

struct LayerInputs {
  int alpha1;
  Proj in, out;
  int alpha2;
  Proj ffn_in, ffn_out;
};

// The projection whose first array is input i: w, or w, scales, biases.
inline Proj proj_at(int i, int bits) { return Proj{i, bits ? i + 1 : -1, bits ? i + 2 : -1}; }

inline LayerInputs layer_inputs(int base, int bits) {
  const int p = bits ? 3 : 1;
  return {base, proj_at(base + 1, bits), proj_at(base + 1 + p, bits), base + 1 + 2 * p,
          proj_at(base + 2 + 2 * p, bits), proj_at(base + 2 + 3 * p, bits)};
}

struct ProjPointers {
  const void *w, *scales, *biases;
};

struct LayerPointers {
  const void* alpha1;
  ProjPointers in, out;
  const void* alpha2;
  ProjPointers ffn_in, ffn_out;
};

// ptr(array) -> const void*: host data on the CPU, device pointers on the GPU.
template <class Ptr>
ProjPointers proj_pointers(const std::vector<mlx::core::array>& inputs, const Proj& p, Ptr ptr) {
  auto at = [&](int i) -> const void* { return i < 0 ? nullptr : ptr(inputs[i]); };
  return {at(p.w), at(p.scales), at(p.biases)};
}

template <class Ptr>
LayerPointers layer_pointers(const std::vector<mlx::core::array>& inputs, const LayerInputs& li, Ptr ptr) {
  auto proj = [&](const Proj& p) { return proj_pointers(inputs, p, ptr); };
  return {ptr(inputs[li.alpha1]), proj(li.in), proj(li.out), ptr(inputs[li.alpha2]), proj(li.ffn_in),
          proj(li.ffn_out)};
}

// Argument checks shared by the primitives that take layer stacks (throw
// std::invalid_argument naming `op`): one projection w [N, K] of dtype dt (bits
// 0), or w uint32 [N, K * bits / 32] with scales and biases [N, K / 64] of dt;
// and L layers of weights (6 or 14 arrays each, decoder_layers.h) of width C.
void check_projection(const char* op, const std::string& what, const mlx::core::array* w, int N, int K,
                      int bits, mlx::core::Dtype dt);
void check_layer_stack(const char* op, const mlx::core::array* w, int L, int C, int bits,
                       mlx::core::Dtype dt);
// Appends one stack's weights to a primitive's inputs: contiguous, the norm
// alphas as [C] of dtype dt.
void push_layer_stack(std::vector<mlx::core::array>& inputs, const mlx::core::array* w, int L, int C,
                      int bits, mlx::core::Dtype dt, mlx::core::Stream st);

}  // namespace personaplex
