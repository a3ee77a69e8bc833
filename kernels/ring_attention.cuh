// RingAttention's GPU kernels, written once against portable.h (see
// csrc/ring_attention.h for what the primitive computes).
//
// Two launches, ordered in the stream / graph:
//   attend: grid (S splits, H, B * query groups). Each block takes up to TQ new
//     queries of one (session, head) and 1/S of their key window, and leaves a
//     partial softmax (max, sum, weighted values) per query in a float32
//     workspace. Split-K over the window fills the GPU at B = 1 (32 heads are a
//     quarter of an H100's multiprocessors) and costs one small extra pass.
//   finish: grid (H, B). Combines the S partials into `out`, then writes the
//     rotated new keys and the values into their ring slots. The writes come
//     after every read of the old slots because they are a later launch: a
//     chunk (T > 1) overwrites slots that its own earlier queries still read.
//
// Keys and values stream through 16-byte loads: a key row is read by G = D / VEC
// lanes (VEC elements each: 16 bytes of the ring's format), so a warp covers 32 / G
// keys per step, kUnroll steps in flight before the first is used; the scores of
// those keys enter the running softmax together. A block scans its keys in two
// passes: those in the ring (no branch on where a key lives), then the chunk's new
// ones, read from k and v and rotated on the fly. q and k are rounded to the storage
// type after RoPE, where the reference rounds, and everything else is float32.
//
// The ring's format C is a template parameter of both bodies: the activations' own
// (Plain), or 8 bits (Int8Rows: Engine(kv_bits=8), half the bytes a step reads and
// holds). An 8-bit row is int8 codes and one float32 scale per (session, head,
// position): scale = absmax / 127, code = round(x / scale), ties to even, from the
// value as the plain ring would store it (keys after RoPE). A lane reads 16 codes
// with one load and converts them without int-to-float instructions; the row's scale
// multiplies its score and its softmax weight, not each element. `finish` quantizes
// a new row in one warp, its absmax reduced by shuffles. The new positions of a chunk
// attend to each other unquantized (from k, v, as the reference does); they are
// quantized as they enter the ring.

#pragma once

// Scalars of both launches; plain C, shared with the host (ring_attention_cuda.cpp).
struct RingArgs {
  int B, H, T, D, W;
  int S;             // splits of the key window in `attend`
  int copy_k, copy_v;  // `finish` first copies the old cache (it could not be donated)
  int rope;          // 0: no RoPE
  float rope_step;   // -ln(max_period) * 2 / D, rounded once from double as the CPU path does
  float scale;
  // Element strides of the new q, k, v between sessions, heads and positions:
  // [B, H, T, D] contiguous is {H * T * D, T * D, D}; the rows of a fused QKV
  // projection [B, T, 3, H, D] are {T * 3 * H * D, D, 3 * H * D}. out is always
  // [B, H, T, D] contiguous.
  long new_b, new_h, new_t;
  // 1: every query's window of W ends at the chunk's last new position instead
  // of at the query (Mimi's streaming attention: a frame's steps all enter the
  // ring before any of them attends). 0: per query.
  int chunk_window;
  // Element strides of out between sessions, heads and positions; all 0:
  // [B, H, T, D] contiguous. [B, T, H, D] rows (a projection's input) are
  // {T * H * D, D, H * D}.
  long out_b, out_h, out_t;
};

#if defined(__CUDACC__) || defined(__METAL_VERSION__) || defined(PP_EMULATE)

#include "formats.cuh"

