// The tick program's own GPU kernels, written once against portable.h (see
// csrc/tick.h for the program). The heavy work of a tick runs on the other
// primitives' kernel bodies (matvec, ring_attention, conv1d_stream,
// conv_transpose1d_stream, rvq, sample_topk, embed_add); these are the small
// pieces between them:
//   norm        RMSNorm (as matvec's prologue rounds it) or LayerNorm of rows;
//   gelu        MLX's exact GELU, x (1 + erf(x / sqrt 2)) / 2;
//   scale_add   a + s * b per column (Mimi's layer scale), or a + b;
//   frame_in    the LM's token rings before the temporal step (one thread per
//               session): the user's codes and "not forced" enter the rings at
//               their delays, and the step's input and forced tokens are read out;
//   frame_out   after the step: the generated tokens enter the ring, the frame
//               whose streams are all complete comes out (the caller's tokens and
//               the decoder's codes) with its validity;
//   gumbel      the sampling noise, -log(-log(u)), u from Philox4x32-10 keyed by the
//               session's seed and counted by (frame, stream, index): a session's
//               draws do not depend on the batch it shares;
//   fill_rows   the reset of flagged sessions' state rows to fixed patterns (control
//               column 0 is a bit set: each region belongs to one class of state);
//   update      counters and flags advanced at the end of a tick;
//   mute        zero the audio rows of frames that are not valid yet;
//   gate        the SiLU gate of a projection's output (when the projection ran as a
//               GEMM rather than as matvec, which fuses it);
//   im2col, bias_rows, col2im
//               around a GEMM that runs a codec conv at large batches: the windows
//               of a conv1d as rows, the bias as the GEMM's C, and the overlap-add of
//               a transposed conv's per-tap products (with its carried partial).
// Offsets into the program's arena (rather than pointers) describe the state
// rows, so the descriptor tables mean the same on every backend.

#pragma once

// Scalars of the launches; plain C, shared with the host (csrc/tick_cuda.cpp).
struct NormArgs {
  int rows, dim;
  float eps;
  int layer;     // 0: RMSNorm (alpha), 1: LayerNorm (weight, bias)
};

struct RowsArgs {
  int rows, cols;
};

struct FrameArgs {
  int B;
  int n_q, dep_q;   // audio streams of the LM's input; of its output (model codebooks)
  int user_q;       // user streams taken from the codec's codes (n_q - dep_q)
  int n_sem;        // semantic codebooks first in the codec's codes (the rest acoustic)
  int R;            // slots of the token rings (max_delay + 2)
  int max_delay;
  int text_initial, audio_initial;
  int card;         // the codec's codebook size: decoder codes are clamped below it
};

struct Im2colArgs {
  int B, T_out, C_in, K, stride, dilation;
  int rows;  // rows of buf per session (context + T)
};

struct Col2imArgs {
  int B, T, C_out, K, stride;
  int has_bias;
};

struct GumbelArgs {
  int B, V, streams;
  int stream0;      // counter id of the first stream (0: text, 1 + k: audio codebook k)
};

struct FillRegion {
  long offset;      // bytes from the arena's base to session 0's row
  long row_bytes;   // bytes of one session's row (and the stride between rows)
  unsigned int pattern;  // 4-byte pattern, repeated
  int control_col;  // >= 0: the pattern is the session's control value in this column
  int mask;         // refilled where control column 0 has one of these bits set
  int pad;
};

struct UpdateEntry {
  long offset;      // bytes from the arena's base
  int count;        // elements
  int mode;         // 0: int32 += value; 1: uint8 = value
  int value;
  int pad;
};

enum {
  kTickThreads = 256,
  kTokenUngenerated = -2,
  kTokenNotForced = -1,
  kTokenZero = -1,
};

#if defined(__CUDACC__) || defined(__METAL_VERSION__) || defined(PP_EMULATE)

#include "formats.cuh"

