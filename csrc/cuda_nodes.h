// Kernel nodes of our primitives added to MLX's CUDA graph from raw device
// pointers, so that a composite primitive (decoder_layers) chains them in one
// eval_gpu. MLX orders the nodes of its graph by data flow: before each node,
// the arrays it reads and writes are registered (set_input_array /
// set_output_array), and a node waits for the last writer of what it reads. So
// every node function takes the arrays behind its pointers: `reads`, `writes`.

#pragma once

#include <utility>
#include <vector>

#include "cuda_common.h"
#include "matvec.cuh"          // MatvecArgs
#include "ring_attention.cuh"  // RingArgs

namespace personaplex::cuda {

struct MatvecNode {
  mx::Dtype dtype;
  int bits;  // 0: dense
  void *x, *w, *scales, *biases, *alpha, *residual, *out;  // unused ones null
  MatvecArgs args;
};
using Arrays = std::vector<const mx::array*>;

void add_matvec(mx::cu::CommandEncoder& enc, const MatvecNode& n, const Arrays& reads,
                const Arrays& writes);

struct RingNode {
  mx::Dtype dtype;
  void *q, *k, *v, *kc, *vc, *pos, *out, *kc_out, *vc_out;
  RingArgs args;  // S (window splits) is chosen here
};
// Adds the attend and finish kernels, with their workspace as a temporary.
void add_ring_attention(mx::cu::CommandEncoder& enc, RingNode n, const Arrays& reads,
                        const Arrays& writes);

// Ring caches taken over in place (see ring_attention.h and ring_attention_cuda.cpp):
// whether input cache `in` of a primitive with `siblings` outputs may be overwritten;
// one synchronize if any such cache is still read by work in flight; then out
// takes in's buffer (true) or a fresh one that `finish` fills with a copy (false).
bool cache_free(const mx::array& in, int siblings);
void wait_for_caches(const std::vector<std::pair<const mx::array*, bool>>& caches,
                     mx::cu::CommandEncoder& enc);
bool take_cache(const mx::array& in, mx::array& out, bool free, mx::cu::CommandEncoder& enc);

}  // namespace personaplex::cuda