namespace ring {

PP_CONSTANT constexpr int kWarps = 4;
PP_CONSTANT constexpr int kThreads = 32 * kWarps;
PP_CONSTANT constexpr int kUnroll = 4;  // key steps in flight per warp before the first use
PP_CONSTANT constexpr int kMaxHeadDim = 128;  // Int8Rows' writes: two pairs of a row per lane

using pp::BF16;
using pp::F16;
using pp::F32;
using pp::round_trip;
using pp::unpack;

// Moshi's interleaved RoPE on pair i: angle = position * exp(i * step), in float32.
PP_DEVICE void rope_pair(PP_THREAD float& re, PP_THREAD float& im, int i, float position,
                         float step) {
  float angle = pp_exp(float(i) * step) * position;
  float c = pp_cos(angle), s = pp_sin(angle);
  float r = re * c - im * s;
  im = re * s + im * c;
  re = r;
}

// Merge partial softmax (mo, lo, ao) into (m, l, a); an empty partial has m = -inf.
template <int N>
PP_DEVICE void merge(PP_THREAD float& m, PP_THREAD float& l, PP_THREAD float* a, float mo,
                     float lo, PP_THREAD const float* ao) {
  float mn = pp_max(m, mo);
  if (mn == PP_NEG_INF) return;
  float c1 = pp_exp(m - mn), c2 = pp_exp(mo - mn);
  l = l * c1 + lo * c2;
  #pragma unroll
  for (int e = 0; e < N; ++e) a[e] = a[e] * c1 + ao[e] * c2;
  m = mn;
}

// The ring in the activations' format F. `attend` reads a lane's kPerLane elements of
// a cached key or value (one 16-byte load) through load, scale and unpack; `finish`
// writes the new rows through write_new. Scales are all 1.
template <class F>
struct Plain {
  typedef typename F::Elem Code;
  static PP_CONSTANT constexpr int kPerLane = F::kPerVec;
  static PP_DEVICE pp_u32x4 load(const PP_GLOBAL Code* c, long at) { return pp_load16(c + at); }
  static PP_DEVICE float scale(const PP_GLOBAL float*, long) { return 1.f; }
  static PP_DEVICE void unpack(pp_u32x4 r, PP_THREAD float* out) { pp::unpack<F>(r, out); }

  // Thread tid of the (session b, head h) block: the rotated new keys and the values
  // into their slots; only the last W new positions survive a chunk longer than the ring.
  static PP_DEVICE void write_new(const PP_GLOBAL typename F::Elem* k, const PP_GLOBAL typename F::Elem* v,
                                  int p0, PP_GLOBAL Code* kc_out, PP_GLOBAL Code* vc_out, PP_GLOBAL float*,
                                  PP_GLOBAL float*, RingArgs a, int h, int b, int tid) {
    const int D = a.D;
    const long cache_row = (long(b) * a.H + h) * a.W, new_base = b * a.new_b + h * a.new_h;
    const int first = a.T > a.W ? a.T - a.W : 0;
    for (int i = tid; i < (a.T - first) * (D / 2); i += kThreads) {
      const int t = first + i / (D / 2), pair = i % (D / 2);
      const long src = new_base + t * a.new_t + 2 * pair;
      const long dst = (cache_row + (p0 + t) % a.W) * D + 2 * pair;
      float re = F::load(k[src]), im = F::load(k[src + 1]);
      if (a.rope) rope_pair(re, im, pair, float(p0 + t), a.rope_step);
      kc_out[dst] = F::store(re);
      kc_out[dst + 1] = F::store(im);
      vc_out[dst] = v[src];
      vc_out[dst + 1] = v[src + 1];
    }
  }
};

// int8 code of x at a row's scale s (absmax / 127): round(x / s), ties to even.
PP_DEVICE pp_u8 int8_code(float x, float s) {
  float c = s > 0.f ? pp_rint(x / s) : 0.f;
  c = c > 127.f ? 127.f : c < -127.f ? -127.f : c;
  return pp_u8(int(c) & 0xff);
}

// The ring in 8 bits: int8 codes [B, H, W, D] and float32 scales [B, H, W]. A lane
// takes 16 codes of a row (one 16-byte load, as many bytes as the plain ring's lanes
// read, so a warp has twice the rows in flight); `unpack` gives the codes themselves
// and `attend` applies the row's scale once, to the score (keys) and to the softmax
// weight (values).
template <class F>
struct Int8Rows {
  typedef pp_u8 Code;
  static PP_CONSTANT constexpr int kPerLane = 16;
  static PP_DEVICE pp_u32x4 load(const PP_GLOBAL Code* c, long at) { return pp_load16(c + at); }
  static PP_DEVICE float scale(const PP_GLOBAL float* s, long row) { return s[row]; }
  static PP_DEVICE void unpack(pp_u32x4 r, PP_THREAD float* out) {
    // code + 128 as the low byte of the float 2^23 + code + 128, minus that offset:
    // exact, and no integer-to-float conversion (a quarter-rate instruction).
    const pp_u32 w[4] = {r.x ^ 0x80808080u, r.y ^ 0x80808080u, r.z ^ 0x80808080u, r.w ^ 0x80808080u};
    #pragma unroll
    for (int e = 0; e < kPerLane; ++e)
      out[e] = pp_bits_to_float(((w[e / 4] >> (8 * (e % 4))) & 0xffu) | 0x4b000000u) - 8388736.f;
  }

