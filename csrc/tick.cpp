// The tick program's bookkeeping, its CPU path and the Tick primitive's graph
// construction (see tick.h). The CUDA path lives in tick_cuda.cpp.

#include "tick.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <stdexcept>

#include "common.h"
#include "cpu_kernels.h"
#include "mlx/backend/cpu/encoder.h"
#include "ring_attention.h"  // rope_step

namespace personaplex {

namespace {

constexpr const char* kOp = "tick";

#ifdef PERSONAPLEX_CUDA_BUILD
}  // namespace
void* device_ptr(const mx::array& a);  // tick_cuda.cpp
namespace {
#endif
constexpr long kAlign = 256;

void check(bool ok, const std::string& msg) { personaplex::check(ok, kOp, msg); }

template <class... Fs>
struct Overloaded : Fs... {
  using Fs::operator()...;
};

// ---------------------------------------------------------------- CPU kernels of the program's own ops

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

// ------------------------------------------------------------------------ TickProgram

TickProgram::TickProgram(bool gpu, int device) : gpu_(gpu), device_(device) {
#ifndef PERSONAPLEX_CUDA_BUILD
  check(!gpu, "this build has no CUDA kernels: a GPU tick program cannot run");
#endif
}

void TickProgram::check_handle(int h, const char* what) const {
  check(h >= 0 && h < static_cast<int>(mems_.size()), std::string("no memory handle ") + std::to_string(h) +
                                                          " (" + what + ")");
}

int TickProgram::buffer(long bytes, mx::Dtype dtype) {
  check(!sealed_, "buffers must be made before the first tick");
  check(bytes >= 0, "a buffer needs bytes >= 0");
  mems_.push_back({.weight = -1, .offset = arena_bytes_, .bytes = bytes, .dtype = dtype});
  arena_bytes_ += (bytes + kAlign - 1) / kAlign * kAlign;
  return static_cast<int>(mems_.size()) - 1;
}

void TickProgram::init(int h, const mx::array& data) {
  check_handle(h, "init");
  const Mem& m = mems_[h];
  check(m.weight < 0 && static_cast<long>(data.nbytes()) == m.bytes,
        "init: " + std::to_string(data.nbytes()) + " bytes for a region of " + std::to_string(m.bytes));
  check(data.is_available() && data.flags().row_contiguous, "init: the data must be evaluated and contiguous");
  std::vector<char> bytes(m.bytes);
  std::memcpy(bytes.data(), data.data<char>(), m.bytes);
  if (sealed_) {
    write(h, 0, data);
  } else {
    inits_.emplace_back(h, std::move(bytes));
  }
}

int TickProgram::weight(const mx::array& a) {
  check(a.is_available() && a.flags().row_contiguous,
        "weights must be evaluated and row-contiguous (mx.eval them, mx.contiguous if needed)");
  weights_.push_back(a);
  mems_.push_back({.weight = static_cast<int>(weights_.size()) - 1, .offset = 0, .bytes = static_cast<long>(a.nbytes()),
                   .dtype = a.dtype()});
  return static_cast<int>(mems_.size()) - 1;
}

int TickProgram::view(int h, long offset, mx::Dtype dtype) {
  check_handle(h, "view");
  Mem m = mems_[h];
  check(offset >= 0 && (m.bytes < 0 || offset <= m.bytes), "view offset out of range");
  m.offset += offset;
  if (m.bytes >= 0) m.bytes -= offset;
  m.dtype = dtype;
  mems_.push_back(m);
  return static_cast<int>(mems_.size()) - 1;
}

void TickProgram::reset_region(int h, long row_bytes, int mask, uint32_t pattern, int control_col) {
  check_handle(h, "reset_region");
  check(mems_[h].weight < 0, "reset_region: only arena regions are session state");
  check(mems_[h].bytes >= row_bytes * B_ && B_ > 0, "reset_region: the region must hold B rows (set_io first)");
  regions_.push_back({.offset = mems_[h].offset, .row_bytes = row_bytes, .pattern = pattern, .control_col = control_col,
                      .mask = mask, .pad = 0});
}

void TickProgram::update_region(int h, int count, int mode, int value) {
  check_handle(h, "update_region");
  check(mems_[h].weight < 0 && (mode == 0 || mode == 1), "update_region: an arena region, mode 0 or 1");
  updates_.push_back({.offset = mems_[h].offset, .count = count, .mode = mode, .value = value, .pad = 0});
}

void TickProgram::set_io(int pcm_in, int control, int pcm_out, int tokens, int B, int F, int C, int G) {
  for (int h : {pcm_in, control, pcm_out, tokens}) check_handle(h, "set_io");
  check(C >= 1, "control needs the reset column");
  pcm_in_ = pcm_in, control_ = control, pcm_out_ = pcm_out, tokens_ = tokens;
  B_ = B, F_ = F, C_ = C, G_ = G;
}

void TickProgram::check_op(const prog::Op& op) const {
  std::visit([&](const auto& o) {
    (void)o;
  }, op);
}

void TickProgram::add(prog::Op op) {
  check(!sealed_, "ops must be added before the first tick");
  check_op(op);
  ops_.push_back(std::move(op));
}

void* TickProgram::at(int h) const {
  if (h < 0) return nullptr;
  const Mem& m = mems_.at(h);
  char* base;
  if (m.weight >= 0) {
    const auto& w = weights_[m.weight];
#ifdef PERSONAPLEX_CUDA_BUILD
    base = gpu_ ? static_cast<char*>(device_ptr(w)) : const_cast<char*>(w.data<char>());
#else
    base = const_cast<char*>(w.data<char>());
#endif
  } else {
    base = static_cast<char*>(gpu_ ? cuda_base_ : host_base_);
  }
  return base + m.offset;
}

void TickProgram::materialize() {
  if (sealed_) return;
  // The reset and update tables become arena regions with their contents.
  auto table = [&](const void* data, long bytes) {
    const int h = buffer(bytes, mx::uint8);
    std::vector<char> b(bytes);
    std::memcpy(b.data(), data, bytes);
    inits_.emplace_back(h, std::move(b));
    return h;
  };
  if (!regions_.empty()) {
    const int h = table(regions_.data(), static_cast<long>(regions_.size() * sizeof(FillRegion)));
    ops_.insert(ops_.begin(), prog::FillRows{.regions = h, .control = control_, .n = static_cast<int>(regions_.size()),
                                             .B = B_, .control_cols = C_});
    fill_op_ = 0;
  }
  if (!updates_.empty()) {
    const int h = table(updates_.data(), static_cast<long>(updates_.size() * sizeof(UpdateEntry)));
    int count = 0;
    for (const auto& u : updates_) count = std::max(count, u.count);
    ops_.push_back(prog::Update{.entries = h, .n = static_cast<int>(updates_.size()), .count = count});
  }
  sealed_ = true;
  if (!gpu_) {
    host_.assign(arena_bytes_ + 64, 0);
    host_base_ = host_.data() + (64 - reinterpret_cast<uintptr_t>(host_.data()) % 64) % 64;
    for (auto& [h, bytes] : inits_) std::memcpy(at(h), bytes.data(), bytes.size());
    inits_.clear();
  }
  // GPU programs: tick_cuda.cpp allocates and fills the arena at the first use.
}

// ---------------------------------------------------------------------------- CPU path

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
            cpu::ring_attend(dt, q.data(), k.data(), v.data(), p(o.kc), p(o.vc), pos, out.data(), krot.data(), a.B,
                             a.H, a.T, a.D, a.W, a.scale, o.rope_max_period, a.chunk_window != 0);
            cpu::ring_write(dt, p(o.kc), krot.data(), pos, a.B, a.H, a.T, a.D, a.W);
            cpu::ring_write(dt, p(o.vc), v.data(), pos, a.B, a.H, a.T, a.D, a.W);
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

const char* prog::op_name(const Op& op) {
  static const char* names[] = {"matvec", "attention", "conv1d", "conv_transpose1d", "rvq_encode", "rvq_decode",
                                "gumbel", "sample", "embed_add", "norm", "gelu", "scale_add", "frame_in",
                                "frame_out", "fill_rows", "update", "mute", "copy", "gemm", "gate"};
  static_assert(sizeof(names) / sizeof(names[0]) == std::variant_size_v<Op>);
  return names[op.index()];
}

std::vector<std::pair<std::string, double>> TickProgram::profile() {
  materialize();
  std::vector<std::pair<std::string, double>> out;
  if (gpu_) {
    const auto ms = profile_cuda();
    for (size_t i = 0; i < ops_.size(); ++i) out.emplace_back(prog::op_name(ops_[i]), ms[i]);
    return out;
  }
  for (const auto& op : ops_) {
    const auto t = std::chrono::steady_clock::now();
    run_cpu_op(op);
    out.emplace_back(prog::op_name(op),
                     std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t).count());
  }
  return out;
}

void TickProgram::run_ops() {
  check(!gpu_, "run_ops runs a CPU program's ops");
  materialize();
  for (const auto& op : ops_) run_cpu_op(op);
}

void TickProgram::run_cpu(const float* pcm, const int32_t* control, float* pcm_out, int32_t* tokens) {
  check(!gpu_, "run_cpu on a GPU program");
  check(pcm_in_ >= 0, "set_io must name the tick's operands before the first tick");
  materialize();
  std::memcpy(at(pcm_in_), pcm, sizeof(float) * B_ * F_);
  std::memcpy(at(control_), control, sizeof(int32_t) * B_ * C_);
  for (const auto& op : ops_) run_cpu_op(op);
  std::memcpy(pcm_out, at(pcm_out_), sizeof(float) * B_ * F_);
  std::memcpy(tokens, at(tokens_), sizeof(int32_t) * B_ * G_);
}



void TickProgram::write(int h, long offset, const mx::array& src) {
  check_handle(h, "write");
  const Mem& m = mems_[h];
  check(m.weight < 0, "write: only arena regions can be written");
  check(src.is_available() && src.flags().row_contiguous, "write: the source must be evaluated and contiguous");
  check(offset >= 0 && offset + static_cast<long>(src.nbytes()) <= m.bytes,
        "write: " + std::to_string(src.nbytes()) + " bytes at " + std::to_string(offset) +
            " do not fit a region of " + std::to_string(m.bytes));
  materialize();
  if (!gpu_) {
    std::memcpy(static_cast<char*>(at(h)) + offset, src.data<char>(), src.nbytes());
    return;
  }
  write_cuda(h, offset, src);
}

mx::array TickProgram::read(int h, long offset, long bytes) {
  check_handle(h, "read");
  const Mem& m = mems_[h];
  check(m.weight < 0 && offset >= 0 && bytes >= 0 && offset + bytes <= m.bytes, "read: out of the region");
  materialize();
  std::vector<uint8_t> out(bytes);
  if (!gpu_) {
    std::memcpy(out.data(), static_cast<char*>(at(h)) + offset, bytes);
  } else {
    read_cuda(h, offset, out.data(), bytes);
  }
  return mx::array(out.begin(), {static_cast<int>(bytes)}, mx::uint8);
}

// --------------------------------------------------------------------------- primitive

void Tick::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  for (auto& o : outputs) o.set_data(mx::allocator::malloc(o.nbytes()));
  auto& enc = mx::cpu::get_command_encoder(stream());
  for (auto& a : inputs) enc.set_input_array(a);
  for (auto& a : outputs) enc.set_output_array(a);
  enc.dispatch([prog = program_, pcm = inputs[0].data<float>(), control = inputs[1].data<int32_t>(),
                out = outputs[0].data<float>(), tokens = outputs[1].data<int32_t>()]() {
    prog->run_cpu(pcm, control, out, tokens);
  });
}

