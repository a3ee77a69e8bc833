// Matvec's GPU kernel, written once against portable.h (see csrc/matvec.h for
// what the primitive computes).
//
// Decode steps multiply a few rows of activations (M <= 8: one per session) by
// every weight of the model once, so the kernel is a stream over the weights:
// a block of 128 threads owns R = 4 weight rows and splits K between all its
// threads, each thread reading one 16-byte vector of each of its 4 rows per
// iteration (8 bf16, 16 q8 or 32 q4 weights) and reusing every x value it loads
// for the 4 rows; weights are unpacked 8 at a time, once for all MT rows of x.
// Splitting K inside the block (rather than giving each warp its own rows) keeps
// ~1000 blocks in flight for a 4096-row matrix and 256 for the depformer's 1024
// rows. Its cost (measured, docs/PERF.md): every block reads, and with `norm`
// normalises, all M rows of x, which dominates at M = 8 and with 4-bit weights.
//
// Quantized weights are MLX's affine layout (w = scale * q + bias per group of
// 64 along K, q packed little-end first into uint32), so `convert` output is
// used as is. Per chunk: acc += scale * sum(q * x) + bias * sum(x). Integer
// nibbles become floats by OR-ing them into the mantissa of 2^23 and
// subtracting 2^23 (exact), which avoids the slow int-to-float conversion.
//
// Epilogues, applied where the reference rounds (to the storage type T):
//   norm      x -> T(alpha * (x * rsqrt(mean(x^2) + eps))), per row of x, first;
//   gate      rows j and j + n_out are the SiLU gate and value of output j:
//             T(T(g * T(sigmoid(g))) * v), g and v rounded to T first;
//   residual  T(residual + T(y)).

#pragma once

// Scalars of the launch; plain C, shared with the host (csrc/matvec_cuda.cpp).
struct MatvecArgs {
  int M, K;      // x is [M, K]
  int n_out;     // output columns (weight rows: n_out, or 2 * n_out gated)
  int norm, gate, residual;
  float eps;
  int early;     // the first chunk of weights loaded before waiting for the kernel before
};

// Weight rows per block; a block makes that many outputs, or half as many gated.
#define PP_MATVEC_ROWS 4

#if defined(__CUDACC__) || defined(__METAL_VERSION__) || defined(PP_EMULATE)

#include "formats.cuh"