  // One warp per new row (D <= kMaxHeadDim: two pairs a lane): the rotated key rounded
  // as the plain ring stores it, and the value; each one's absmax over the row by
  // shuffles; then the codes, and lane 0 writes the scales.
  static PP_DEVICE void write_new(const PP_GLOBAL typename F::Elem* k, const PP_GLOBAL typename F::Elem* v,
                                  int p0, PP_GLOBAL Code* kc_out, PP_GLOBAL Code* vc_out, PP_GLOBAL float* ks_out,
                                  PP_GLOBAL float* vs_out, RingArgs a, int h, int b, int tid) {
    constexpr int kPairs = kMaxHeadDim / 64;
    const int D = a.D, lane = tid & 31, warp = tid >> 5;
    const long cache_row = (long(b) * a.H + h) * a.W, new_base = b * a.new_b + h * a.new_h;
    const int first = a.T > a.W ? a.T - a.W : 0;
    for (int t = first + warp; t < a.T; t += kWarps) {  // warp-uniform: the shuffles need every lane
      float kx[kPairs][2], vx[kPairs][2], km = 0.f, vm = 0.f;
      #pragma unroll
      for (int i = 0; i < kPairs; ++i) {
        const int pair = lane + 32 * i;
        kx[i][0] = kx[i][1] = vx[i][0] = vx[i][1] = 0.f;
        if (pair < D / 2) {
          const long src = new_base + t * a.new_t + 2 * pair;
          float re = F::load(k[src]), im = F::load(k[src + 1]);
          if (a.rope) rope_pair(re, im, pair, float(p0 + t), a.rope_step);
          kx[i][0] = round_trip<F>(re);
          kx[i][1] = round_trip<F>(im);
          vx[i][0] = F::load(v[src]);
          vx[i][1] = F::load(v[src + 1]);
          #pragma unroll
          for (int e = 0; e < 2; ++e) {
            km = pp_max(km, pp_max(kx[i][e], -kx[i][e]));
            vm = pp_max(vm, pp_max(vx[i][e], -vx[i][e]));
          }
        }
      }
      #pragma unroll
      for (int off = 16; off > 0; off >>= 1) {
        km = pp_max(km, pp_shfl_xor(km, off));
        vm = pp_max(vm, pp_shfl_xor(vm, off));
      }
      const float kscale = km / 127.f, vscale = vm / 127.f;
      const long row = cache_row + (p0 + t) % a.W;
      #pragma unroll
      for (int i = 0; i < kPairs; ++i) {
        const int pair = lane + 32 * i;
        if (pair < D / 2) {
          #pragma unroll
          for (int e = 0; e < 2; ++e) {
            kc_out[row * D + 2 * pair + e] = int8_code(kx[i][e], kscale);
            vc_out[row * D + 2 * pair + e] = int8_code(vx[i][e], vscale);
          }
        }
      }
      if (lane == 0) {
        ks_out[row] = kscale;
        vs_out[row] = vscale;
      }
    }
  }
};

// A lane's queries (its VEC elements of each, rotated, rounded and scaled) and its
// running softmax over the keys seen so far.
template <int TQ, int VEC>
struct Lane {
  float q[TQ][VEC], m[TQ], l[TQ], acc[TQ][VEC];
};

// What `scan` needs of a block: its keys are lo + r for r in [0, n_keys), the ring
// holding those before p0 (slot: the key minus wrap, less W once more past it).
struct Window {
  int lo, p0, qpos0, nt, chunk_end, wrap, gl, sub, warp;
  long cache_row, new_base;
};

// Keys lo + r for r in [r0, r1) into the lane's softmax: NEW false, keys the ring holds
// (all before p0); NEW true, the chunk's new keys, read from k and v, rotated at their
// position and rounded as stored. The loop bound is warp-uniform (shuffles need the
// whole warp); a subgroup past r1 loads nothing and scores -inf. Each pass loads U keys
// a subgroup, scores them all, then folds them into the running softmax at once: one
// rescale of the accumulator and one exp a key (flash-decoding's block update).
template <class F, class C, int D, int TQ, bool NEW, int U>
PP_DEVICE void scan(PP_THREAD Lane<TQ, C::kPerLane>& s, const PP_GLOBAL typename F::Elem* k,
                    const PP_GLOBAL typename F::Elem* v, const PP_GLOBAL typename C::Code* kc,
                    const PP_GLOBAL typename C::Code* vc, const PP_GLOBAL float* ks,
                    const PP_GLOBAL float* vs, Window w, RingArgs a, int r0, int r1) {
  constexpr int VEC = C::kPerLane, G = D / VEC, KPW = 32 / G, STEP = kWarps * KPW;
  for (int rw = r0 + w.warp * KPW; rw < r1; rw += U * STEP) {
    pp_u32x4 kr[U], vr[U];
    float ksc[U], vsc[U];
    int jj[U];
    #pragma unroll
    for (int u = 0; u < U; ++u) {
      const int r = rw + u * STEP + w.sub;
      jj[u] = r < r1 ? w.lo + r : -1;
      kr[u] = vr[u] = pp_zero16();
      ksc[u] = vsc[u] = 1.f;
      if (!NEW && jj[u] >= 0) {
        const int slot = jj[u] - w.wrap >= a.W ? jj[u] - w.wrap - a.W : jj[u] - w.wrap;
        const long row = w.cache_row + slot;
        kr[u] = C::load(kc, row * D + w.gl * VEC);
        vr[u] = C::load(vc, row * D + w.gl * VEC);
        ksc[u] = C::scale(ks, row);
        vsc[u] = C::scale(vs, row);
      }
    }
    float sc[U][TQ];
    #pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = jj[u];
      float kf[VEC];
      if (!NEW) {
        C::unpack(kr[u], kf);
      } else if (j >= 0) {
        pp::load_elems<F>(k + w.new_base + (j - w.p0) * a.new_t + w.gl * VEC, VEC, kf);
        if (a.rope) {
          #pragma unroll
          for (int e = 0; e < VEC; e += 2) {
            rope_pair(kf[e], kf[e + 1], (w.gl * VEC + e) / 2, float(j), a.rope_step);
            kf[e] = round_trip<F>(kf[e]);
            kf[e + 1] = round_trip<F>(kf[e + 1]);
          }
        }
      } else {
        #pragma unroll
        for (int e = 0; e < VEC; ++e) kf[e] = 0.f;
      }
      #pragma unroll
      for (int t = 0; t < TQ; ++t) {
        float dot = 0.f;
        #pragma unroll
        for (int e = 0; e < VEC; ++e) dot += s.q[t][e] * kf[e];
        #pragma unroll
        for (int off = G / 2; off > 0; off >>= 1) dot += pp_shfl_xor(dot, off);
        const int qp = w.qpos0 + t;
        const bool seen = j >= 0 && t < w.nt && j <= qp && j > (a.chunk_window ? w.chunk_end : qp) - a.W;
        sc[u][t] = seen ? dot * ksc[u] : PP_NEG_INF;
      }
    }
    float wt[U][TQ];  // each key's softmax weight at the new running max, times its value scale
    #pragma unroll
    for (int t = 0; t < TQ; ++t) {
      float mn = s.m[t];
      #pragma unroll
      for (int u = 0; u < U; ++u) mn = pp_max(mn, sc[u][t]);
      const float c = s.m[t] == PP_NEG_INF ? 0.f : pp_exp(s.m[t] - mn);
      s.l[t] *= c;
      #pragma unroll
      for (int e = 0; e < VEC; ++e) s.acc[t][e] *= c;
      #pragma unroll
      for (int u = 0; u < U; ++u) {
        const float p = sc[u][t] == PP_NEG_INF ? 0.f : pp_exp(sc[u][t] - mn);
        s.l[t] += p;
        wt[u][t] = p * vsc[u];
      }
      s.m[t] = mn;
    }
    #pragma unroll
    for (int u = 0; u < U; ++u) {
      float vf[VEC];
      if (!NEW) {
        C::unpack(vr[u], vf);
      } else if (jj[u] >= 0) {
        pp::load_elems<F>(v + w.new_base + (jj[u] - w.p0) * a.new_t + w.gl * VEC, VEC, vf);
      } else {
        #pragma unroll
        for (int e = 0; e < VEC; ++e) vf[e] = 0.f;
      }
      #pragma unroll
      for (int t = 0; t < TQ; ++t) {
        #pragma unroll
        for (int e = 0; e < VEC; ++e) s.acc[t][e] += wt[u][t] * vf[e];
      }
    }
  }
}

