// Matrix-vector products of the decode step (a few rows of activations times a
// whole weight matrix), with the epilogues around every linear layer of the
// transformer fused in.
//
// One primitive, Matvec(x, w[, scales, biases][, alpha][, residual]) -> y:
//   x0 = alpha given ? T(alpha * rms_normalize(x, eps)) : x  (float32 inside)
//   z  = x0 @ W^T, float32 accumulation, rounded to T
//   y  = gate ? T(T(g * T(sigmoid(g))) * v) with g, v = the first and second
//        half of z's columns : z
//   y  = residual given ? T(residual + y) : y
// where T is x's dtype (float32, bfloat16 or float16) and W is either dense
// (w [N, K] of dtype T) or MLX's affine quantization with group size 64
// (w uint32 [N, K * bits / 32], scales and biases [N, K / 64] of dtype T:
// W = scale * q + bias), exactly what mx.quantize returns, so converted
// checkpoints are used as they are. The rounding points are those of the
// pure-MLX reference (reference.matvec); the sums are float32 on every device.
//
// Shapes: x [M, K]; alpha [K]; residual [M, n_out]; y [M, n_out] with
// n_out = N, or N / 2 when gated. Any M is correct. On CUDA, kernels/matvec.cuh
// streams the weights once per 8 rows of x; for 16-bit x with K a multiple of 256,
// from 2 rows (PERSONAPLEX_MATVEC_TC_MIN_ROWS moves that), kernels/matvec_tc.cuh reads them
// once per 64 rows on the tensor cores and dequantises 4/8-bit weights to T first,
// W = T(scale * q + bias), as mx.dequantize does (the sums stay float32).

#pragma once

#include <optional>

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace personaplex {

namespace mx = mlx::core;

class Matvec : public mx::Primitive {
 public:
  Matvec(mx::Stream stream, int bits, bool norm, bool gate, bool residual, float eps)
      : mx::Primitive(stream), bits_(bits), norm_(norm), gate_(gate), residual_(residual), eps_(eps) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;

  const char* name() const override { return "Matvec"; }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;

  int bits() const { return bits_; }  // 0: dense
  bool norm() const { return norm_; }
  bool gate() const { return gate_; }
  bool residual() const { return residual_; }
  float eps() const { return eps_; }

 private:
  int bits_;
  bool norm_, gate_, residual_;
  float eps_;
};

// bits: 0 for dense w, else 4 or 8 (then scales and biases are required).
// Inputs of the primitive, in order: x, w, [scales, biases], [alpha], [residual].
mx::array matvec(const mx::array& x, const mx::array& w, const std::optional<mx::array>& scales,
                 const std::optional<mx::array>& biases, const std::optional<mx::array>& alpha,
                 const std::optional<mx::array>& residual, int bits, bool gate, float eps,
                 mx::StreamOrDevice s = {});

}  // namespace personaplex
