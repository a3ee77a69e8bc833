// Streaming attention over a ring KV cache, for B independent sessions.
//
// One primitive, RingAttention(q, k, v, k_cache, v_cache, pos) -> (out, k_cache', v_cache'):
// RoPE on the new q, k (interleaved pairs, as Kyutai's moshi), causal attention
// of each new position p = pos[b] + t over [max(0, p - W + 1), p] (positions
// before pos[b] from the cache, slot p % W; the new ones from k, v), then the new
// rotated k and v written into their slots. Attention reads the old slots before
// any write, so chunks (T > 1) are exact even where they overwrite the ring.
//
// No copy of the cache per step: MLX arrays are immutable, so the updated caches
// take over the input caches' buffers (donation) when nothing else can observe
// them. MLX's own test, array::is_donatable(), requires a reference count of one,
// which never holds for an input of a multi-output primitive (each sibling output
// keeps a copy of the input list); we donate when the only references are those
// sibling copies and the buffer is not shared (see can_donate in the .cpp). When
// the caller still holds the old cache, it is copied instead, and counted.

#pragma once

#include <atomic>
#include <cmath>

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace personaplex {

namespace mx = mlx::core;

class RingAttention : public mx::Primitive {
 public:
  RingAttention(mx::Stream stream, float scale, float rope_max_period)
      : mx::Primitive(stream), scale_(scale), rope_max_period_(rope_max_period) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;

  const char* name() const override { return "RingAttention"; }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;

  float scale() const { return scale_; }
  float rope_max_period() const { return rope_max_period_; }

 private:
  float scale_;
  float rope_max_period_;  // <= 0: no RoPE
};

// Whether output cache `out` may take over input cache `in` (see header comment);
// otherwise `out` gets a fresh buffer and the copy is counted.
bool donate_cache(const mx::array& in, mx::array& out, int siblings);

// Whether input cache `in` is referenced only by the `siblings` input lists of this
// primitive's outputs (no Python handle, no other consumer) and is row-contiguous.
bool cache_unobserved(const mx::array& in, int siblings);
void count_cache_copy();

// RoPE's exponent step -ln(max_period) * 2 / D, formed in double and rounded once
// as Python / torch do; 0 without RoPE (max_period <= 0). Every path uses this one.
inline float rope_step(float max_period, int D) {
  return max_period > 0.f ? static_cast<float>(-std::log(static_cast<double>(max_period)) * 2.0 / D)
                          : 0.f;
}

// q, k, v: [B, H, T, D]; k_cache, v_cache: [B, H, W, D]; pos: int32 [B].
// Returns {out [B, H, T, D], k_cache', v_cache'}.
std::vector<mx::array> ring_attention(
    const mx::array& q, const mx::array& k, const mx::array& v,
    const mx::array& k_cache, const mx::array& v_cache, const mx::array& pos,
    float scale, float rope_max_period, mx::StreamOrDevice s = {});

// How many times a ring cache had to be copied a whole cache because its input could
// not be donated (tests assert this stays flat during decoding).
int64_t ring_cache_copies();

// How many times the CUDA path waited for in-flight work to release a ring cache
// before taking it over (0 on builds without CUDA; see ring_attention_cuda.cpp).
int64_t ring_cache_waits();

}  // namespace personaplex
