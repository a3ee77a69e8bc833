// The CPU kernels of our primitives on raw pointers, for composite primitives
// (decoder_layers) that chain them inside one CPU task. Dtype-dispatched:
// float32, bfloat16 or float16 storage.

#pragma once

#include <cstdint>

#include "mlx/dtype.h"

namespace personaplex {
struct LayerPointers;  // decoder_layers_common.h
}

namespace personaplex::cpu {

namespace mx = mlx::core;

// See matvec.h; x [M, K], w [N, K] or packed, out [M, N or N / 2].
void matvec(mx::Dtype dtype, const void* x, const void* w, const void* scales, const void* biases,
            const void* alpha, const void* residual, void* out, int M, int K, int N, int bits,
            bool gate, float eps);

// See ring_attention.h: attention of q over the ring window, q, k, v, out
// [B, H, T, D] contiguous, caches [B, H, W, D]; k_rot receives the rotated new keys.
// chunk_window: every query's window ends at the chunk's last position (RingArgs).
void ring_attend(mx::Dtype dtype, const void* q, const void* k, const void* v, const void* kc,
                 const void* vc, const int32_t* pos, void* out, void* k_rot, int B, int H, int T,
                 int D, int W, float scale, float rope_max_period, bool chunk_window = false);

// Writes the new rows nw [B, H, T, D] into the ring cache [B, H, W, D].
void ring_write(mx::Dtype dtype, void* cache, const void* nw, const int32_t* pos, int B, int H, int T,
                int D, int W);

// The same over an 8-bit ring (the tick program's kv_bits 8): int8 codes [B, H, W, D] and
// float32 scales [B, H, W], a row read as code * scale; ring_write8 quantizes each new row
// (scale = absmax / 127, code = round(x / scale), ties to even; nw as the plain ring stores it).
void ring_attend8(mx::Dtype dtype, const void* q, const void* k, const void* v, const int8_t* kc,
                  const int8_t* vc, const float* ks, const float* vs, const int32_t* pos, void* out,
                  void* k_rot, int B, int H, int T, int D, int W, float scale, float rope_max_period,
                  bool chunk_window = false);
void ring_write8(mx::Dtype dtype, int8_t* codes, float* scales, const void* nw, const int32_t* pos, int B,
                 int H, int T, int D, int W);

// See decoder_layers.h: x [B, C] through L layers into y [B, C]. Layer l attends
// over kc[l] / vc[l] [B, H, W, D] and writes its new key and value into
// kc_out[l] / vc_out[l], which are the same buffers, or (copy[l], copy[L + l])
// fresh ones that first receive a copy of cache_bytes.
void decoder_layers(mx::Dtype dtype, const void* x, void* y, const int32_t* pos,
                    const LayerPointers* layers, int L, const void* const* kc, const void* const* vc,
                    void* const* kc_out, void* const* vc_out, const char* copy, size_t cache_bytes,
                    int B, int C, int H, int W, int hidden, int bits, float eps, float rope_max_period);

// See sample_topk.h: tokens[r] for the R rows of logits [R, V]; noise [R, V]
// float32 or null; forced [R] or null.
void sample_topk(mx::Dtype dtype, const void* logits, const float* noise, const int32_t* forced,
                 int32_t* tokens, int R, int V, float temp, int top_k, bool greedy);

// See conv1d_stream.h; x [B, T, C_in], prev [B, context, C_in] (may be prev_out: the
// session's context is read before it is rewritten), first [B] or null.
void conv1d_stream(mx::Dtype dtype, const void* x, const void* prev, const void* w, const void* bias,
                   const bool* first, void* y, void* prev_out, int B, int T, int C_in, int C_out, int K,
                   int context, int stride, int dilation, int groups, bool elu_input);

// See conv_transpose1d_stream.h; partial may be partial_out.
void conv_transpose1d_stream(mx::Dtype dtype, const void* x, const void* partial, const void* w,
                             const void* bias, void* y, void* partial_out, int B, int T, int C_in,
                             int C_out, int K, int stride, int groups, bool elu_input);

// See rvq.h: codes [n, n_q] of x [n, D]; out [n, D] from codes [n, n_q] (float32 books [n_q, bins, D]).
void rvq_encode(const float* x, const float* books, int32_t* codes, size_t n, int n_q, int bins, int D);
void rvq_decode(const int32_t* codes, const float* books, float* out, size_t n, int n_q, int bins, int D);

// depformer_frame's embed_add: out[b] = T(pre[b] + table[tokens[b]]), token -1 a zero row,
// others clamped to the table's rows; out may be pre.
void embed_add(mx::Dtype dtype, const void* pre, const void* table, const int32_t* tokens, void* out,
               int B, int D, int rows);

}  // namespace personaplex::cpu
