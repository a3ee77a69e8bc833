// The tick program's CPU path (see tick.h): each op on host memory, through the
// primitives' CPU kernels (cpu_kernels.h) and, for the program's own ops, the CPU
// twins of kernels/tick.cuh below (tests/test_tick_emulator.py checks each against
// its body).

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "common.h"
#include "cpu_kernels.h"
#include "tick.h"

namespace personaplex {

namespace {

constexpr const char* kOp = "tick";

template <class... Fs>
struct Overloaded : Fs... {
  using Fs::operator()...;
};

template <typename T>
void norm_cpu(const T* x, const T* w, const T* b, T* out, const NormArgs& a) {
  for (int r = 0; r < a.rows; ++r) {
    const T* xr = x + static_cast<size_t>(r) * a.dim;
    T* yr = out + static_cast<size_t>(r) * a.dim;
    if (a.layer) {
      float s = 0.f;
      for (int c = 0; c < a.dim; ++c) s += static_cast<float>(xr[c]);
      const float mean = s / static_cast<float>(a.dim);
      float v = 0.f;
      for (int c = 0; c < a.dim; ++c) {
        const float d = static_cast<float>(xr[c]) - mean;
        v += d * d;
      }
      const float inv = 1.f / std::sqrt(v / static_cast<float>(a.dim) + a.eps);
      for (int c = 0; c < a.dim; ++c) {
        yr[c] = static_cast<T>((static_cast<float>(xr[c]) - mean) * inv * static_cast<float>(w[c]) +
                               static_cast<float>(b[c]));
      }
    } else {
      float s = 0.f;
      for (int c = 0; c < a.dim; ++c) s += static_cast<float>(xr[c]) * static_cast<float>(xr[c]);
      const float inv = 1.f / std::sqrt(s / static_cast<float>(a.dim) + a.eps);
      for (int c = 0; c < a.dim; ++c) {
        yr[c] = static_cast<T>(static_cast<float>(w[c]) * (static_cast<float>(xr[c]) * inv));
      }
    }
  }
}

template <typename T>
void gelu_cpu(const T* x, T* out, long n) {
  for (long i = 0; i < n; ++i) {
    const float v = static_cast<float>(x[i]);
    out[i] = static_cast<T>(v * (1.f + std::erf(v * 0.70710678118654752f)) / 2.f);
  }
}

template <typename T>
void scale_add_cpu(const T* x, const T* s, const T* y, T* out, const RowsArgs& a) {
  const long n = static_cast<long>(a.rows) * a.cols;
  for (long i = 0; i < n; ++i) {
    float v = static_cast<float>(y[i]);
    if (s) v = static_cast<float>(static_cast<T>(static_cast<float>(s[i % a.cols]) * v));
    out[i] = static_cast<T>(static_cast<float>(x[i]) + v);
  }
}

int ring_slot(int t, int R) {
  const int s = t % R;
  return s < 0 ? s + R : s;
}

void frame_in_cpu(int32_t* tokens, int32_t* forced, const int32_t* offsets, const int32_t* delays,
                  const int32_t* sem, const int32_t* ac, int n_ac, int32_t* cur, int32_t* now,
                  const FrameArgs& a) {
  const int S = 1 + a.n_q, G = 1 + a.dep_q;
  for (int b = 0; b < a.B; ++b) {
    const int o = offsets[b];
    int32_t* tr = tokens + static_cast<size_t>(b) * S * a.R;
    int32_t* fr = forced + static_cast<size_t>(b) * G * a.R;
    for (int c = 0; c < a.user_q; ++c) {
      const int s = 1 + a.dep_q + c;
      tr[s * a.R + ring_slot(o + delays[s], a.R)] =
          c < a.n_sem ? sem[b * a.n_sem + c] : ac[b * n_ac + (c - a.n_sem)];
    }
    for (int j = 0; j < G; ++j) fr[j * a.R + ring_slot(o + 1 + delays[j], a.R)] = kTokenNotForced;
    for (int s = 0; s < S; ++s) {
      cur[s * a.B + b] = o <= delays[s] ? (s == 0 ? a.text_initial : a.audio_initial)
                                        : tr[s * a.R + ring_slot(o, a.R)];
    }
    for (int j = 0; j < G; ++j) now[j * a.B + b] = fr[j * a.R + ring_slot(o + 1, a.R)];
  }
}

void frame_out_cpu(int32_t* tokens, int32_t* offsets, const int32_t* delays, const int32_t* gen,
                   int32_t* out, int32_t* sem, int32_t* ac, int32_t* valid, const FrameArgs& a) {
  const int S = 1 + a.n_q, G = 1 + a.dep_q, n_ac = a.dep_q - a.n_sem;
  for (int b = 0; b < a.B; ++b) {
    const int o = offsets[b] + 1;
    offsets[b] = o;
    int32_t* tr = tokens + static_cast<size_t>(b) * S * a.R;
    for (int j = 0; j < G; ++j) tr[j * a.R + ring_slot(o, a.R)] = gen[j * a.B + b];
    const bool ok = o > a.max_delay;
    valid[b] = ok;
    for (int j = 0; j < G; ++j) {
      const int t = ok ? tr[j * a.R + ring_slot(o - a.max_delay + delays[j], a.R)] : kTokenUngenerated;
      out[b * G + j] = t;
      if (j == 0) continue;
      const int code = !ok || t < 0 ? 0 : std::min(t, a.card - 1);
      if (j - 1 < a.n_sem) {
        sem[b * a.n_sem + (j - 1)] = code;
      } else {
        ac[b * n_ac + (j - 1 - a.n_sem)] = code;
      }
    }
  }
}

// Philox4x32-10, as kernels/tick.cuh.
void philox(uint32_t* c, uint32_t k0, uint32_t k1) {
  for (int r = 0; r < 10; ++r) {
    const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c[0];
    const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c[2];
    const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c[1] ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c[3] ^ k1;
    c[0] = n0;
    c[1] = static_cast<uint32_t>(p1);
    c[2] = n2;
    c[3] = static_cast<uint32_t>(p0);
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
}

void gumbel_cpu(const uint32_t* seeds, const int32_t* offsets, float* out, const GumbelArgs& a) {
  for (int s = 0; s < a.streams; ++s) {
    for (int b = 0; b < a.B; ++b) {
      float* row = out + (static_cast<size_t>(s) * a.B + b) * a.V;
      for (int v0 = 0; v0 < a.V; v0 += 4) {
        uint32_t c[4] = {static_cast<uint32_t>(v0 >> 2), static_cast<uint32_t>(offsets[b]),
                         static_cast<uint32_t>(a.stream0 + s), 0x7069636bu};
        philox(c, seeds[b], 0x706c6578u);
        for (int e = 0; e < 4 && v0 + e < a.V; ++e) {
          const float u = (static_cast<float>(c[e] >> 8) + 0.5f) * (1.f / 16777216.f);
          row[v0 + e] = -std::log(-std::log(u));
        }
      }
    }
  }
}

}  // namespace

void TickProgram::run_cpu_op(const prog::Op& op) {
  auto p = [&](int h) { return at(h); };
  auto ip = [&](int h) { return static_cast<int32_t*>(at(h)); };
  std::visit(
      Overloaded{
          [&](const prog::Matvec& o) {
            const auto& a = o.args;
            cpu::matvec(mem(o.x).dtype, p(o.x), p(o.w), p(o.scales), p(o.biases), p(o.alpha), p(o.residual),
                        p(o.out), a.M, a.K, a.gate ? 2 * a.n_out : a.n_out, o.bits, a.gate, a.eps);
          },
          [&](const prog::Attention& o) {
            const RingArgs& a = o.args;
            const auto dt = mem(o.q).dtype;
            const size_t es = mx::size_of(dt), row = static_cast<size_t>(a.D) * es;
            const size_t n = static_cast<size_t>(a.B) * a.H * a.T;
            std::vector<char> q(n * row), k(n * row), v(n * row), out(n * row), krot(n * row);
            auto gather = [&](const void* src, char* dst) {
              for (int b = 0; b < a.B; ++b)
                for (int h = 0; h < a.H; ++h)
                  for (int t = 0; t < a.T; ++t)
                    std::memcpy(dst + ((static_cast<size_t>(b) * a.H + h) * a.T + t) * row,
                                static_cast<const char*>(src) + (b * a.new_b + h * a.new_h + t * a.new_t) * es, row);
            };
            gather(p(o.q), q.data());
            gather(p(o.k), k.data());
            gather(p(o.v), v.data());
            const int32_t* pos = ip(o.pos);
            if (o.ks >= 0) {
              auto* kc = static_cast<int8_t*>(p(o.kc));
              auto* vc = static_cast<int8_t*>(p(o.vc));
              auto* ks = static_cast<float*>(p(o.ks));
              auto* vs = static_cast<float*>(p(o.vs));
              cpu::ring_attend8(dt, q.data(), k.data(), v.data(), kc, vc, ks, vs, pos, out.data(), krot.data(), a.B,
                                a.H, a.T, a.D, a.W, a.scale, o.rope_max_period, a.chunk_window != 0);
              cpu::ring_write8(dt, kc, ks, krot.data(), pos, a.B, a.H, a.T, a.D, a.W);
              cpu::ring_write8(dt, vc, vs, v.data(), pos, a.B, a.H, a.T, a.D, a.W);
            } else {
              cpu::ring_attend(dt, q.data(), k.data(), v.data(), p(o.kc), p(o.vc), pos, out.data(), krot.data(),
                               a.B, a.H, a.T, a.D, a.W, a.scale, o.rope_max_period, a.chunk_window != 0);
              cpu::ring_write(dt, p(o.kc), krot.data(), pos, a.B, a.H, a.T, a.D, a.W);
              cpu::ring_write(dt, p(o.vc), v.data(), pos, a.B, a.H, a.T, a.D, a.W);
            }
            char* dst = static_cast<char*>(p(o.out));
            for (int b = 0; b < a.B; ++b)
              for (int h = 0; h < a.H; ++h)
                for (int t = 0; t < a.T; ++t) {
                  const size_t src = ((static_cast<size_t>(b) * a.H + h) * a.T + t) * row;
                  const size_t at_ = a.out_t ? (b * a.out_b + h * a.out_h + t * a.out_t) * es : src;
                  std::memcpy(dst + at_, out.data() + src, row);
                }
          },
          [&](const prog::Conv1d& o) {
            const auto& c = o.conv;
            cpu::conv1d_stream(mem(o.x).dtype, p(o.x), p(o.state), p(o.w), p(o.bias),
                               static_cast<const bool*>(p(o.first)), p(o.y), p(o.state), c.B, c.T, c.C_in,
                               c.C_out, c.K, c.context, c.stride, c.dilation, c.groups, o.gather.elu != 0);
          },
          [&](const prog::ConvTranspose1d& o) {
            const auto& c = o.conv;
            cpu::conv_transpose1d_stream(mem(o.x).dtype, p(o.x), p(o.partial), p(o.w), p(o.bias), p(o.y),
                                         p(o.partial), c.B, c.T, c.C_in, c.C_out, c.K, c.stride, c.groups,
                                         o.elu != 0);
          },
          [&](const prog::RvqEncode& o) {
            const auto& a = o.args;
            cpu::rvq_encode(static_cast<const float*>(p(o.x)), static_cast<const float*>(p(o.books)), ip(o.codes),
                            a.n, a.n_q, a.bins, a.D);
          },
          [&](const prog::RvqDecode& o) {
            const auto& a = o.args;
            cpu::rvq_decode(ip(o.codes), static_cast<const float*>(p(o.books)), static_cast<float*>(p(o.out)),
                            a.n, a.n_q, a.bins, a.D);
          },
          [&](const prog::Gumbel& o) {
            gumbel_cpu(static_cast<const uint32_t*>(p(o.seeds)), ip(o.offsets), static_cast<float*>(p(o.out)),
                       o.args);
          },
          [&](const prog::Sample& o) {
            const auto& a = o.args;
            cpu::sample_topk(mem(o.logits).dtype, p(o.logits), static_cast<const float*>(p(o.noise)),
                             ip(o.forced), ip(o.out), o.rows, a.V, a.temp, a.top_k, a.greedy != 0);
          },
          [&](const prog::EmbedAdd& o) {
            const auto& a = o.args;
            cpu::embed_add(mem(o.pre).dtype, p(o.pre), p(o.table), ip(o.tokens), p(o.out), a.B, a.D, a.rows);
          },
          [&](const prog::Norm& o) {
            dispatch_float(kOp, mem(o.x).dtype, [&](auto zero) {
              using T = decltype(zero);
              norm_cpu<T>(static_cast<const T*>(p(o.x)), static_cast<const T*>(p(o.w)),
                          static_cast<const T*>(p(o.b)), static_cast<T*>(p(o.out)), o.args);
            });
          },
          [&](const prog::Gelu& o) {
            dispatch_float(kOp, mem(o.x).dtype, [&](auto zero) {
              using T = decltype(zero);
              gelu_cpu<T>(static_cast<const T*>(p(o.x)), static_cast<T*>(p(o.out)),
                          static_cast<long>(o.args.rows) * o.args.cols);
            });
          },
          [&](const prog::ScaleAdd& o) {
            dispatch_float(kOp, mem(o.x).dtype, [&](auto zero) {
              using T = decltype(zero);
              scale_add_cpu<T>(static_cast<const T*>(p(o.x)), static_cast<const T*>(p(o.scale)),
                               static_cast<const T*>(p(o.y)), static_cast<T*>(p(o.out)), o.args);
            });
          },
          [&](const prog::FrameIn& o) {
            frame_in_cpu(ip(o.tokens), ip(o.forced), ip(o.offsets), ip(o.delays), ip(o.sem), ip(o.ac), o.n_ac,
                         ip(o.cur), ip(o.now), o.args);
          },
          [&](const prog::FrameOut& o) {
            frame_out_cpu(ip(o.tokens), ip(o.offsets), ip(o.delays), ip(o.gen), ip(o.out), ip(o.sem), ip(o.ac),
                          ip(o.valid), o.args);
          },
          [&](const prog::FillRows& o) {
            const auto* regions = static_cast<const FillRegion*>(p(o.regions));
            const int32_t* control = ip(o.control);
            for (int b = 0; b < o.B; ++b) {
              for (int r = 0; r < o.n; ++r) {
                const FillRegion& g = regions[r];
                if (!(control[b * o.control_cols] & g.mask)) continue;
                const uint32_t pattern = g.control_col >= 0
                                             ? static_cast<uint32_t>(control[b * o.control_cols + g.control_col])
                                             : g.pattern;
                unsigned char* row = reinterpret_cast<unsigned char*>(host_base_) + g.offset + b * g.row_bytes;
                for (long i = 0; i < g.row_bytes; ++i) row[i] = static_cast<unsigned char>(pattern >> (8 * (i & 3)));
              }
            }
          },
          [&](const prog::Update& o) {
            const auto* entries = static_cast<const UpdateEntry*>(p(o.entries));
            for (int e = 0; e < o.n; ++e) {
              const UpdateEntry& u = entries[e];
              for (int i = 0; i < u.count; ++i) {
                if (u.mode == 0) {
                  reinterpret_cast<int32_t*>(host_base_ + u.offset)[i] += u.value;
                } else {
                  reinterpret_cast<unsigned char*>(host_base_ + u.offset)[i] = static_cast<unsigned char>(u.value);
                }
              }
            }
          },
          [&](const prog::Mute& o) {
            const float* x = static_cast<const float*>(p(o.x));
            float* y = static_cast<float*>(p(o.out));
            const int32_t* valid = ip(o.valid);
            const long n = static_cast<long>(o.args.rows) * o.args.cols;
            for (long i = 0; i < n; ++i) y[i] = valid[i / o.args.cols] ? x[i] : 0.f;
          },
          [&](const prog::Copy& o) { std::memmove(p(o.dst), p(o.src), o.bytes); },
          [&](const prog::Gemm& o) {
            dispatch_float(kOp, mem(o.x).dtype, [&](auto zero) {
              using T = decltype(zero);
              const T* x = static_cast<const T*>(p(o.x));
              const T* w = static_cast<const T*>(p(o.w));
              T* y = static_cast<T*>(p(o.y));
              for (int m = 0; m < o.M; ++m) {
                for (int n = 0; n < o.N; ++n) {
                  float s = o.accumulate ? static_cast<float>(y[static_cast<size_t>(m) * o.N + n]) : 0.f;
                  for (int k = 0; k < o.K; ++k) {
                    s += static_cast<float>(x[static_cast<size_t>(m) * o.K + k]) *
                         static_cast<float>(w[static_cast<size_t>(n) * o.K + k]);
                  }
                  y[static_cast<size_t>(m) * o.N + n] = static_cast<T>(s);
                }
              }
            });
          },
          [&](const prog::Gate& o) {
            dispatch_float(kOp, mem(o.x).dtype, [&](auto zero) {
              using T = decltype(zero);
              auto rt = [](float v) { return static_cast<float>(static_cast<T>(v)); };
              const T* x = static_cast<const T*>(p(o.x));
              T* y = static_cast<T*>(p(o.out));
              const int n = o.args.cols;
              for (int r = 0; r < o.args.rows; ++r) {
                for (int j = 0; j < n; ++j) {
                  const float g = static_cast<float>(x[static_cast<size_t>(r) * 2 * n + j]);
                  const float v = static_cast<float>(x[static_cast<size_t>(r) * 2 * n + n + j]);
                  const float sig = rt(1.f / (1.f + std::exp(-g)));
                  y[static_cast<size_t>(r) * n + j] = static_cast<T>(rt(rt(g * sig) * v));
                }
              }
            });
          },
      },
      op);
}

}  // namespace personaplex
