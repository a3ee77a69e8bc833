// kernels/portable.h for a host compiler: runs the shared kernel bodies
// (kernels/*.cuh) on the CPU so that CI without a GPU tests their logic.
//
// tests/test_kernel_emulator.py copies kernels/*.cuh next to this file renamed
// portable.h (their `#include "portable.h"` then finds it) and compiles the drivers
// tests/emulator/{matvec,ring_attention}.cpp (and, for tests/test_codec_emulator.py,
// {conv1d_stream,conv_transpose1d_stream,rvq}.cpp) with -DPP_EMULATE, which opens
// the bodies' guards.
//
// Execution model: the blocks of a launch run one after another; the threads
// of a block run as cooperative fibers on one OS thread (ucontext starts each
// fiber on its own stack once per launch; _setjmp / _longjmp switch between
// them, which unlike swapcontext costs no system call; the driver is built
// without _FORTIFY_SOURCE, whose longjmp check rejects a switch of stacks). A fiber
// runs until it reaches a barrier (PP_BARRIER over the block, or the warp
// barrier inside pp_shfl_xor), then yields. Each scheduling pass visits the
// runnable fibers in a fresh pseudo-random order, so a missing barrier shows
// as a wrong result rather than being hidden by a fixed thread order; a
// barrier that some thread never reaches (divergent __syncthreads, a shuffle
// in a divergent branch) is reported as a deadlock. Shared memory and the
// workspaces start as NaN, and 16- and 4-byte loads and stores check their alignment.

#pragma once

#include <setjmp.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "launch.cuh"  // PpLaunch: the kernels' launch plans

#define PP_DEVICE inline
#define PP_GLOBAL
#define PP_SHARED
#define PP_SHARED_PTR
#define PP_THREAD
#define PP_CONSTANT
#define PP_BARRIER() pp_emu::block_barrier()

typedef uint32_t pp_u32;
typedef uint16_t pp_u16;
typedef uint8_t pp_u8;
struct pp_u32x4 {
  pp_u32 x, y, z, w;
};

// Bodies call sqrt unqualified; CUDA and Metal then take the float overload.
using std::sqrt;

