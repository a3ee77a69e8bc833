// Streaming causal conv1d of the Mimi codec, for B independent sessions.
//
// One primitive, Conv1dStream(x, previous, weight[, bias][, first]) -> (y, previous'):
// the input (ELU'd first when elu_input, as SEANet does before its convs) is
// appended to `previous`, the last (kernel - 1) * dilation + 1 - stride conv
// inputs of the session, the valid strided/dilated conv of that runs, and the
// last `context` rows of the concatenation become previous'. This is exactly
// models/mimi_layers.ConvCache: the state holds conv *inputs* (post-ELU), so
// stride new samples give one output and a clip equals its chunks.
//
// `first` (bool [B], optional) is the 'replicate' padding of Mimi's 12.5 Hz
// downsampler: where set, the context is the session's first (post-ELU) sample
// repeated instead of `previous`. Clearing the flag afterwards is the caller's.
//
// Layout is channels-last as in MLX: x [B, T, C_in], previous [B, context, C_in],
// weight [C_out, K, C_in / groups], bias [C_out]; y [B, T / stride, C_out].

#pragma once

#include <optional>

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace personaplex {

namespace mx = mlx::core;

class Conv1dStream : public mx::Primitive {
 public:
  Conv1dStream(mx::Stream stream, int stride, int dilation, int groups, bool elu_input,
               bool has_bias, bool has_first)
      : mx::Primitive(stream), stride_(stride), dilation_(dilation), groups_(groups),
        elu_input_(elu_input), has_bias_(has_bias), has_first_(has_first) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;

  const char* name() const override { return "Conv1dStream"; }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;

 private:
  int stride_, dilation_, groups_;
  bool elu_input_, has_bias_, has_first_;
};

// Returns {y [B, T / stride, C_out], previous' [B, context, C_in]}.
std::vector<mx::array> conv1d_stream(const mx::array& x, const mx::array& previous,
                                     const mx::array& weight, const std::optional<mx::array>& bias,
                                     const std::optional<mx::array>& first, int stride, int dilation,
                                     int groups, bool elu_input, mx::StreamOrDevice s = {});

}  // namespace personaplex
