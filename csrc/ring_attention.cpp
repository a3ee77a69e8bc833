// Graph construction and the CPU path of RingAttention.
// The CUDA path lives in ring_attention_cuda.cpp (built when MLX has CUDA); Metal is absent.

#include "ring_attention.h"

#include "common.h"
#include "cpu_kernels.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "mlx/backend/cpu/encoder.h"

namespace personaplex {

namespace {

std::atomic<int64_t> g_cache_copies{0};

// Read access to mx::array's private descriptor pointer, only to read its
// reference count (see donate_cache). Explicit instantiation is exempt from
// access checking, which is what makes this standard C++.
struct DescTag {
  friend auto desc_member(DescTag);
};
template <auto Member>
struct DescAccess {
  friend auto desc_member(DescTag) { return Member; }
};
template struct DescAccess<&mx::array::array_desc_>;

long desc_refs(const mx::array& a) { return (a.*desc_member(DescTag{})).use_count(); }

void check(bool ok, const std::string& msg) { personaplex::check(ok, "ring_attention", msg); }

// RoPE as in Kyutai's moshi: pairs (x[2i], x[2i+1]) rotated by p * f_i with
// f_i = max_period^(-2i/D); angles and products in float32, result rounded back
// to the storage type (the reference rounds the same way).
template <typename T>
void rope_row(const T* x, T* y, int D, float position, float max_period) {
  if (max_period <= 0.f) {
    std::memcpy(y, x, sizeof(T) * D);
    return;
  }
  const float step = rope_step(max_period, D);
  for (int i = 0; i < D / 2; ++i) {
    float freq = std::exp(static_cast<float>(i) * step);
    float angle = freq * position;
    float c = std::cos(angle), s = std::sin(angle);
    float re = static_cast<float>(x[2 * i]), im = static_cast<float>(x[2 * i + 1]);
    y[2 * i] = static_cast<T>(re * c - im * s);
    y[2 * i + 1] = static_cast<T>(re * s + im * c);
  }
}

// Row `slot` of a ring as float32: the stored values, or (an 8-bit ring, C = int8_t)
// code * the row's scale.
template <typename C>
void cached_row(const C* ring, const float* scales, size_t slot, int D, float* out) {
  const C* row = ring + slot * D;
  for (int d = 0; d < D; ++d) {
    if constexpr (std::is_same_v<C, int8_t>) {
      out[d] = static_cast<float>(row[d]) * scales[slot];
    } else {
      out[d] = static_cast<float>(row[d]);
    }
  }
}

// C: the ring's storage, T or int8_t (then ks, vs hold the rows' scales).
template <typename T, typename C>
void attend_cpu(const T* q, const T* k, const T* v, const C* kc, const C* vc, const float* ks, const float* vs,
                const int32_t* pos, T* out, T* krot, int B, int H, int T_, int D, int W, float scale,
                float max_period, bool chunk_window) {
  std::vector<T> qrot(D);
  std::vector<float> acc(D), key(D), val(D);
  for (int b = 0; b < B; ++b) {
    const int p0 = pos[b];
    for (int h = 0; h < H; ++h) {
      const size_t new_base = (static_cast<size_t>(b) * H + h) * T_ * D;
      const size_t cache_row = (static_cast<size_t>(b) * H + h) * W;
      for (int t = 0; t < T_; ++t) {
        rope_row(k + new_base + t * D, krot + new_base + t * D, D,
                 static_cast<float>(p0 + t), max_period);
      }
      for (int t = 0; t < T_; ++t) {
        const int p = p0 + t;
        rope_row(q + new_base + t * D, qrot.data(), D, static_cast<float>(p), max_period);
        // Online softmax over the window [max(0, p - W + 1), p]: keys before p0
        // come from the cache (not yet overwritten: writes happen afterwards).
        float m = -INFINITY, l = 0.f;
        std::fill(acc.begin(), acc.end(), 0.f);
        const int end = chunk_window ? p0 + T_ - 1 : p;  // see RingArgs::chunk_window
        for (int j = std::max(0, end - W + 1); j <= p; ++j) {
          if (j < p0) {
            cached_row(kc, ks, cache_row + j % W, D, key.data());
            cached_row(vc, vs, cache_row + j % W, D, val.data());
          } else {
            for (int d = 0; d < D; ++d) {
              key[d] = static_cast<float>(krot[new_base + static_cast<size_t>(j - p0) * D + d]);
              val[d] = static_cast<float>(v[new_base + static_cast<size_t>(j - p0) * D + d]);
            }
          }
          float s = 0.f;
          for (int d = 0; d < D; ++d) s += static_cast<float>(qrot[d]) * key[d];
          s *= scale;
          float m_new = std::max(m, s);
          float correction = std::exp(m - m_new);
          float w = std::exp(s - m_new);
          l = l * correction + w;
          for (int d = 0; d < D; ++d) acc[d] = acc[d] * correction + w * val[d];
          m = m_new;
        }
        T* o = out + new_base + t * D;
        for (int d = 0; d < D; ++d) o[d] = static_cast<T>(acc[d] / l);
      }
    }
  }
}

template <typename T>
void write_cpu(T* cache, const T* nw, const int32_t* pos, int B, int H, int T_, int D, int W) {
  // Only the last W new positions survive when a chunk is longer than the ring.
  const int first = std::max(0, T_ - W);
  for (int b = 0; b < B; ++b) {
    for (int h = 0; h < H; ++h) {
      for (int t = first; t < T_; ++t) {
        const int slot = (pos[b] + t) % W;
        std::memcpy(cache + ((static_cast<size_t>(b) * H + h) * W + slot) * D,
                    nw + ((static_cast<size_t>(b) * H + h) * T_ + t) * D, sizeof(T) * D);
      }
    }
  }
}

// The new rows nw [B, H, T, D] into an 8-bit ring: per row scale = absmax / 127 and
// code = round(x / scale), ties to even (kernels/ring_attention.cuh's Int8Rows).
template <typename T>
void write8_cpu(int8_t* codes, float* scales, const T* nw, const int32_t* pos, int B, int H, int T_, int D,
                int W) {
  const int first = std::max(0, T_ - W);
  for (int b = 0; b < B; ++b) {
    for (int h = 0; h < H; ++h) {
      for (int t = first; t < T_; ++t) {
        const size_t row = (static_cast<size_t>(b) * H + h) * W + (pos[b] + t) % W;
        const T* x = nw + ((static_cast<size_t>(b) * H + h) * T_ + t) * D;
        float amax = 0.f;
        for (int d = 0; d < D; ++d) amax = std::fmax(amax, std::fabs(static_cast<float>(x[d])));
        const float s = amax / 127.f;
        scales[row] = s;
        for (int d = 0; d < D; ++d) {
          const float c = s > 0.f ? std::nearbyint(static_cast<float>(x[d]) / s) : 0.f;
          codes[row * D + d] = static_cast<int8_t>(std::clamp(c, -127.f, 127.f));
        }
      }
    }
  }
}

}  // namespace

void cpu::ring_attend(mx::Dtype dtype, const void* q, const void* k, const void* v, const void* kc,
                      const void* vc, const int32_t* pos, void* out, void* k_rot, int B, int H, int T,
                      int D, int W, float scale, float rope_max_period, bool chunk_window) {
  dispatch_float("ring_attention", dtype, [&](auto zero) {
    using T_ = decltype(zero);
    attend_cpu<T_, T_>(static_cast<const T_*>(q), static_cast<const T_*>(k), static_cast<const T_*>(v),
                       static_cast<const T_*>(kc), static_cast<const T_*>(vc), nullptr, nullptr, pos,
                       static_cast<T_*>(out), static_cast<T_*>(k_rot), B, H, T, D, W, scale, rope_max_period,
                       chunk_window);
  });
}

void cpu::ring_attend8(mx::Dtype dtype, const void* q, const void* k, const void* v, const int8_t* kc,
                       const int8_t* vc, const float* ks, const float* vs, const int32_t* pos, void* out,
                       void* k_rot, int B, int H, int T, int D, int W, float scale, float rope_max_period,
                       bool chunk_window) {
  dispatch_float("ring_attention", dtype, [&](auto zero) {
    using T_ = decltype(zero);
    attend_cpu<T_, int8_t>(static_cast<const T_*>(q), static_cast<const T_*>(k), static_cast<const T_*>(v), kc, vc,
                           ks, vs, pos, static_cast<T_*>(out), static_cast<T_*>(k_rot), B, H, T, D, W, scale,
                           rope_max_period, chunk_window);
  });
}

void cpu::ring_write8(mx::Dtype dtype, int8_t* codes, float* scales, const void* nw, const int32_t* pos, int B,
                      int H, int T, int D, int W) {
  dispatch_float("ring_attention", dtype, [&](auto zero) {
    using T_ = decltype(zero);
    write8_cpu<T_>(codes, scales, static_cast<const T_*>(nw), pos, B, H, T, D, W);
  });
}

void cpu::ring_write(mx::Dtype dtype, void* cache, const void* nw, const int32_t* pos, int B, int H,
                     int T, int D, int W) {
  dispatch_float("ring_attention", dtype, [&](auto zero) {
    using T_ = decltype(zero);
    write_cpu<T_>(static_cast<T_*>(cache), static_cast<const T_*>(nw), pos, B, H, T, D, W);
  });
}

int64_t ring_cache_copies() { return g_cache_copies.load(); }

std::vector<mx::array> ring_attention(const mx::array& q, const mx::array& k, const mx::array& v,
                                      const mx::array& k_cache, const mx::array& v_cache,
                                      const mx::array& pos, float scale, float rope_max_period,
                                      mx::StreamOrDevice s) {
  check(q.ndim() == 4, "q must be [B, H, T, D], got " + shape_str(q));
  check(k.shape() == q.shape() && v.shape() == q.shape(),
        "q, k, v shapes differ: " + shape_str(q) + ", " + shape_str(k) + ", " + shape_str(v));
  const int B = q.shape(0), H = q.shape(1), D = q.shape(3);
  check(D % 2 == 0, "head dim must be even");
  check(k_cache.ndim() == 4 && k_cache.shape(0) == B && k_cache.shape(1) == H &&
            k_cache.shape(3) == D && v_cache.shape() == k_cache.shape(),
        "caches must be [B, H, W, D] matching q; got " + shape_str(k_cache) + " and " +
            shape_str(v_cache));
  check(pos.ndim() == 1 && pos.shape(0) == B, "pos must be [B], got " + shape_str(pos));
  const auto dt = q.dtype();
  check(k.dtype() == dt && v.dtype() == dt && k_cache.dtype() == dt && v_cache.dtype() == dt,
        "q, k, v and the caches must share one dtype");
  auto st = mx::to_stream(s);

  // Kernels read dense rows: make every input row-contiguous (a no-op when it is).
  auto c = [&](const mx::array& a) { return mx::contiguous(a, false, st); };
  auto p = c(mx::astype(pos, mx::int32, st));  // a broadcast position has stride 0
  auto prim = std::make_shared<RingAttention>(st, scale, rope_max_period);
  return mx::array::make_arrays({q.shape(), k_cache.shape(), v_cache.shape()}, {dt, dt, dt}, prim,
                                {c(q), c(k), c(v), c(k_cache), c(v_cache), p});
}

bool cache_unobserved(const mx::array& in, int siblings) {
  return desc_refs(in) == siblings && in.flags().row_contiguous;
}

void count_cache_copy() { g_cache_copies.fetch_add(1); }

bool donate_cache(const mx::array& in, mx::array& out, int siblings) {
  // Unobserved, and the buffer is not shared with another array (a view, or a
  // pending task of an earlier op in this eval).
  const bool ok = cache_unobserved(in, siblings) && in.data_shared_ptr().use_count() == 1 &&
                  in.data_shared_ptr()->is_owned();
  if (ok) {
    out.copy_shared_buffer(in);
  } else {
    out.set_data(mx::allocator::malloc(out.nbytes()));
    count_cache_copy();
  }
  return ok;
}

bool RingAttention::is_equivalent(const mx::Primitive& other) const {
  auto& o = static_cast<const RingAttention&>(other);
  return scale_ == o.scale_ && rope_max_period_ == o.rope_max_period_;
}

std::vector<mx::Shape> RingAttention::output_shapes(const std::vector<mx::array>& inputs) {
  return {inputs[0].shape(), inputs[3].shape(), inputs[4].shape()};
}

void RingAttention::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& q = inputs[0];
  auto& out = outputs[0];
  out.set_data(mx::allocator::malloc(out.nbytes()));
  const int n_out = static_cast<int>(outputs.size());
  const bool k_donated = donate_cache(inputs[3], outputs[1], n_out);
  const bool v_donated = donate_cache(inputs[4], outputs[2], n_out);
  auto& enc = cpu_encoder(stream(), inputs, outputs);
  const int B = q.shape(0), H = q.shape(1), T = q.shape(2), D = q.shape(3);
  const int W = inputs[3].shape(2);
  // The rotated new keys: a temporary, kept alive until the task has run.
  mx::array k_rot(q.shape(), q.dtype(), nullptr, {});
  k_rot.set_data(mx::allocator::malloc(k_rot.nbytes()));
  enc.add_temporary(k_rot);
  dispatch_float("ring_attention", q.dtype(), [&](auto zero) {
    using T_ = decltype(zero);
    enc.dispatch([q = q.data<T_>(), k = inputs[1].data<T_>(), v = inputs[2].data<T_>(),
                  kc = inputs[3].data<T_>(), vc = inputs[4].data<T_>(),
                  pos = inputs[5].data<int32_t>(), o = out.data<T_>(), kr = k_rot.data<T_>(),
                  kc_out = outputs[1].data<T_>(), vc_out = outputs[2].data<T_>(),
                  bytes = outputs[1].nbytes(), k_donated, v_donated, B, H, T, D, W,
                  scale = scale_, mp = rope_max_period_]() {
      attend_cpu<T_, T_>(q, k, v, kc, vc, nullptr, nullptr, pos, o, kr, B, H, T, D, W, scale, mp, false);
      // Writes last: the attention above read the old slots.
      if (!k_donated) std::memcpy(kc_out, kc, bytes);
      if (!v_donated) std::memcpy(vc_out, vc, bytes);
      write_cpu<T_>(kc_out, kr, pos, B, H, T, D, W);
      write_cpu<T_>(vc_out, v, pos, B, H, T, D, W);
    });
  });
}

}  // namespace personaplex