// smem: kWarps * TQ * (D + 2) floats. ws: [B, H, T, S, D + 2] (values, max, sum).
// C: the ring's format (Plain<F> or Int8Rows<F>); ks, vs: Int8Rows' scales (else unused).
template <class F, class C, int D, int TQ>
PP_DEVICE void attend(const PP_GLOBAL typename F::Elem* q, const PP_GLOBAL typename F::Elem* k,
                      const PP_GLOBAL typename F::Elem* v, const PP_GLOBAL typename C::Code* kc,
                      const PP_GLOBAL typename C::Code* vc, const PP_GLOBAL float* ks,
                      const PP_GLOBAL float* vs, const PP_GLOBAL int* pos,
                      PP_GLOBAL float* ws, RingArgs a, PP_SHARED_PTR float* smem, int split,
                      int h, int bz, int tid) {
  constexpr int VEC = C::kPerLane, G = D / VEC;
  const int groups = (a.T + TQ - 1) / TQ;
  const int b = bz / groups, t0 = (bz % groups) * TQ;
  const int nt = a.T - t0 < TQ ? a.T - t0 : TQ;
  const int lane = tid & 31, warp = tid >> 5, sub = lane / G, gl = lane % G;
  const int p0 = pos[b], qpos0 = p0 + t0;
  const int chunk_end = p0 + a.T - 1;
  const int lo_q = (a.chunk_window ? chunk_end : qpos0) - a.W + 1;
  const int lo = lo_q > 0 ? lo_q : 0;
  const int n_keys = qpos0 + nt - lo;  // keys lo .. last query's position
  const int chunk = (a.W + TQ - 1 + a.S - 1) / a.S;
  const int r_begin = split * chunk;
  const int r_end = n_keys < r_begin + chunk ? n_keys : r_begin + chunk;
  const long bh = long(b) * a.H + h;
  const long new_row = bh * a.T;  // rows of out / ws
  // A cached key j (lo <= j < p0, so j - wrap < 2W) sits in ring slot j % W: one
  // conditional subtraction per key instead of an integer division.
  const Window w{.lo = lo, .p0 = p0, .qpos0 = qpos0, .nt = nt, .chunk_end = chunk_end, .wrap = lo - lo % a.W,
                 .gl = gl, .sub = sub, .warp = warp, .cache_row = bh * a.W,
                 .new_base = b * a.new_b + h * a.new_h};  // element offset in q, k, v

  Lane<TQ, VEC> s;
  #pragma unroll
  for (int t = 0; t < TQ; ++t) {
    s.m[t] = PP_NEG_INF;
    s.l[t] = 0.f;
    #pragma unroll
    for (int e = 0; e < VEC; ++e) s.q[t][e] = s.acc[t][e] = 0.f;
    if (t < nt) {
      pp::load_elems<F>(q + w.new_base + (t0 + t) * a.new_t + gl * VEC, VEC, s.q[t]);
      #pragma unroll
      for (int e = 0; e < VEC; e += 2) {
        if (a.rope) rope_pair(s.q[t][e], s.q[t][e + 1], (gl * VEC + e) / 2, float(qpos0 + t), a.rope_step);
        s.q[t][e] = round_trip<F>(s.q[t][e]) * a.scale;
        s.q[t][e + 1] = round_trip<F>(s.q[t][e + 1]) * a.scale;
      }
    }
  }

  // This split's keys: first those in the ring, then the chunk's new ones.
  const int in_ring = p0 - lo > 0 ? p0 - lo : 0;
  const int mid = in_ring < r_begin ? r_begin : in_ring > r_end ? r_end : in_ring;
  scan<F, C, D, TQ, false, kUnroll>(s, k, v, kc, vc, ks, vs, w, a, r_begin, mid);
  scan<F, C, D, TQ, true, 1>(s, k, v, kc, vc, ks, vs, w, a, mid, r_end);

  // Subgroups of a warp, then warps of the block.
  #pragma unroll
  for (int off = G; off < 32; off <<= 1) {
    #pragma unroll
    for (int t = 0; t < TQ; ++t) {
      float mo = pp_shfl_xor(s.m[t], off), lo_ = pp_shfl_xor(s.l[t], off), ao[VEC];
      #pragma unroll
      for (int e = 0; e < VEC; ++e) ao[e] = pp_shfl_xor(s.acc[t][e], off);
      merge<VEC>(s.m[t], s.l[t], s.acc[t], mo, lo_, ao);
    }
  }
  if (sub == 0) {
    #pragma unroll
    for (int t = 0; t < TQ; ++t) {
      PP_SHARED_PTR float* row = smem + (warp * TQ + t) * (D + 2);
      #pragma unroll
      for (int e = 0; e < VEC; ++e) row[gl * VEC + e] = s.acc[t][e];
      if (gl == 0) {
        row[D] = s.m[t];
        row[D + 1] = s.l[t];
      }
    }
  }
  PP_BARRIER();
  for (int i = tid; i < nt * (D + 1); i += kThreads) {
    const int t = i / (D + 1), d = i % (D + 1);  // d == D: the (max, sum) pair
    float mx = PP_NEG_INF;
    #pragma unroll
    for (int wp = 0; wp < kWarps; ++wp) mx = pp_max(mx, smem[(wp * TQ + t) * (D + 2) + D]);
    PP_GLOBAL float* dst = ws + ((new_row + t0 + t) * a.S + split) * (D + 2);
    float sum = 0.f;
    #pragma unroll
    for (int wp = 0; wp < kWarps; ++wp) {
      PP_SHARED_PTR const float* row = smem + (wp * TQ + t) * (D + 2);
      if (row[D] != PP_NEG_INF) sum += row[d < D ? d : D + 1] * pp_exp(row[D] - mx);
    }
    if (d < D) {
      dst[d] = sum;
    } else {
      dst[D] = mx;
      dst[D + 1] = sum;
    }
  }
}