namespace pp_emu {

constexpr int kWarp = 32;
constexpr size_t kStack = 256 * 1024;

struct Fiber {
  jmp_buf env;
  std::unique_ptr<char[]> stack;  // uninitialized: only the pages used are touched
  int tid = 0;
  bool done = false;
  const long* gen = nullptr;  // barrier generation this fiber waits to change
  long waited = 0;
  int phase = 0;  // which of the two shuffle buffers the next shuffle uses
};

// The one launch in progress (the driver is single-threaded).
struct Launch {
  std::vector<Fiber> fibers;
  Fiber* current = nullptr;
  jmp_buf scheduler;
  ucontext_t boot;  // where a fiber returns once it is started
  int block_arrived = 0;
  long block_gen = 0;
  std::vector<int> warp_arrived;
  std::vector<long> warp_gen;
  std::vector<float> exchange;  // [warp][phase][lane]
  std::vector<uint32_t> mma_exchange;  // [warp][phase][lane][6]: A's 4 registers, B's 2
  std::function<void(int)> entry;
  std::string error;  // set by a fiber that cannot go on
};
inline Launch* g_launch = nullptr;

inline void yield_to_scheduler() {
  Launch& L = *g_launch;
  if (_setjmp(L.current->env) == 0) _longjmp(L.scheduler, 1);
}

inline void wait_at(int& arrived, long& gen, int n) {
  Fiber& f = *g_launch->current;
  f.gen = &gen;
  f.waited = gen;
  if (++arrived == n) {
    arrived = 0;
    ++gen;
  }
  yield_to_scheduler();
}

inline void block_barrier() {
  Launch& L = *g_launch;
  wait_at(L.block_arrived, L.block_gen, static_cast<int>(L.fibers.size()));
}

// Every lane writes, the warp meets, every lane reads its partner. Two buffers
// alternate, so the next shuffle's writes cannot clobber values still being read.
inline float shfl_xor(float x, int mask) {
  Launch& L = *g_launch;
  Fiber& f = *L.current;
  const int warp = f.tid / kWarp, lane = f.tid % kWarp;
  float* buf = L.exchange.data() + (warp * 2 + f.phase) * kWarp;
  f.phase ^= 1;
  buf[lane] = x;
  wait_at(L.warp_arrived[warp], L.warp_gen[warp], kWarp);
  return buf[(lane ^ mask) % kWarp];
}

// mma.m16n8k16 with float32 accumulation, as one warp-wide step: every lane
// deposits its A and B fragments (the PTX ISA's layout: lane = 4 * group +
// thread-in-group), the warp meets, and every lane sums its four outputs over k in
// order. `load` turns a 16-bit element into float (bf16 or f16). The phase
// alternates with the shuffles', so a buffer is refilled only after a later meeting.
template <class Load>
inline void mma(float* d, const uint32_t* a, uint32_t b0, uint32_t b1, Load load) {
  Launch& L = *g_launch;
  Fiber& f = *L.current;
  const int warp = f.tid / kWarp, lane = f.tid % kWarp;
  uint32_t* buf = L.mma_exchange.data() + (warp * 2 + f.phase) * kWarp * 6;
  f.phase ^= 1;
  uint32_t* mine = buf + lane * 6;
  for (int i = 0; i < 4; ++i) mine[i] = a[i];
  mine[4] = b0;
  mine[5] = b1;
  wait_at(L.warp_arrived[warp], L.warp_gen[warp], kWarp);
  auto half = [&](uint32_t v, int k) { return load(static_cast<uint16_t>(v >> (16 * (k & 1)))); };
  // A[r][k]: lane (r % 8) * 4 + (k % 8) / 2, register 2 * (k >= 8) + (r >= 8).
  auto A = [&](int r, int k) { return half(buf[((r % 8) * 4 + (k % 8) / 2) * 6 + 2 * (k >= 8) + (r >= 8)], k); };
  // B[k][c]: lane c * 4 + (k % 8) / 2, register (k >= 8).
  auto B = [&](int k, int c) { return half(buf[(c * 4 + (k % 8) / 2) * 6 + 4 + (k >= 8)], k); };
  const int g = lane / 4, t = lane % 4;
  for (int e = 0; e < 4; ++e) {
    const int r = g + 8 * (e >= 2), c = 2 * t + (e & 1);
    float s = d[e];
    for (int k = 0; k < 16; ++k) s += A(r, k) * B(k, c);
    d[e] = s;
  }
}

// Exceptions cannot unwind out of a fiber: record the error, end the fiber, and
// let the scheduler throw.
inline void fail(const std::string& what) {
  Launch& L = *g_launch;
  L.error = what;
  L.current->done = true;
  yield_to_scheduler();
}

// A fiber runs the body once per block, then waits for the next block.
inline void fiber_main() {
  {
    Launch& L = *g_launch;
    ucontext_t here;
    if (_setjmp(L.current->env) == 0) swapcontext(&here, &L.boot);
  }
  for (;;) {
    Launch& L = *g_launch;
    L.entry(L.current->tid);
    L.current->done = true;
    yield_to_scheduler();
  }
}

struct Dim3 {
  int x = 1, y = 1, z = 1;
};

// Runs body(bx, by, bz, tid) for every block of the grid and every thread of a
// block. smem (may be empty) is refilled with NaN before each block, then
// poison() runs if given (for workgroup memory that is not float).
template <class Body>
void launch(Dim3 grid, int threads, std::vector<float>& smem, Body body, unsigned seed = 1,
            const std::function<void()>& poison = {}) {
  if (threads % kWarp != 0) throw std::invalid_argument("emulator: threads must be whole warps");
  Launch L;
  g_launch = &L;
  L.fibers.resize(threads);
  L.warp_arrived.assign(threads / kWarp, 0);
  L.warp_gen.assign(threads / kWarp, 0);
  L.exchange.assign(threads / kWarp * 2 * kWarp, 0.f);
  L.mma_exchange.assign(threads / kWarp * 2 * kWarp * 6, 0u);
  for (int t = 0; t < threads; ++t) {
    Fiber& f = L.fibers[t];
    f.tid = t;
    f.stack.reset(new char[kStack]);
    ucontext_t start;
    getcontext(&start);
    start.uc_stack.ss_sp = f.stack.get();
    start.uc_stack.ss_size = kStack;
    start.uc_link = nullptr;
    makecontext(&start, fiber_main, 0);
    L.current = &f;
    swapcontext(&L.boot, &start);
  }
  int bx = 0, by = 0, bz = 0;
  L.entry = [&](int tid) { body(bx, by, bz, tid); };
  std::mt19937 rng(seed);
  std::vector<int> order(threads);
  for (int i = 0; i < threads; ++i) order[i] = i;

  for (bz = 0; bz < grid.z; ++bz) {
    for (by = 0; by < grid.y; ++by) {
      for (bx = 0; bx < grid.x; ++bx) {
        std::fill(smem.begin(), smem.end(), NAN);
        if (poison) poison();
        for (auto& f : L.fibers) {
          f.done = false;
          f.gen = nullptr;
          f.phase = 0;
        }
        int remaining = threads;
        while (remaining > 0) {
          bool progress = false;
          std::shuffle(order.begin(), order.end(), rng);
          for (int t : order) {
            Fiber& f = L.fibers[t];
            if (f.done || (f.gen && *f.gen == f.waited)) continue;
            f.gen = nullptr;
            L.current = &f;
            if (_setjmp(L.scheduler) == 0) _longjmp(f.env, 1);
            progress = true;
            remaining -= f.done;
            if (!L.error.empty()) {
              g_launch = nullptr;
              throw std::runtime_error(L.error);
            }
          }
          if (!progress) {
            g_launch = nullptr;
            throw std::runtime_error("emulator: deadlock in block (" + std::to_string(bx) + ", " +
                                     std::to_string(by) + ", " + std::to_string(bz) +
                                     "): a barrier or shuffle is not reached by every thread");
          }
        }
      }
    }
  }
  g_launch = nullptr;
}

// The launch a kernel's plan (kernels/*.cuh, as the host takes it) describes.
template <class Body>
void launch(const PpLaunch& plan, std::vector<float>& smem, Body body, unsigned seed = 1,
            const std::function<void()>& poison = {}) {
  launch(Dim3{static_cast<int>(plan.grid_x), static_cast<int>(plan.grid_y), static_cast<int>(plan.grid_z)},
         static_cast<int>(plan.threads), smem, body, seed, poison);
}

inline void check_aligned(const void* p, int bytes = 16) {
  if (reinterpret_cast<uintptr_t>(p) % bytes != 0) {
    fail("emulator: " + std::to_string(bytes) + "-byte load or store at a misaligned address");
  }
}

// Runs fn, keeping the message of what it throws for the test to read: the
// drivers' C ABI returns 0, or 1 with the reason in pp_emu::g_error.
inline std::string g_error;
template <class Fn>
int guarded(Fn fn) {
  try {
    fn();
    return 0;
  } catch (const std::exception& e) {
    g_error = e.what();
    return 1;
  }
}

}  // namespace pp_emu

