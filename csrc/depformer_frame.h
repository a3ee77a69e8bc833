// The depformer's whole frame: all Q codebook steps, sampling included, as one
// primitive, so the 8 sequential steps cost one graph node on the host instead
// of ~130 MLX ops, and no host round trip between codebooks.
//
// DepformerFrame(h, text, forced, pos, [noise], weights...) -> (codes, logits),
// for k = 0 .. Q-1, exactly what the per-op path runs:
//   x         = matvec(h, in_proj[k])                        (in_proj[0] when n_in = 1)
//   x         = T(x + table_k[prev])   table_0 = text embedding, prev = text;
//                                      table_k = audio embedding k-1, prev = codes[k-1]
//   x         = decoder_layers(x, pos[k], stack[k], caches)  (stack[0] when n_stack = 1)
//   logits[k] = matvec(x, head[k])
//   codes[k]  = sample_topk(logits[k], noise[k], forced[k], temp, top_k, greedy)
// The caches are the frame's own (W = Q, written at position pos[k]), scratch
// that never leaves the primitive. Token -1 in prev embeds as zeros; others are
// clamped to the table. T is h's dtype.
//
// Shapes: h [B, C_in]; text [B] int32; forced [Q, B] int32 (-1: sample); pos
// [Q, B] int32 (k for every session, from the caller so the GPU reads it from
// memory); noise float32 [Q, B, V] (absent when greedy). Weights, in order:
// n_in input projections [D, C_in]; Q tables [rows, D] of dtype T; n_stack layer
// stacks as decoder_layers takes them (layers x layer_arrays(bits)); Q heads [V, D];
// each projection w, or w, scales, biases (MLX affine q4/q8, group 64), all with
// the same `bits`. Outputs codes [Q, B] int32 and logits [Q, B, V] of dtype T.

#pragma once

#include <optional>
#include <vector>

#include "decoder_layers_common.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace personaplex {

namespace mx = mlx::core;

struct DepformerSpec {
  int Q, n_in, n_stack, layers, heads, bits;
  float eps, rope_max_period, temp;
  int top_k;
  bool greedy;
};

class DepformerFrame : public mx::Primitive {
 public:
  DepformerFrame(mx::Stream stream, DepformerSpec spec, bool noise)
      : mx::Primitive(stream), s_(spec), noise_(noise) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;

  const char* name() const override { return "DepformerFrame"; }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;

  // Where things sit among the inputs: h, text, forced, pos, [noise], then the
  // weights in depformer_frame()'s order, each projection and layer stack in
  // decoder_layers_common.h's layout.
  int first_weight() const { return noise_ ? 5 : 4; }
  int table_index(int k) const { return first_weight() + s_.n_in * proj_arrays(s_.bits) + k; }
  int stack_index(int k) const {
    return table_index(s_.Q) + (s_.n_stack > 1 ? k : 0) * s_.layers * layer_arrays(s_.bits);
  }
  int head_index(int k) const {
    return stack_index(0) + s_.n_stack * s_.layers * layer_arrays(s_.bits) + k * proj_arrays(s_.bits);
  }
  Proj in_proj(int k) const {
    return proj_at(first_weight() + (s_.n_in > 1 ? k : 0) * proj_arrays(s_.bits), s_.bits);
  }
  LayerInputs layer(int k, int l) const {
    return layer_inputs(stack_index(k) + l * layer_arrays(s_.bits), s_.bits);
  }
  Proj head(int k) const { return proj_at(head_index(k), s_.bits); }
  // Step k's layer stack from x to y over the frame's caches (k caches, then v), in place.
  StackShape step_stack(int k, const std::vector<mx::array>& inputs, std::vector<mx::array>& caches,
                        const mx::array& x, mx::array& y) const;

 private:
  DepformerSpec s_;
  bool noise_;
};

// See above; noise is ignored when greedy (or temp <= 0). Returns {codes, logits}.
std::vector<mx::array> depformer_frame(const mx::array& h, const mx::array& text, const mx::array& forced,
                                       const std::optional<mx::array>& noise,
                                       const std::vector<std::vector<mx::array>>& in_projs,
                                       const std::vector<mx::array>& tables,
                                       const std::vector<std::vector<mx::array>>& stacks,
                                       const std::vector<std::vector<mx::array>>& heads_w, int heads,
                                       int bits, float eps, float rope_max_period, float temp, int top_k,
                                       bool greedy, mx::StreamOrDevice s = {});

}  // namespace personaplex
