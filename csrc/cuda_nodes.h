// Kernel nodes of our primitives added to MLX's CUDA graph from raw device
// pointers, so that a composite primitive (decoder_layers) chains them in one
// eval_gpu. MLX orders the nodes of its graph by data flow: before each node,
// the arrays it reads and writes are registered (set_input_array /
// set_output_array), and a node waits for the last writer of what it reads. So
// every node function takes the arrays behind its pointers: `reads`, `writes`.

#pragma once

#include <string>
#include <utility>
#include <vector>

#include "cuda_common.h"
#include "decoder_layers_common.h"  // Proj
#include "matvec.cuh"          // MatvecArgs
#include "matvec_tc.cuh"       // MatvecTcArgs
#include "ring_attention.cuh"  // RingArgs
#include "sample_topk.cuh"     // SampleArgs

namespace personaplex::cuda {

struct MatvecNode {
  mx::Dtype dtype;
  int bits;  // 0: dense
  void *x, *w, *scales, *biases, *alpha, *residual, *out;  // unused ones null
  MatvecArgs args;
};
using Arrays = std::vector<const mx::array*>;

// One projection: matvec.cuh's kernel, or for 16-bit x of enough rows the tensor-core
// path of matvec_tc.cuh (64 rows at a time; its workspace as a temporary).
void add_matvec(mx::cu::CommandEncoder& enc, const MatvecNode& n, const Arrays& reads,
                const Arrays& writes);

// p + bytes, or null for null (an absent operand).
inline void* offset(void* p, size_t bytes) { return p ? static_cast<char*>(p) + bytes : nullptr; }

// Whether a projection takes the tensor-core path: matvec_tc_supported and at least
// PERSONAPLEX_MATVEC_TC_MIN_ROWS rows (default 2, every weight format; 65 turns the
// path off).
bool matvec_takes_tc(const MatvecArgs& a, mx::Dtype dtype, int bits);

// The tensor-core kernel that takes a chunk of M rows (at most 64) of 16-bit x of dtype
// name dt, and the blocks of it that run at once on `device` (its multiprocessors times
// the blocks the driver's occupancy calculator fits on one): matvec_tc_args' slots.
inline std::string matvec_tc_kernel(const std::string& dt, int bits, int M) {
  return "matvec_tc_" + dt + "_" + matvec_weights_name(bits) + "_n" + std::to_string(matvec_tc_tiles(M)) +
         (matvec_tc_ahead(bits, M) ? "_ahead" : "");
}
int matvec_tc_slots(const std::string& dt, int bits, int M, int device);

// The tensor-core path's launches, in order, through launch(image-relative kernel
// name, plan, params); ws holds matvec_tc_workspace_floats(t) floats.
template <class Launch>
void matvec_tc_launches(const std::string& dt, int bits, const MatvecTcArgs& t, void* x, void* w, void* scales,
                        void* biases, void* alpha, void* residual, void* out, float* ws, Launch launch) {
  MatvecTcArgs args = t;
  void* rms = ws;
  void* part = ws + (t.M + 3) / 4 * 4;
  if (t.norm) {
    void* params[] = {&x, &rms, &args};
    launch("matvec_tc_rms_" + dt, matvec_tc_rms_launch(t), params);
  }
  {
    void* params[] = {&x, &w, &scales, &biases, &alpha, &rms, &part, &args};
    launch(matvec_tc_kernel(dt, bits, t.M), matvec_tc_launch(t), params);
  }
  void* params[] = {&part, &residual, &out, &args};
  launch("matvec_tc_finish_" + dt, matvec_tc_finish_launch(t), params);
}

struct RingNode {
  mx::Dtype dtype;
  void *q, *k, *v, *kc, *vc, *pos, *out, *kc_out, *vc_out;
  RingArgs args;  // S (window splits) is chosen here
};
// Adds the attend and finish kernels, with their workspace as a temporary.
void add_ring_attention(mx::cu::CommandEncoder& enc, RingNode n, const Arrays& reads,
                        const Arrays& writes);

struct SampleNode {
  mx::Dtype dtype;  // of the logits
  void *logits, *noise, *forced, *out;  // noise, forced: null when absent
  int rows;
  SampleArgs args;
};
void add_sample_topk(mx::cu::CommandEncoder& enc, const SampleNode& n, const Arrays& reads,
                     const Arrays& writes);

// What a matvec node over projection p of `inputs` reads: its arrays, then `more`.
Arrays proj_reads(const std::vector<mx::array>& inputs, const Proj& p,
                  std::initializer_list<const mx::array*> more);

// A stack of decoder layers for one decode step (decoder_layers_common.h's
// StackShape): 6 nodes per layer. pos points at B int32 positions inside the array
// pos_array.
struct StackNode {
  StackShape stack;
  const mx::array* pos_array;
  void* pos;
};
void add_decoder_layers(mx::cu::CommandEncoder& enc, const StackNode& n);

// Ring caches taken over in place (see ring_attention.h and ring_attention_cuda.cpp):
// whether input cache `in` of a primitive with `siblings` outputs may be overwritten;
// one synchronize if any such cache is still read by work in flight; then out
// takes in's buffer (true) or a fresh one that `finish` fills with a copy (false).
bool cache_free(const mx::array& in, int siblings);
void wait_for_caches(const std::vector<std::pair<const mx::array*, bool>>& caches,
                     mx::cu::CommandEncoder& enc);
bool take_cache(const mx::array& in, mx::array& out, bool free, mx::cu::CommandEncoder& enc);

}  // namespace personaplex::cuda