namespace matvec {

PP_CONSTANT constexpr int kThreads = 128;
PP_CONSTANT constexpr int kWarps = kThreads / 32;
PP_CONSTANT constexpr int kRows = PP_MATVEC_ROWS;

// The wait for the kernel before (programmatic dependent launch, portable.h) a body takes
// as a callable: none on Metal and in the emulator's plain runs.
struct NoWait {
  PP_DEVICE void operator()() const {}
};

// Dense weights in the activations' storage format.
template <class F>
struct Dense {
  static PP_CONSTANT constexpr int kChunk = F::kPerVec;  // weights per 16-byte vector
  static PP_CONSTANT constexpr int kSub = kChunk;        // weights unpacked at a time
  static PP_CONSTANT constexpr bool kAffine = false;
  static PP_DEVICE long row_words(int K) { return long(K) * sizeof(typename F::Elem) / 4; }
  static PP_DEVICE void unpack_sub(pp_u32x4 r, int, PP_THREAD float* out) { pp::unpack<F>(r, out); }
};

// MLX affine quantization, BITS per weight, packed in uint32 little-end first.
template <int BITS>
struct Affine {
  static PP_CONSTANT constexpr int kChunk = 128 / BITS;
  static PP_CONSTANT constexpr int kSub = 8;  // one word of 4-bit weights, two of 8-bit
  static PP_CONSTANT constexpr bool kAffine = true;
  static PP_DEVICE long row_words(int K) { return long(K) * BITS / 32; }
  // Weights sub * 8 .. sub * 8 + 7 of the vector.
  static PP_DEVICE void unpack_sub(pp_u32x4 r, int sub, PP_THREAD float* out) {
    constexpr pp_u32 mask = (1u << BITS) - 1u;
    constexpr int per = 32 / BITS, words = kSub / per;
    pp_u32 w[4] = {r.x, r.y, r.z, r.w};
    #pragma unroll
    for (int i = 0; i < words; ++i) {
      const pp_u32 word = w[sub * words + i];
      #pragma unroll
      for (int j = 0; j < per; ++j) {
        out[i * per + j] = pp_bits_to_float(((word >> (BITS * j)) & mask) | 0x4b000000u) - 8388608.f;
      }
    }
  }
};

PP_DEVICE float warp_sum(float s) {
  #pragma unroll
  for (int off = 16; off > 0; off >>= 1) s += pp_shfl_xor(s, off);
  return s;
}

// smem: kWarps * kRows * MT + MT floats.
// w: [N, row_words] as uint32 (dense rows are reinterpreted); scales, biases:
// [N, K / 64] (affine only); alpha: [K] (norm only); residual, out: [M, n_out].
// One chunk of a thread's weight rows: 16 bytes of each of the block's rows at k0, and
// their group's scale and bias (affine).
template <class F, class W>
PP_DEVICE void load_chunk(PP_THREAD pp_u32x4* wr, PP_THREAD float* sc, PP_THREAD float* bi,
                          const PP_GLOBAL pp_u32* w, const PP_GLOBAL typename F::Elem* scales,
                          const PP_GLOBAL typename F::Elem* biases, PP_THREAD const long* row, long words,
                          int groups, int k0, int K) {
  #pragma unroll
  for (int r = 0; r < kRows; ++r) {
    wr[r] = pp_load16(w + row[r] * words + long(k0) * words / K);
    if (W::kAffine) {
      sc[r] = F::load(scales[row[r] * groups + k0 / 64]);
      bi[r] = F::load(biases[row[r] * groups + k0 / 64]);
    }
  }
}

// The chunk's dot products with the MT rows of x (one quantization group at most), SUB
// weights at a time: each weight is unpacked once for all MT rows; added to acc.
template <class F, class W, int MT>
PP_DEVICE void multiply_chunk(PP_THREAD const pp_u32x4* wr, PP_THREAD const float* sc, PP_THREAD const float* bi,
                              const PP_GLOBAL typename F::Elem* x, const PP_GLOBAL typename F::Elem* alpha,
                              PP_SHARED_PTR const float* inv_rms, MatvecArgs a, int m0, int k0,
                              PP_THREAD float (*acc)[MT]) {
  constexpr int C = W::kChunk, SUB = W::kSub;
  float d[kRows][MT], sx[MT];
  #pragma unroll
  for (int m = 0; m < MT; ++m) {
    sx[m] = 0.f;
    #pragma unroll
    for (int r = 0; r < kRows; ++r) d[r][m] = 0.f;
  }
  #pragma unroll
  for (int sub = 0; sub < C / SUB; ++sub) {
    const int k = k0 + sub * SUB;
    float wf[kRows][SUB];
    #pragma unroll
    for (int r = 0; r < kRows; ++r) W::unpack_sub(wr[r], sub, wf[r]);
    float al[SUB];
    if (a.norm) pp::load_elems<F>(alpha + k, SUB, al);
    #pragma unroll
    for (int m = 0; m < MT; ++m) {
      if (m0 + m >= a.M) break;
      float xf[SUB];
      pp::load_elems<F>(x + long(m0 + m) * a.K + k, SUB, xf);
      if (a.norm) {
        #pragma unroll
        for (int e = 0; e < SUB; ++e) xf[e] = pp::round_trip<F>(al[e] * (xf[e] * inv_rms[m]));
      }
      if (W::kAffine) {
        #pragma unroll
        for (int e = 0; e < SUB; ++e) sx[m] += xf[e];
      }
      #pragma unroll
      for (int r = 0; r < kRows; ++r) {
        #pragma unroll
        for (int e = 0; e < SUB; ++e) d[r][m] += wf[r][e] * xf[e];
      }
    }
  }
  #pragma unroll
  for (int r = 0; r < kRows; ++r) {
    #pragma unroll
    for (int m = 0; m < MT; ++m) acc[r][m] += W::kAffine ? sc[r] * d[r][m] + bi[r] * sx[m] : d[r][m];
  }
}

// wait(): the wait for the kernel before, called before x is read; with a.early the
// thread's first chunk of weights (never written by a kernel) is already on its way then.
template <class F, class W, int MT, class Wait = NoWait>
PP_DEVICE void matvec(const PP_GLOBAL typename F::Elem* x, const PP_GLOBAL pp_u32* w,
                      const PP_GLOBAL typename F::Elem* scales,
                      const PP_GLOBAL typename F::Elem* biases,
                      const PP_GLOBAL typename F::Elem* alpha,
                      const PP_GLOBAL typename F::Elem* residual, PP_GLOBAL typename F::Elem* out,
                      MatvecArgs a, PP_SHARED_PTR float* smem, int block, int mblock, int tid,
                      Wait wait = Wait()) {
  constexpr int C = W::kChunk;
  constexpr int UNITS = kRows;  // outputs per block when not gated; half that gated
  const int units = a.gate ? UNITS / 2 : UNITS;
  const int u0 = block * units;
  const int m0 = mblock * MT;
  const int lane = tid & 31, warp = tid >> 5;
  PP_SHARED_PTR float* inv_rms = smem + kWarps * kRows * MT;

  // Row r of the block: unit r % units, gate half r / units.
  long row[kRows];
  #pragma unroll
  for (int r = 0; r < kRows; ++r) {
    int u = u0 + r % units;
    u = u < a.n_out ? u : a.n_out - 1;  // past the end: read a valid row, store nothing
    row[r] = u + (r / units) * long(a.n_out);
  }
  const long words = W::row_words(a.K);
  const int groups = a.K / 64;
  // The thread's first chunk of weights (k0 = tid * C), before the wait (a.early).
  pp_u32x4 wr[kRows];
  float sc[kRows], bi[kRows];
  const bool early = a.early && tid * C < a.K;
  if (early) load_chunk<F, W>(wr, sc, bi, w, scales, biases, row, words, groups, tid * C, a.K);
  wait();

  if (a.norm) {
    for (int m = 0; m < MT; ++m) {
      float s = 0.f;
      if (m0 + m < a.M) {
        const PP_GLOBAL typename F::Elem* xr = x + long(m0 + m) * a.K;
        for (int k = tid * F::kPerVec; k < a.K; k += kThreads * F::kPerVec) {
          float v[F::kPerVec];
          pp::unpack<F>(pp_load16(xr + k), v);
          #pragma unroll
          for (int e = 0; e < F::kPerVec; ++e) s += v[e] * v[e];
        }
      }
      s = warp_sum(s);
      if (lane == 0) smem[warp] = s;
      PP_BARRIER();
      if (tid == 0) {
        float t = 0.f;
        for (int i = 0; i < kWarps; ++i) t += smem[i];
        inv_rms[m] = 1.f / sqrt(t / float(a.K) + a.eps);
      }
      PP_BARRIER();
    }
  }

  float acc[kRows][MT];
  #pragma unroll
  for (int r = 0; r < kRows; ++r) {
    #pragma unroll
    for (int m = 0; m < MT; ++m) acc[r][m] = 0.f;
  }

  int k0 = tid * C;
  if (early) {
    multiply_chunk<F, W, MT>(wr, sc, bi, x, alpha, inv_rms, a, m0, k0, acc);
    k0 += kThreads * C;
  }
  for (; k0 < a.K; k0 += kThreads * C) {
    load_chunk<F, W>(wr, sc, bi, w, scales, biases, row, words, groups, k0, a.K);
    multiply_chunk<F, W, MT>(wr, sc, bi, x, alpha, inv_rms, a, m0, k0, acc);
  }

  // Threads of a warp, then the warps of the block.
  #pragma unroll
  for (int r = 0; r < kRows; ++r) {
    #pragma unroll
    for (int m = 0; m < MT; ++m) {
      const float s = warp_sum(acc[r][m]);
      if (lane == 0) smem[(warp * kRows + r) * MT + m] = s;
    }
  }
  PP_BARRIER();
  if (tid < units * MT) {
    const int u = tid / MT, m = tid % MT;
    if (u0 + u < a.n_out && m0 + m < a.M) {
      float y[2] = {0.f, 0.f};
      for (int part = 0; part < (a.gate ? 2 : 1); ++part) {  // `half` is a type in Metal
        for (int i = 0; i < kWarps; ++i) y[part] += smem[(i * kRows + part * units + u) * MT + m];
        y[part] = pp::round_trip<F>(y[part]);
      }
      float o = y[0];
      if (a.gate) {
        const float sig = pp::round_trip<F>(1.f / (1.f + pp_exp(-y[0])));
        o = pp::round_trip<F>(pp::round_trip<F>(y[0] * sig) * y[1]);
      }
      const long at = long(m0 + m) * a.n_out + u0 + u;
      if (a.residual) o = pp::round_trip<F>(F::load(residual[at]) + o);
      out[at] = F::store(o);
    }
  }
}

}  // namespace matvec

