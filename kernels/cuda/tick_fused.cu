// The tick program's fused runs (kernels/tick_fused.cuh): tick_fused_<dtype>_<dense|q4|q8>,
// one persistent kernel running a run's phases, each over its grid of virtual blocks,
// with a grid-wide barrier between them. Launched with exactly the blocks that fit on
// the device at once (csrc/tick_cuda.cpp asks the driver), so every block is resident
// and the barrier cannot wait for one that never starts.

#include "../portable.h"

// The bodies' barriers, for virtual blocks of 128 or 256 threads: a named barrier per
// group of threads (1 + threadIdx.x / group), so that the two 128-thread halves of a
// block run different virtual blocks without waiting for each other. Set before the
// bodies are included, so that their PP_BARRIER() is this one.
__shared__ int tick_fused_group_threads;
__device__ __forceinline__ void tick_fused_barrier() {
  const int n = tick_fused_group_threads;
  asm volatile("bar.sync %0, %1;" ::"r"(1 + int(threadIdx.x) / n), "r"(n) : "memory");
}
#undef PP_BARRIER
#define PP_BARRIER() tick_fused_barrier()

#include "../depformer_frame.cuh"
#include "../matvec.cuh"
#include "../matvec_tc.cuh"
#include "../ring_attention.cuh"
#include "../sample_topk.cuh"
#include "../tick.cuh"
#include "../tick_fused.cuh"

static_assert(kTickFusedThreads == matvec_tc::kThreads && kTickFusedThreads == kMatvecTcFinishThreads &&
                  kTickFusedThreads == kSampleThreads && kTickFusedThreads == kEmbedThreads &&
                  kTickFusedThreads == kTickThreads && 2 * matvec::kThreads == kTickFusedThreads &&
                  2 * ring::kThreads == kTickFusedThreads,
              "virtual blocks of 256 threads, or two of 128");
static_assert(sizeof(MatvecTcArgs) <= kTickFusedArgBytes && sizeof(MatvecArgs) <= kTickFusedArgBytes &&
                  sizeof(RingArgs) <= kTickFusedArgBytes && sizeof(SampleArgs) <= kTickFusedArgBytes &&
                  sizeof(EmbedArgs) <= kTickFusedArgBytes && sizeof(NormArgs) <= kTickFusedArgBytes &&
                  sizeof(GumbelArgs) <= kTickFusedArgBytes,
              "a phase holds its launch's scalars");
static_assert(2 * 8 * 8 * matvec_tc::kStep <= kTickFusedSmemBytes &&
                  2 * 4 * (matvec::kWarps * matvec::kRows * 8 + 8) <= kTickFusedSmemBytes &&
                  2 * 4 * ring::kWarps * (128 + 2) <= kTickFusedSmemBytes &&
                  4 * sample_topk::kShared <= kTickFusedSmemBytes,
              "workgroup memory for every body (a half each for two of 128 threads)");