namespace tick {

PP_DEVICE float block_sum(float s, PP_SHARED_PTR float* smem, int tid) {
  for (int off = 16; off > 0; off >>= 1) s += pp_shfl_xor(s, off);
  if ((tid & 31) == 0) smem[tid >> 5] = s;
  PP_BARRIER();
  float t = 0.f;
  for (int i = 0; i < kTickThreads / 32; ++i) t += smem[i];
  PP_BARRIER();
  return t;
}

// One block per row. smem: kTickThreads / 32 floats.
template <class F>
PP_DEVICE void norm(const PP_GLOBAL typename F::Elem* x, const PP_GLOBAL typename F::Elem* w,
                    const PP_GLOBAL typename F::Elem* b, PP_GLOBAL typename F::Elem* out, NormArgs a,
                    PP_SHARED_PTR float* smem, int row, int tid) {
  const PP_GLOBAL typename F::Elem* xr = x + long(row) * a.dim;
  PP_GLOBAL typename F::Elem* yr = out + long(row) * a.dim;
  if (a.layer) {
    float s = 0.f;
    for (int c = tid; c < a.dim; c += kTickThreads) s += F::load(xr[c]);
    const float mean = block_sum(s, smem, tid) / float(a.dim);
    float v = 0.f;
    for (int c = tid; c < a.dim; c += kTickThreads) {
      const float d = F::load(xr[c]) - mean;
      v += d * d;
    }
    const float inv = 1.f / sqrt(block_sum(v, smem, tid) / float(a.dim) + a.eps);
    for (int c = tid; c < a.dim; c += kTickThreads) {
      yr[c] = F::store((F::load(xr[c]) - mean) * inv * F::load(w[c]) + F::load(b[c]));
    }
  } else {
    float s = 0.f;
    for (int c = tid; c < a.dim; c += kTickThreads) {
      const float v = F::load(xr[c]);
      s += v * v;
    }
    const float inv = 1.f / sqrt(block_sum(s, smem, tid) / float(a.dim) + a.eps);
    for (int c = tid; c < a.dim; c += kTickThreads) {
      yr[c] = F::store(F::load(w[c]) * (F::load(xr[c]) * inv));
    }
  }
}

// Element i of [rows, cols]; in place allowed.
template <class F>
PP_DEVICE void gelu(const PP_GLOBAL typename F::Elem* x, PP_GLOBAL typename F::Elem* out, RowsArgs a,
                    long i) {
  if (i >= long(a.rows) * a.cols) return;
  const float v = F::load(x[i]);
  out[i] = F::store(v * (1.f + pp_erf(v * 0.70710678118654752f)) / 2.f);
}

// out = a + s * b (s per column, rounded to the storage type first), or a + b
// when s is null; element i of [rows, cols]; out may be a or b.
template <class F>
PP_DEVICE void scale_add(const PP_GLOBAL typename F::Elem* x, const PP_GLOBAL typename F::Elem* s,
                         const PP_GLOBAL typename F::Elem* y, PP_GLOBAL typename F::Elem* out, RowsArgs a,
                         long i) {
  if (i >= long(a.rows) * a.cols) return;
  float v = F::load(y[i]);
  if (s) v = pp::round_trip<F>(F::load(s[i % a.cols]) * v);
  out[i] = F::store(F::load(x[i]) + v);
}

// Row b of [rows, cols] zeroed unless valid[b]; in place allowed.
PP_DEVICE void mute(const PP_GLOBAL float* x, const PP_GLOBAL int* valid, PP_GLOBAL float* out, RowsArgs a,
                    long i) {
  if (i >= long(a.rows) * a.cols) return;
  out[i] = valid[i / a.cols] ? x[i] : 0.f;
}

// Element i of out [rows, n]: the SiLU gate of in [rows, 2n] (gate | value halves),
// rounded where matvec's gate epilogue rounds.
template <class F>
PP_DEVICE void gate(const PP_GLOBAL typename F::Elem* in, PP_GLOBAL typename F::Elem* out, RowsArgs a, long i) {
  if (i >= long(a.rows) * a.cols) return;
  const long r = i / a.cols, j = i % a.cols;
  const float g = F::load(in[r * 2 * a.cols + j]), v = F::load(in[r * 2 * a.cols + a.cols + j]);
  const float sig = pp::round_trip<F>(1.f / (1.f + pp_exp(-g)));
  out[i] = F::store(pp::round_trip<F>(pp::round_trip<F>(g * sig) * v));
}

// Element i of cols [B * T_out, K * C_in]: row (b, t), column (k, ci) is
// buf[b, t * stride + k * dilation, ci] (buf [B, rows, C_in]: context, then new samples).
template <class F>
PP_DEVICE void im2col(const PP_GLOBAL typename F::Elem* buf, PP_GLOBAL typename F::Elem* cols, Im2colArgs a,
                      long i) {
  const long width = long(a.K) * a.C_in;
  if (i >= long(a.B) * a.T_out * width) return;
  const long row = i / width, c = i % width;
  const int b = int(row / a.T_out), t = int(row % a.T_out);
  const int k = int(c / a.C_in), ci = int(c % a.C_in);
  cols[i] = buf[(long(b) * a.rows + long(t) * a.stride + long(k) * a.dilation) * a.C_in + ci];
}

// Element i of y [rows, cols] = bias[col].
template <class F>
PP_DEVICE void bias_rows(const PP_GLOBAL typename F::Elem* bias, PP_GLOBAL typename F::Elem* y, RowsArgs a,
                         long i) {
  if (i >= long(a.rows) * a.cols) return;
  y[i] = bias[i % a.cols];
}

// Element i over (b, r, co), r < T * stride + overlap: the transposed conv's row r from
// z [B, T, K, C_out] (x times every tap), summed over the taps k = r (mod stride)
// whose frame t = (r - k) / stride exists, plus the carried partial for r < overlap;
// rows below T * stride (plus bias) are y, the rest the next partial.
template <class F>
PP_DEVICE void col2im(const PP_GLOBAL typename F::Elem* z, const PP_GLOBAL typename F::Elem* partial,
                      const PP_GLOBAL typename F::Elem* bias, PP_GLOBAL typename F::Elem* y,
                      PP_GLOBAL typename F::Elem* next, Col2imArgs a, long i) {
  const int overlap = a.K - a.stride, n_out = a.T * a.stride, rows = n_out + overlap;
  if (i >= long(a.B) * rows * a.C_out) return;
  const int co = int(i % a.C_out);
  const long br = i / a.C_out;
  const int r = int(br % rows), b = int(br / rows);
  float acc = 0.f;
  int k = r % a.stride;
  const int t_top = (r - k) / a.stride;
  if (t_top >= a.T) k += (t_top - a.T + 1) * a.stride;
  for (; k < a.K && k <= r; k += a.stride) {
    acc += F::load(z[((long(b) * a.T + (r - k) / a.stride) * a.K + k) * a.C_out + co]);
  }
  if (r < overlap) acc += F::load(partial[(long(b) * overlap + r) * a.C_out + co]);
  if (r < n_out) {
    y[(long(b) * n_out + r) * a.C_out + co] = F::store(a.has_bias ? acc + F::load(bias[co]) : acc);
  } else {
    next[(long(b) * overlap + (r - n_out)) * a.C_out + co] = F::store(acc);
  }
}

PP_DEVICE int ring_slot(int t, int R) {
  const int s = t % R;
  return s < 0 ? s + R : s;
}

// Thread b. tokens [B, 1 + n_q, R], forced [B, 1 + dep_q, R], offsets [B],
// delays [1 + n_q]; sem [B, n_sem] and ac [B, codebooks - n_sem] the codec's
// codes; writes cur [1 + n_q, B] (the step's input tokens) and now
// [1 + dep_q, B] (the tokens forced at the frame generated now, -1: none).
PP_DEVICE void frame_in(PP_GLOBAL int* tokens, PP_GLOBAL int* forced, const PP_GLOBAL int* offsets,
                        const PP_GLOBAL int* delays, const PP_GLOBAL int* sem, const PP_GLOBAL int* ac,
                        int n_ac, PP_GLOBAL int* cur, PP_GLOBAL int* now, FrameArgs a, int b) {
  if (b >= a.B) return;
  const int o = offsets[b];
  const int S = 1 + a.n_q, G = 1 + a.dep_q;
  PP_GLOBAL int* tr = tokens + long(b) * S * a.R;
  PP_GLOBAL int* fr = forced + long(b) * G * a.R;
  for (int c = 0; c < a.user_q; ++c) {
    const int s = 1 + a.dep_q + c;
    const int code = c < a.n_sem ? sem[b * a.n_sem + c] : ac[b * n_ac + (c - a.n_sem)];
    tr[s * a.R + ring_slot(o + delays[s], a.R)] = code;
  }
  for (int j = 0; j < G; ++j) fr[j * a.R + ring_slot(o + 1 + delays[j], a.R)] = kTokenNotForced;
  for (int s = 0; s < S; ++s) {
    const int initial = s == 0 ? a.text_initial : a.audio_initial;
    cur[s * a.B + b] = o <= delays[s] ? initial : tr[s * a.R + ring_slot(o, a.R)];
  }
  for (int j = 0; j < G; ++j) now[j * a.B + b] = fr[j * a.R + ring_slot(o + 1, a.R)];
}

// Thread b. gen [1 + dep_q, B] the tokens sampled this step (text, then the
// codebooks). Advances offsets[b]; writes out [B, 1 + dep_q] (-2 while not
// valid), the decoder's codes sem [B, n_sem] and ac [B, dep_q - n_sem] (0 while
// not valid, clamped below card) and valid [B].
PP_DEVICE void frame_out(PP_GLOBAL int* tokens, PP_GLOBAL int* offsets, const PP_GLOBAL int* delays,
                         const PP_GLOBAL int* gen, PP_GLOBAL int* out, PP_GLOBAL int* sem, PP_GLOBAL int* ac,
                         PP_GLOBAL int* valid, FrameArgs a, int b) {
  if (b >= a.B) return;
  const int o = offsets[b] + 1;
  offsets[b] = o;
  const int S = 1 + a.n_q, G = 1 + a.dep_q;
  PP_GLOBAL int* tr = tokens + long(b) * S * a.R;
  for (int j = 0; j < G; ++j) tr[j * a.R + ring_slot(o, a.R)] = gen[j * a.B + b];
  const int ok = o > a.max_delay;
  valid[b] = ok;
  const int n_ac = a.dep_q - a.n_sem;
  for (int j = 0; j < G; ++j) {
    const int t = ok ? tr[j * a.R + ring_slot(o - a.max_delay + delays[j], a.R)] : kTokenUngenerated;
    out[b * G + j] = t;
    if (j == 0) continue;
    const int code = !ok || t < 0 ? 0 : (t >= a.card ? a.card - 1 : t);
    if (j - 1 < a.n_sem) {
      sem[b * a.n_sem + (j - 1)] = code;
    } else {
      ac[b * n_ac + (j - 1 - a.n_sem)] = code;
    }
  }
}

// Philox4x32-10 (Salmon et al., SC 2011): four 32-bit words from a 128-bit
// counter and a 64-bit key.
PP_DEVICE void mulhilo(pp_u32 a, pp_u32 b, PP_THREAD pp_u32& hi, PP_THREAD pp_u32& lo) {
  lo = a * b;
  hi = pp_mul_hi(a, b);
}

PP_DEVICE void philox(PP_THREAD pp_u32* c, pp_u32 k0, pp_u32 k1) {
  for (int r = 0; r < 10; ++r) {
    pp_u32 hi0, lo0, hi1, lo1;
    mulhilo(0xD2511F53u, c[0], hi0, lo0);
    mulhilo(0xCD9E8D57u, c[2], hi1, lo1);
    const pp_u32 n0 = hi1 ^ c[1] ^ k0, n2 = hi0 ^ c[3] ^ k1;
    c[0] = n0;
    c[1] = lo1;
    c[2] = n2;
    c[3] = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
}

// Element i of noise [streams, B, V]: stream s of session b at its frame offsets[b].
PP_DEVICE void gumbel(const PP_GLOBAL pp_u32* seeds, const PP_GLOBAL int* offsets, PP_GLOBAL float* out,
                      GumbelArgs a, long i) {
  if (i >= long(a.streams) * a.B * a.V) return;
  const int v = int(i % a.V);
  const long sb = i / a.V;
  const int b = int(sb % a.B), s = int(sb / a.B);
  pp_u32 c[4] = {pp_u32(v >> 2), pp_u32(offsets[b]), pp_u32(a.stream0 + s), 0x7069636bu};
  philox(c, seeds[b], 0x706c6578u);
  // 24 random bits, centred in their interval: u in (0, 1), never 0 or 1.
  const float u = (float(c[v & 3] >> 8) + 0.5f) * (1.f / 16777216.f);
  out[i] = -pp_log(-pp_log(u));
}

// Block (r, b): region r of session b, where control column 0 holds one of its bits.
PP_DEVICE void fill_rows(PP_GLOBAL unsigned char* arena, const PP_GLOBAL FillRegion* regions,
                         const PP_GLOBAL int* control, int control_cols, int r, int b, int tid) {
  const FillRegion g = regions[r];
  if (!(control[b * control_cols] & g.mask)) return;
  const pp_u32 pattern = g.control_col >= 0 ? pp_u32(control[b * control_cols + g.control_col]) : g.pattern;
  PP_GLOBAL unsigned char* row = arena + g.offset + long(b) * g.row_bytes;
  for (long i = tid; i < g.row_bytes; i += kTickThreads) row[i] = (unsigned char)(pattern >> (8 * (i & 3)));
}

// Thread i over the entries' elements, entry by entry (entries [n]).
PP_DEVICE void update(PP_GLOBAL unsigned char* arena, const PP_GLOBAL UpdateEntry* entries, int n, long i) {
  for (int e = 0; e < n; ++e) {
    const UpdateEntry u = entries[e];
    if (i < u.count) {
      if (u.mode == 0) {
        PP_GLOBAL int* p = (PP_GLOBAL int*)(arena + u.offset);
        p[i] += u.value;
      } else {
        arena[u.offset + i] = (unsigned char)u.value;
      }
    }
  }
}

}  // namespace tick

#endif

#if !defined(__METAL_VERSION__)
// Launch plans, for csrc/tick_cuda.cpp and tests/emulator/tick.cpp.

#include "launch.cuh"

// A thread per item (gelu, scale_add, gate, im2col, bias_rows, col2im, gumbel, mute,
// update), or per session (frame_in, frame_out).
inline PpLaunch tick_flat_launch(long items) {
  return {.grid_x = pp_blocks_for("tick", items, kTickThreads), .grid_y = 1, .grid_z = 1, .threads = kTickThreads};
}

// norm: a block per row.
inline PpLaunch tick_norm_launch(const NormArgs& a) {
  return {.grid_x = static_cast<unsigned int>(a.rows), .grid_y = 1, .grid_z = 1, .threads = kTickThreads};
}

// fill_rows: a block per region and session.
inline PpLaunch tick_fill_launch(int regions, int B) {
  return {.grid_x = static_cast<unsigned int>(regions), .grid_y = static_cast<unsigned int>(B), .grid_z = 1,
          .threads = kTickThreads};
}

// col2im: a thread per output row and channel (y's rows, then the next partial's).
inline long col2im_outputs(const Col2imArgs& a) { return long(a.B) * (long(a.T) * a.stride + a.K - a.stride) * a.C_out; }
#endif