std::vector<mx::array> tick(std::shared_ptr<TickProgram> program, const mx::array& pcm, const mx::array& control,
                            mx::StreamOrDevice s) {
  check(program != nullptr, "no program");
  const int B = program->batch(), F = program->frame(), C = program->control_cols(), G = program->token_cols();
  check(B > 0, "the program has no operands yet (set_io)");
  check(pcm.shape() == mx::Shape{B, F}, "pcm must be [" + std::to_string(B) + ", " + std::to_string(F) +
                                            "], got " + shape_str(pcm));
  check(control.shape() == mx::Shape{B, C}, "control must be [" + std::to_string(B) + ", " + std::to_string(C) +
                                                "], got " + shape_str(control));
  auto st = mx::to_stream(s);
  check((st.device == mx::Device::gpu) == program->gpu(),
        std::string("a ") + (program->gpu() ? "GPU" : "CPU") + " program runs on the " +
            (program->gpu() ? "GPU" : "CPU") + " stream only");
  auto c = [&](const mx::array& a, mx::Dtype dt) { return mx::contiguous(mx::astype(a, dt, st), false, st); };
  return mx::array::make_arrays({{B, F}, {B, G}}, {mx::float32, mx::int32},
                                std::make_shared<Tick>(st, std::move(program)),
                                {c(pcm, mx::float32), c(control, mx::int32)});
}

}  // namespace personaplex
