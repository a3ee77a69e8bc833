// The tick program's fused runs (CUDA only): a run of consecutive launches of the
// program's small kernels (the projections, attention, sampling and embeddings of the
// LM step at a few sessions) executed by one persistent kernel,
// tick_fused_<dtype>_<dense|q4|q8> (kernels/cuda/tick_fused.cu), instead of one launch
// each. The host (csrc/tick_cuda.cpp) records each launch as a phase: which body, its
// grid, its pointers and its scalars, exactly as the launch would have had them. The
// kernel runs the phases in order, each over the phase's grid of virtual blocks spread
// across its own resident blocks, with a grid-wide barrier between phases. The same
// bodies over the same grids, so a fused tick computes the same bits as the launches.
//
// Why: at 1-8 sessions most of a tick is ~600 small dependent kernels (the depformer's
// 8 codebooks x 6 layers), each waiting for its predecessor to drain and launch; a
// barrier costs about a microsecond, a dependent launch several (docs/PERF.md).
//
// Bodies of 128 threads (matvec's streaming kernel, ring attention) run two virtual
// blocks at once in a block of 256, each half with its own named barrier and half of
// the workgroup memory.

#pragma once

#include "portable.h"  // PP_CONSTANT

PP_CONSTANT constexpr int kTickFusedThreads = 256;
PP_CONSTANT constexpr int kTickFusedPointers = 13;  // the most a fused kernel takes (ring_finish_..._i8)
PP_CONSTANT constexpr int kTickFusedArgBytes = 128;
PP_CONSTANT constexpr int kTickFusedSmemBytes = 32768;  // matvec_tc's x tile at 64 rows, the largest

// The bodies a phase may run; _n / _m / _d: the kernel's tile, rows or head size.
enum TickFusedKind {
  kFusedTcRms,      // matvec_tc_rms_<dt>
  kFusedTcN1,       // matvec_tc_<dt>_<w>_n1 (n2, n4, n8 follow)
  kFusedTcN2,
  kFusedTcN4,
  kFusedTcN8,
  kFusedTcFinish,   // matvec_tc_finish_<dt>
  kFusedMvM1,       // matvec_<dt>_<w>_m1 (m2, m4, m8 follow)
  kFusedMvM2,
  kFusedMvM4,
  kFusedMvM8,
  kFusedAttendD64,  // ring_attend_<dt>_d64_q1
  kFusedAttendD128,
  kFusedAttendI8D64,  // ring_attend_<dt>_i8_d64_q1
  kFusedAttendI8D128,
  kFusedRingFinish,    // ring_finish_<dt>
  kFusedRingFinishI8,  // ring_finish_<dt>_i8
  kFusedSample,        // sample_topk_<dt>
  kFusedEmbed,         // embed_add_<dt>
  kFusedNorm,          // tick_norm_<dt>
  kFusedGumbel,        // tick_gumbel
  kFusedKinds
};

// One phase: a launch as it would have been made. p: the kernel's pointer parameters in
// order (then nothing else but its one scalars struct, copied into args).
struct TickFusedPhase {
  int kind;
  unsigned int grid_x, grid_y, grid_z;
  void* p[kTickFusedPointers];
  alignas(8) unsigned char args[kTickFusedArgBytes];
};

// Threads of a virtual block of `kind`: 128 for the bodies written for 4 warps.
#if defined(__CUDACC__)
__host__ __device__
#endif
inline int tick_fused_group(int kind) {
  return (kind >= kFusedMvM1 && kind <= kFusedMvM8) || (kind >= kFusedAttendD64 && kind <= kFusedRingFinishI8)
             ? 128
             : 256;
}

// Pointer parameters of `kind`'s kernel (before its scalars struct).
inline int tick_fused_pointers(int kind) {
  switch (kind) {
    case kFusedTcRms: return 2;
    case kFusedTcFinish: case kFusedGumbel: return 3;
    case kFusedSample: case kFusedEmbed: case kFusedNorm: return 4;
    case kFusedAttendI8D64: case kFusedAttendI8D128: case kFusedRingFinish: return 9;
    case kFusedRingFinishI8: return 13;
    default: return 7;  // the projections and the plain attention
  }
}
