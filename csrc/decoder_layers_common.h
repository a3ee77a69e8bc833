// The one layout of a layer stack among a primitive's inputs (DecoderLayers,
// DepformerFrame; see decoder_layers.h): per layer norm1 alpha, in_proj,
// out_proj, norm2 alpha, linear_in, linear_out, each projection 1 array (w,
// dense) or 3 (w, scales, biases: MLX affine, `bits` 4 or 8). Python's
// ops.stack_arrays writes this order.

#pragma once

#include <string>
#include <vector>

#include "mlx/array.h"

namespace personaplex {

// Arrays per projection and per layer, by bit width (0: dense).
constexpr int proj_arrays(int bits) { return bits ? 3 : 1; }
constexpr int layer_arrays(int bits) { return 2 + 4 * proj_arrays(bits); }

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
constexpr Proj proj_at(int i, int bits) {
  return {.w = i, .scales = bits ? i + 1 : -1, .biases = bits ? i + 2 : -1};
}

// Input indices of the layer whose first array is input `base`.
constexpr LayerInputs layer_inputs(int base, int bits) {
  const int p = proj_arrays(bits);
  return {.alpha1 = base,
          .in = proj_at(base + 1, bits),
          .out = proj_at(base + 1 + p, bits),
          .alpha2 = base + 1 + 2 * p,
          .ffn_in = proj_at(base + 2 + 2 * p, bits),
          .ffn_out = proj_at(base + 2 + 3 * p, bits)};
}
static_assert(layer_inputs(0, 4).ffn_out.biases == layer_arrays(4) - 1 &&
                  layer_inputs(0, 0).ffn_out.w == layer_arrays(0) - 1,
              "a layer's last array ends its layout");

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
  return {.w = at(p.w), .scales = at(p.scales), .biases = at(p.biases)};
}

template <class Ptr>
LayerPointers layer_pointers(const std::vector<mlx::core::array>& inputs, const LayerInputs& li, Ptr ptr) {
  auto proj = [&](const Proj& p) { return proj_pointers(inputs, p, ptr); };
  return {.alpha1 = ptr(inputs[li.alpha1]),
          .in = proj(li.in),
          .out = proj(li.out),
          .alpha2 = ptr(inputs[li.alpha2]),
          .ffn_in = proj(li.ffn_in),
          .ffn_out = proj(li.ffn_out)};
}

// A decode step's stack of decoder layers as the GPU backends run it (cuda_nodes.h's and
// metal_nodes.h's StackNode add where the step's positions sit): the layers' weights are
// inputs from first_weight on, in the layout above; layer l's caches are read from kc[l] /
// vc[l] and written to kc_out[l] / vc_out[l] (the same arrays, or, with copy[l] /
// copy[L + l], fresh ones the attention fills with a copy first; all 0 until a backend
// decides).
struct StackShape {
  mlx::core::Dtype dtype;
  int bits, heads, layers, hidden;
  float eps, rope_max_period;
  const std::vector<mlx::core::array>* inputs;
  int first_weight;
  const mlx::core::array* x;
  mlx::core::array* y;
  std::vector<const mlx::core::array*> kc, vc;
  std::vector<mlx::core::array*> kc_out, vc_out;
  std::vector<char> copy;
};

// Argument checks shared by the primitives that take layer stacks (throw
// std::invalid_argument naming `op`): one projection w [N, K] of dtype dt (bits
// 0), or w uint32 [N, K * bits / 32] with scales and biases [N, K / 64] of dt;
// and L layers of weights (layer_arrays(bits) each) of width C.
void check_projection(const char* op, const std::string& what, const mlx::core::array* w, int N, int K,
                      int bits, mlx::core::Dtype dt);
void check_layer_stack(const char* op, const mlx::core::array* w, int L, int C, int bits,
                       mlx::core::Dtype dt);
// Appends one stack's weights to a primitive's inputs: contiguous, the norm
// alphas as [C] of dtype dt.
void push_layer_stack(std::vector<mlx::core::array>& inputs, const mlx::core::array* w, int L, int C,
                      int bits, mlx::core::Dtype dt, mlx::core::Stream st);

}  // namespace personaplex
