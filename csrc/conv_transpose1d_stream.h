// Streaming transposed (upsampling) conv1d of the Mimi codec, for B sessions.
//
// One primitive, ConvTranspose1dStream(x, partial, weight[, bias]) -> (y, partial'):
// the full transposed conv of x (ELU'd first when elu_input) has T * stride +
// overlap rows, overlap = K - stride; `partial` (the previous frame's overlap,
// without bias) is added to its first `overlap` rows, the first T * stride rows
// plus bias are y, and the last `overlap` rows, without bias, are partial'.
// Exactly models/mimi_layers.ConvTrCache, so a clip equals its chunks.
//
// Layout (MLX's): x [B, T, C_in], partial [B, overlap, C_out],
// weight [C_out, K, C_in / groups] (y[t * stride + k] += w[:, k, :] . x[t]), bias [C_out].

#pragma once

#include <optional>

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace personaplex {

namespace mx = mlx::core;

class ConvTranspose1dStream : public mx::Primitive {
 public:
  ConvTranspose1dStream(mx::Stream stream, int stride, int groups, bool elu_input, bool has_bias)
      : mx::Primitive(stream), stride_(stride), groups_(groups), elu_input_(elu_input),
        has_bias_(has_bias) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;

  const char* name() const override { return "ConvTranspose1dStream"; }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;

 private:
  int stride_, groups_;
  bool elu_input_, has_bias_;
};

// Returns {y [B, T * stride, C_out], partial' [B, K - stride, C_out]}.
std::vector<mx::array> conv_transpose1d_stream(const mx::array& x, const mx::array& partial,
                                               const mx::array& weight,
                                               const std::optional<mx::array>& bias, int stride,
                                               int groups, bool elu_input, mx::StreamOrDevice s = {});

}  // namespace personaplex