#endif

#if !defined(__METAL_VERSION__)
// Launch plan, for csrc/matvec_cuda.cpp and tests/emulator/matvec.cpp.

#include <cstdlib>
#include <cstring>

#include "launch.cuh"

// Whether the CUDA kernels load their first chunk of weights before waiting for the
// kernel before them (MatvecArgs::early): unless PERSONAPLEX_MATVEC_EARLY=0. On an H200
// (2026-12-02, docs/PERF.md) the tick at 1 session took 0.27 ms less with it (q4 7.64
// against 7.91 ms, bf16 7.79 against 8.06), at 8 sessions 0.05-0.08 less.
inline bool matvec_early() {
  const char* env = std::getenv("PERSONAPLEX_MATVEC_EARLY");
  return !(env && std::strcmp(env, "0") == 0);
}

constexpr int kMatvecThreads = 128;

// Rows of x per block, MT: the kernels are instantiated for 1, 2, 4 and 8
// (matvec_<dtype>_<weights>_m<MT>).
inline int matvec_x_rows(int M) { return M <= 1 ? 1 : M <= 2 ? 2 : M <= 4 ? 4 : 8; }

// The <weights> part of the kernels' names (matvec_..., matvec_tc_...): bits 0, 4 or 8.
inline const char* matvec_weights_name(int bits) { return bits == 0 ? "dense" : bits == 4 ? "q4" : "q8"; }