// One block per (session, head): out = combined partials; then the ring write
// (C: the ring's format, as in attend; ks..vs_out: Int8Rows' scales, else unused).
template <class F, class C>
PP_DEVICE void finish(const PP_GLOBAL float* ws, const PP_GLOBAL typename F::Elem* k,
                      const PP_GLOBAL typename F::Elem* v, const PP_GLOBAL int* pos,
                      const PP_GLOBAL typename C::Code* kc, const PP_GLOBAL typename C::Code* vc,
                      const PP_GLOBAL float* ks, const PP_GLOBAL float* vs,
                      PP_GLOBAL typename F::Elem* out, PP_GLOBAL typename C::Code* kc_out,
                      PP_GLOBAL typename C::Code* vc_out, PP_GLOBAL float* ks_out, PP_GLOBAL float* vs_out,
                      RingArgs a, int h, int b, int tid) {
  const int D = a.D, VEC = 16 / int(sizeof(typename C::Code));  // elements of a 16-byte copy
  const long bh = long(b) * a.H + h;
  const long new_row = bh * a.T, cache_row = bh * a.W;
  const int p0 = pos[b];

  for (int i = tid; i < a.T * D; i += kThreads) {
    const int t = i / D, d = i % D;
    const PP_GLOBAL float* part = ws + (new_row + t) * a.S * (D + 2);
    float mx = PP_NEG_INF;
    for (int s = 0; s < a.S; ++s) mx = pp_max(mx, part[s * (D + 2) + D]);
    float num = 0.f, den = 0.f;
    for (int s = 0; s < a.S; ++s) {
      const PP_GLOBAL float* p = part + s * (D + 2);
      if (p[D] == PP_NEG_INF) continue;
      const float c = pp_exp(p[D] - mx);
      num += p[d] * c;
      den += p[D + 1] * c;
    }
    const long at = a.out_t ? b * a.out_b + h * a.out_h + t * a.out_t + d : (new_row + t) * D + d;
    out[at] = F::store(num / den);
  }

  const long n_vec = long(a.W) * D / VEC;
  for (long i = tid; a.copy_k && i < n_vec; i += kThreads)
    pp_store16(kc_out + cache_row * D + i * VEC, pp_load16(kc + cache_row * D + i * VEC));
  for (long i = tid; a.copy_v && i < n_vec; i += kThreads)
    pp_store16(vc_out + cache_row * D + i * VEC, pp_load16(vc + cache_row * D + i * VEC));
  for (int i = tid; ks_out && a.copy_k && i < a.W; i += kThreads) ks_out[cache_row + i] = ks[cache_row + i];
  for (int i = tid; vs_out && a.copy_v && i < a.W; i += kThreads) vs_out[cache_row + i] = vs[cache_row + i];
  PP_BARRIER();

  C::write_new(k, v, p0, kc_out, vc_out, ks_out, vs_out, a, h, b, tid);
}

}  // namespace ring