namespace tick_fused {

// Every block: arrive, wait for all, then see every block's writes before the phase.
__device__ __forceinline__ void grid_barrier(unsigned int* bar) {
  __syncthreads();
  if (threadIdx.x == 0) {
    volatile unsigned int* gen = bar + 1;
    const unsigned int g = *gen;
    __threadfence();
    if (atomicAdd(bar, 1u) == gridDim.x - 1) {
      atomicExch(bar, 0u);
      __threadfence();
      atomicAdd(bar + 1, 1u);
    } else {
      while (*gen == g) {
      }
    }
    __threadfence();
  }
  __syncthreads();
}

template <class T>
__device__ __forceinline__ T arg(const TickFusedPhase& ph) {
  return *reinterpret_cast<const T*>(ph.args);
}

// One virtual block (x, y, z) of phase ph, by thread tid of its group.
template <class F, class W>
__device__ __forceinline__ void run_block(const TickFusedPhase& ph, unsigned char* smem, int x, int y, int z,
                                          int tid) {
  typedef typename F::Elem E;
  void* const* p = ph.p;
  auto e = [&](int i) { return static_cast<E*>(p[i]); };
  auto f = [&](int i) { return static_cast<float*>(p[i]); };
  auto u8 = [&](int i) { return static_cast<unsigned char*>(p[i]); };
  auto i32 = [&](int i) { return static_cast<int*>(p[i]); };
  const long flat = long(x) * kTickFusedThreads + tid;
  switch (ph.kind) {
    case kFusedTcRms:
      matvec_tc::rms<F>(e(0), f(1), arg<MatvecTcArgs>(ph), reinterpret_cast<float*>(smem), x, tid);
      break;
#define TC(N)                                                                                            \
  case kFusedTcN##N:                                                                                     \
    matvec_tc::project<F, W, N, false>(e(0), static_cast<const pp_u32*>(p[1]), e(2), e(3), e(4), f(5), f(6), \
                                       arg<MatvecTcArgs>(ph), reinterpret_cast<E*>(smem), x, y, tid);   \
    break;
      TC(1) TC(2) TC(4) TC(8)
#undef TC
    case kFusedTcFinish:
      matvec_tc::finish<F>(f(0), e(1), e(2), arg<MatvecTcArgs>(ph), flat);
      break;
#define MV(N, KIND)                                                                                      \
  case KIND:                                                                                             \
    matvec::matvec<F, W, N>(e(0), static_cast<const pp_u32*>(p[1]), e(2), e(3), e(4), e(5), e(6),       \
                            arg<MatvecArgs>(ph), reinterpret_cast<float*>(smem), x, y, tid);             \
    break;
      MV(1, kFusedMvM1) MV(2, kFusedMvM2) MV(4, kFusedMvM4) MV(8, kFusedMvM8)
#undef MV
#define ATTEND(D)                                                                                        \
  case kFusedAttendD##D:                                                                                 \
    ring::attend<F, ring::Plain<F>, D, 1>(e(0), e(1), e(2), e(3), e(4), nullptr, nullptr, i32(5), f(6),  \
                                          arg<RingArgs>(ph), reinterpret_cast<float*>(smem), x, y, z, tid); \
    break;                                                                                               \
  case kFusedAttendI8D##D:                                                                               \
    ring::attend<F, ring::Int8Rows<F>, D, 1>(e(0), e(1), e(2), u8(3), u8(4), f(5), f(6), i32(7), f(8),   \
                                             arg<RingArgs>(ph), reinterpret_cast<float*>(smem), x, y, z, tid); \
    break;
      ATTEND(64) ATTEND(128)
#undef ATTEND
    case kFusedRingFinish:
      ring::finish<F, ring::Plain<F>>(f(0), e(1), e(2), i32(3), e(4), e(5), nullptr, nullptr, e(6), e(7), e(8),
                                      nullptr, nullptr, arg<RingArgs>(ph), x, y, tid);
      break;
    case kFusedRingFinishI8:
      ring::finish<F, ring::Int8Rows<F>>(f(0), e(1), e(2), i32(3), u8(4), u8(5), f(6), f(7), e(8), u8(9), u8(10),
                                         f(11), f(12), arg<RingArgs>(ph), x, y, tid);
      break;
    case kFusedSample:
      sample_topk::sample<F>(e(0), f(1), i32(2), i32(3), arg<SampleArgs>(ph), reinterpret_cast<float*>(smem), x,
                             tid);
      break;
    case kFusedEmbed:
      depformer_frame::embed_add<F>(e(0), e(1), i32(2), e(3), arg<EmbedArgs>(ph), flat);
      break;
    case kFusedNorm:
      tick::norm<F>(e(0), e(1), e(2), e(3), arg<NormArgs>(ph), reinterpret_cast<float*>(smem), x, tid);
      break;
    case kFusedGumbel:
      tick::gumbel(static_cast<const pp_u32*>(p[0]), i32(1), f(2), arg<GumbelArgs>(ph), flat);
      break;
    default:
      break;
  }
}

// The run: each phase's virtual blocks spread over the grid (two at a time in a block
// for 128-thread bodies), then a barrier.
template <class F, class W>
__device__ void run(const TickFusedPhase* phases, int n, unsigned int* bar, unsigned char* smem) {
  for (int i = 0; i < n; ++i) {
    const TickFusedPhase& ph = phases[i];
    const int group = tick_fused_group(ph.kind), groups = kTickFusedThreads / group;
    if (threadIdx.x == 0) tick_fused_group_threads = group;
    __syncthreads();
    const int g = int(threadIdx.x) / group, tid = int(threadIdx.x) % group;
    const long gx = ph.grid_x, gxy = gx * ph.grid_y, total = gxy * ph.grid_z;
    unsigned char* mine = smem + g * (kTickFusedSmemBytes / groups);
    for (long vb = long(blockIdx.x) * groups + g; vb < total; vb += long(gridDim.x) * groups) {
      run_block<F, W>(ph, mine, int(vb % gx), int(vb % gxy / gx), int(vb / gxy), tid);
      PP_BARRIER();  // the group's workgroup memory is free for its next block
    }
    if (i + 1 < n) grid_barrier(bar);
  }
}

}  // namespace tick_fused

#define TICK_FUSED(DT, F, WN, W)                                                                        \
  extern "C" __global__ void __launch_bounds__(kTickFusedThreads, 1)                                    \
      tick_fused_##DT##_##WN(const TickFusedPhase* phases, int n, unsigned int* bar) {                   \
    pp_grid_dependency();                                                                                \
    __shared__ __align__(16) unsigned char smem[kTickFusedSmemBytes];                                   \
    tick_fused::run<F, W>(phases, n, bar, smem);                                                         \
  }

TICK_FUSED(bf16, pp::BF16, dense, matvec::Dense<pp::BF16>)
TICK_FUSED(bf16, pp::BF16, q4, matvec::Affine<4>)
TICK_FUSED(bf16, pp::BF16, q8, matvec::Affine<8>)
