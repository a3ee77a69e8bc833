// A whole stack of transformer layers for one decode step, as one primitive.
//
// DecoderLayers(x, pos, weights..., k_caches..., v_caches...) -> (y, k_caches'..., v_caches'...)
// runs, for each layer l in order, exactly what the per-op path runs:
//   qkv = matvec(x, in_proj, alpha = norm1)                     [B, 3C]
//   a   = ring_attention(q, k, v, k_cache[l], v_cache[l], pos)  heads H, D = C / H
//   x1  = matvec(a, out_proj, residual = x)
//   h   = matvec(x1, linear_in, alpha = norm2, gate)
//   x   = matvec(h, linear_out, residual = x1)
// with the same rounding (see matvec.h and ring_attention.h), so it equals the
// chain of Matvec and RingAttention primitives bit for bit on the CPU. On the GPU
// it adds the same kernels (6 per layer) to MLX's graph from one eval_gpu, which
// takes MLX's per-operation cost (graph building, buffer bookkeeping; about
// 10 ops per layer in the per-op path) out of the step. T = 1 only: prompts
// (T > 1) take the per-op path.
//
// weights, per layer: norm1 alpha [C], in_proj, out_proj, norm2 alpha [C],
// linear_in (2 * hidden rows), linear_out; each projection is w (dense, x's
// dtype) or w, scales, biases (MLX affine, group 64, `bits` 4 or 8): the layout
// of decoder_layers_common.h. The caches are donated as RingAttention's are.

#pragma once

#include <vector>

#include "decoder_layers_common.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace personaplex {

namespace mx = mlx::core;

class DecoderLayers : public mx::Primitive {
 public:
  DecoderLayers(mx::Stream stream, int layers, int heads, int bits, float eps, float rope_max_period)
      : mx::Primitive(stream), layers_(layers), heads_(heads), bits_(bits), eps_(eps),
        rope_max_period_(rope_max_period) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;

  const char* name() const override { return "DecoderLayers"; }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;

  // Where things sit among the inputs: x, pos, the layers' weights, the k caches,
  // the v caches.
  int per_layer() const { return layer_arrays(bits_); }
  int weight_index(int l) const { return 2 + l * per_layer(); }
  LayerInputs layer(int l) const { return layer_inputs(weight_index(l), bits_); }
  int cache_index(int l, bool value) const {
    return 2 + layers_ * per_layer() + (value ? layers_ : 0) + l;
  }
  // The layers over this primitive's caches, written to its outputs (y, then the caches).
  StackShape stack(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) const;

 private:
  int layers_, heads_, bits_;
  float eps_, rope_max_period_;
};

// x [B, C], pos int32 [B]; returns {y [B, C], k_caches'..., v_caches'...}.
std::vector<mx::array> decoder_layers(const mx::array& x, const mx::array& pos,
                                      const std::vector<mx::array>& weights,
                                      const std::vector<mx::array>& k_caches,
                                      const std::vector<mx::array>& v_caches, int heads, int bits,
                                      float eps, float rope_max_period, mx::StreamOrDevice s = {});

}  // namespace personaplex
