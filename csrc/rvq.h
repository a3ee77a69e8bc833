// Residual vector quantisation of the Mimi codec: all codebooks in one op.
//
// RvqEncode(x, codebooks) -> codes: for q = 0..n_q-1, code q is the entry of
// codebook q nearest (L2) to the residual, which then loses that entry. Distances
// are float32 and formed as the reference does, |r|^2 - 2 r.e + |e|^2, so the
// argmins agree up to dot-product summation order; ties go to the lowest index
// (as mx.argmin). The residual is carried in float32.
//
// RvqDecode(codes, codebooks) -> sum over q of codebooks[q, codes[..., q]], in
// order q = 0, 1, ... (float32). Codes outside [0, bins) are clamped (the
// reference's gather leaves them undefined).
//
// Layout: x [..., D] float32, codebooks [n_q, bins, D] float32, codes [..., n_q] int32.

#pragma once

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace personaplex {

namespace mx = mlx::core;

class RvqEncode : public mx::Primitive {
 public:
  explicit RvqEncode(mx::Stream stream) : mx::Primitive(stream) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  const char* name() const override { return "RvqEncode"; }
  bool is_equivalent(const mx::Primitive&) const override { return true; }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
};

class RvqDecode : public mx::Primitive {
 public:
  explicit RvqDecode(mx::Stream stream) : mx::Primitive(stream) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  const char* name() const override { return "RvqDecode"; }
  bool is_equivalent(const mx::Primitive&) const override { return true; }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
};

// x [..., D] (cast to float32), codebooks [n_q, bins, D] (cast to float32) -> codes [..., n_q] int32.
mx::array rvq_encode(const mx::array& x, const mx::array& codebooks, mx::StreamOrDevice s = {});

// codes [..., n_q] (cast to int32), codebooks [n_q, bins, D] -> [..., D] float32.
mx::array rvq_decode(const mx::array& codes, const mx::array& codebooks, mx::StreamOrDevice s = {});

}  // namespace personaplex
