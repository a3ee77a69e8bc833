// Token sampling on the device: temperature, top-k and the Gumbel-max draw in
// one op, so a decode step needs no host round trip to pick its tokens.
//
// SampleTopK(logits[, noise][, forced]) -> tokens, per row r of logits [R, V]:
//   greedy        argmax_i logits[r, i]
//   otherwise     s = float32(logits[r]) / temp (IEEE division, as the reference);
//                 keep s_i >= the top_k-th largest s (all when top_k <= 0 or >= V);
//                 argmax over the kept i of s_i + noise[r, i] (noise: Gumbel
//                 draws from mx.random.gumbel, float32 [R, V]; without noise, of s_i)
//   then          forced[r] >= 0 replaces the token (teacher forcing)
// Ties go to the lowest index, as mx.argmax. NaN logits are ignored: never
// picked, never counted towards the top k (the pure-MLX reference is undefined
// there). Otherwise, with the same noise, the tokens equal the reference's
// (reference.sample_topk) exactly: every comparison is on the same float32 values.
//
// tokens [R] int32. logits float32, bfloat16 or float16.

#pragma once

#include <optional>

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace personaplex {

namespace mx = mlx::core;

class SampleTopK : public mx::Primitive {
 public:
  SampleTopK(mx::Stream stream, float temp, int top_k, bool greedy, bool noise, bool forced)
      : mx::Primitive(stream), temp_(temp), top_k_(top_k), greedy_(greedy), noise_(noise),
        forced_(forced) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;

  const char* name() const override { return "SampleTopK"; }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;

 private:
  float temp_;
  int top_k_;
  bool greedy_, noise_, forced_;
};

// logits [R, V]; noise float32 [R, V] (ignored when greedy); forced int32 [R].
// greedy, or temp <= 0, takes the argmax. Inputs of the primitive: logits, [noise], [forced].
mx::array sample_topk(const mx::array& logits, const std::optional<mx::array>& noise,
                      const std::optional<mx::array>& forced, float temp, int top_k, bool greedy,
                      mx::StreamOrDevice s = {});

}  // namespace personaplex