// Workgroup memory of matvec_..._m<MT>, in floats (kernels/cuda/matvec.cu declares it).
inline int matvec_smem_floats(int mt) { return kMatvecThreads / 32 * PP_MATVEC_ROWS * mt + mt; }

// Whether the kernels take this K: every thread reads whole 16-byte vectors of x
// and of the weight rows, and 4-bit weights come 32 to a vector.
inline bool matvec_k_supported(int K, int elem_bytes, int bits) {
  return K % (16 / elem_bytes) == 0 && (bits != 4 || K % 32 == 0);
}

// A block per PP_MATVEC_ROWS weight rows (as many outputs, or half as many gated)
// and per MT rows of x.
inline PpLaunch matvec_launch(const MatvecArgs& a) {
  const int mt = matvec_x_rows(a.M), units = a.gate ? PP_MATVEC_ROWS / 2 : PP_MATVEC_ROWS;
  return {.grid_x = static_cast<unsigned int>((a.n_out + units - 1) / units),
          .grid_y = static_cast<unsigned int>((a.M + mt - 1) / mt), .grid_z = 1, .threads = kMatvecThreads};
}

#if defined(__CUDACC__) || defined(PP_EMULATE)
static_assert(matvec::kThreads == kMatvecThreads, "the body's block size is its launch's");
#endif
#endif