#endif

#if !defined(__METAL_VERSION__)
// Launch plan, for csrc/ring_attention_cuda.cpp and tests/emulator/ring_attention.cpp.

#include "launch.cuh"

constexpr int kRingThreads = 128;

// The head dims `attend` is instantiated for (ring_attend_<dtype>[_i8]_d<D>_q<TQ>).
inline bool ring_head_dim_supported(int D) { return D == 16 || D == 32 || D == 64 || D == 128; }

// New queries per block, TQ: 1 for a decode step, else 4 (ring_attend_..._q1 / _q4).
inline int ring_queries_per_block(int T) { return T == 1 ? 1 : 4; }

// S, the splits of the key window: until the grid holds ~4 blocks per
// multiprocessor (`sms` of them), each split keeping at least 64 keys.
inline int ring_splits(const RingArgs& a, int sms) {
  const int tq = ring_queries_per_block(a.T);
  const int blocks = a.B * a.H * ((a.T + tq - 1) / tq);
  const int want = (4 * sms + blocks - 1) / blocks;
  const int most = (a.W + tq - 1) / 64 > 1 ? (a.W + tq - 1) / 64 : 1;
  return want < 1 ? 1 : want > most ? most : want;
}

// attend's float32 workspace [B, H, T, S, D + 2] (values, max, sum), which finish reads.
inline long ring_workspace_floats(const RingArgs& a) { return long(a.B) * a.H * a.T * a.S * (a.D + 2); }

// Workgroup memory of attend, in floats (kernels/cuda/ring_attention.cu declares it).
inline int ring_attend_smem_floats(int D, int tq) { return kRingThreads / 32 * tq * (D + 2); }

// attend: a block per window split, head and group of TQ new queries of a session.
inline PpLaunch ring_attend_launch(const RingArgs& a) {
  const int tq = ring_queries_per_block(a.T);
  return {.grid_x = static_cast<unsigned int>(a.S), .grid_y = static_cast<unsigned int>(a.H),
          .grid_z = static_cast<unsigned int>(a.B * ((a.T + tq - 1) / tq)), .threads = kRingThreads};
}

// finish: a block per head and session.
inline PpLaunch ring_finish_launch(const RingArgs& a) {
  return {.grid_x = static_cast<unsigned int>(a.H), .grid_y = static_cast<unsigned int>(a.B), .grid_z = 1,
          .threads = kRingThreads};
}

#if defined(__CUDACC__) || defined(PP_EMULATE)
static_assert(ring::kThreads == kRingThreads, "the body's block size is its launch's");
#endif
#endif
