// Dispatches of our primitives' kernels on MLX's Metal command encoder from arrays
// at byte offsets, so that a composite primitive (decoder_layers,
// depformer_frame) chains them in one eval_gpu, as cuda_nodes.h does for CUDA.
// Each binds what it reads and writes through metal::bind_in / bind_out, which
// is how MLX's encoder orders a dispatch after the one that wrote its inputs.

#pragma once

#include <vector>

#include "decoder_layers_common.h"  // Proj
#include "matvec.cuh"               // MatvecArgs
#include "metal_common.h"
#include "ring_attention.cuh"  // RingArgs
#include "sample_topk.cuh"     // SampleArgs

namespace personaplex::metal {

struct MatvecNode {
  mx::Dtype dtype;
  int bits;  // 0: dense
  Buf x, w, scales, biases, alpha, residual, out;  // unused ones absent
  MatvecArgs args;
};
void add_matvec(mx::metal::CommandEncoder& enc, mx::metal::Device& d, const MatvecNode& n);

struct RingNode {
  mx::Dtype dtype;
  Buf q, k, v, kc, vc, pos, out, kc_out, vc_out;
  RingArgs args;  // S (window splits) is chosen here
};
// The attend and finish kernels, with their workspace as a temporary.
void add_ring_attention(mx::metal::CommandEncoder& enc, mx::metal::Device& d, RingNode n);

struct SampleNode {
  mx::Dtype dtype;  // of the logits
  Buf logits, noise, forced, out;  // noise, forced: absent when not given
  int rows;
  SampleArgs args;
};
void add_sample_topk(mx::metal::CommandEncoder& enc, mx::metal::Device& d, const SampleNode& n);

// The projection p of `inputs` as a matvec's weight operands.
struct ProjBufs {
  Buf w, scales, biases;
};
ProjBufs proj_bufs(const std::vector<mx::array>& inputs, const Proj& p);

// A stack of decoder layers for one decode step (decoder_layers_common.h's
// StackShape); pos is B int32 positions at a byte offset into an array.
struct StackNode {
  StackShape stack;
  Buf pos;
};
void add_decoder_layers(mx::metal::CommandEncoder& enc, mx::metal::Device& d, const StackNode& n);

}  // namespace personaplex::metal