PP_DEVICE float pp_shfl_xor(float x, int mask) { return pp_emu::shfl_xor(x, mask); }
PP_DEVICE float pp_bits_to_float(pp_u32 u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
PP_DEVICE pp_u32 pp_float_to_bits(float f) {
  pp_u32 u;
  std::memcpy(&u, &f, 4);
  return u;
}
PP_DEVICE float pp_half_to_float(pp_u16 h) {
  const pp_u32 sign = pp_u32(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  if (exp == 0x1f) return pp_bits_to_float(sign | 0x7f800000u | (man << 13));  // inf, NaN
  if (exp == 0) {  // zero or subnormal: man * 2^-24, exact in float
    const float v = std::ldexp(static_cast<float>(man), -24);
    return sign ? -v : v;
  }
  return pp_bits_to_float(sign | ((exp + 112) << 23) | (man << 13));
}
// IEEE round to nearest even, subnormals and overflow to infinity included.
PP_DEVICE pp_u16 pp_float_to_half(float f) {
  const pp_u32 u = pp_float_to_bits(f);
  const pp_u16 sign = pp_u16((u >> 16) & 0x8000u);
  const pp_u32 a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return pp_u16(sign | 0x7e00u);
  if (a >= 0x477ff000u) return pp_u16(sign | 0x7c00u);  // rounds to >= 65520: infinity
  if (a < 0x38800000u) {  // below 2^-14: a subnormal half, a multiple of 2^-24
    const float scaled = pp_bits_to_float(a) * 16777216.f;  // exact: a power-of-two scale
    return pp_u16(sign | pp_u16(std::nearbyint(scaled)));   // default mode: ties to even
  }
  const pp_u32 r = a + 0xfffu + ((a >> 13) & 1u);  // round the 13 dropped bits, ties to even
  return pp_u16(sign | ((r - (112u << 23)) >> 13));
}
PP_DEVICE float pp_exp(float x) { return std::exp(x); }
PP_DEVICE float pp_cos(float x) { return std::cos(x); }
PP_DEVICE float pp_log(float x) { return std::log(x); }
PP_DEVICE float pp_erf(float x) { return std::erf(x); }
PP_DEVICE float pp_rint(float x) { return std::nearbyint(x); }  // default mode: ties to even
PP_DEVICE pp_u32 pp_mul_hi(pp_u32 a, pp_u32 b) { return pp_u32((uint64_t(a) * b) >> 32); }
PP_DEVICE float pp_sin(float x) { return std::sin(x); }
PP_DEVICE float pp_max(float a, float b) { return std::fmax(a, b); }
// The driver is compiled with -ffp-contract=off, so nothing is fused anywhere.
PP_DEVICE float pp_mul_rn(float a, float b) { return a * b; }
PP_DEVICE float pp_add_rn(float a, float b) { return a + b; }
PP_DEVICE pp_u32x4 pp_load16(const PP_GLOBAL void* p) {
  pp_emu::check_aligned(p);
  pp_u32x4 v;
  std::memcpy(&v, p, 16);
  return v;
}
PP_DEVICE pp_u32 pp_load4(const PP_GLOBAL void* p) {
  pp_emu::check_aligned(p, 4);
  pp_u32 v;
  std::memcpy(&v, p, 4);
  return v;
}
PP_DEVICE void pp_store16(PP_GLOBAL void* p, pp_u32x4 v) {
  pp_emu::check_aligned(p);
  std::memcpy(p, &v, 16);
}
PP_DEVICE pp_u32x4 pp_zero16() { return pp_u32x4{0u, 0u, 0u, 0u}; }
#define PP_NEG_INF (-INFINITY)
namespace pp_emu {
// d rounded to float toward zero with the last bit set when inexact ("round to odd"):
// rounding that to a format of 16 or fewer significant bits again is the same as
// rounding d to it directly.
inline float round_to_odd(double d) {
  float f = static_cast<float>(d);
  if (static_cast<double>(f) == d) return f;
  if (std::fabs(static_cast<double>(f)) > std::fabs(d)) f = std::nextafter(f, 0.f);
  pp_u32 u;
  std::memcpy(&u, &f, 4);
  u |= 1u;
  std::memcpy(&f, &u, 4);
  return f;
}
// fma.rn on a pair: each half's a * b + c exact in double (products of 16-bit floats
// have at most 22 significant bits), rounded once.
template <class Load, class Store>
inline pp_u32 fma2(pp_u32 a, pp_u32 b, pp_u32 c, Load load, Store store) {
  pp_u32 r = 0;
  for (int h = 0; h < 2; ++h) {
    const int sh = 16 * h;
    const double v = double(load(pp_u16(a >> sh))) * double(load(pp_u16(b >> sh))) + double(load(pp_u16(c >> sh)));
    r |= pp_u32(store(round_to_odd(v))) << sh;
  }
  return r;
}
}  // namespace pp_emu
PP_DEVICE pp_u32 pp_fma2_bf16(pp_u32 a, pp_u32 b, pp_u32 c) {
  return pp_emu::fma2(
      a, b, c, [](pp_u16 h) { return pp_bits_to_float(pp_u32(h) << 16); },
      [](float f) {
        const pp_u32 u = pp_float_to_bits(f);
        return pp_u16((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
      });
}
PP_DEVICE pp_u32 pp_fma2_f16(pp_u32 a, pp_u32 b, pp_u32 c) {
  return pp_emu::fma2(a, b, c, pp_half_to_float, pp_float_to_half);
}
PP_DEVICE void pp_mma_bf16(float* d, const pp_u32* a, pp_u32 b0, pp_u32 b1) {
  pp_emu::mma(d, a, b0, b1, [](uint16_t h) { return pp_bits_to_float(pp_u32(h) << 16); });
}
PP_DEVICE void pp_mma_f16(float* d, const pp_u32* a, pp_u32 b0, pp_u32 b1) {
  pp_emu::mma(d, a, b0, b1, [](uint16_t h) { return pp_half_to_float(h); });
}
