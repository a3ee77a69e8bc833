// The launches of kernels/cuda/matvec.cu run through the CPU emulator
// (portable_cpu.h), as csrc/matvec_cuda.cpp makes them: the launch plan of
// kernels/matvec.cuh (grid, block, rows of x per block, workgroup memory). A C
// ABI for tests/test_kernel_emulator.py (ctypes): each entry returns 0, or 1 with
// the reason in emu_error().
//
// Built by the test: g++ -std=c++20 -O1 -ffp-contract=off -U_FORTIFY_SOURCE -DPP_EMULATE
// -shared -fPIC, with kernels/*.cuh and portable_cpu.h (as portable.h) in one
// include directory.

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include "matvec.cuh"
#include "matvec_tc.cuh"

namespace {

struct MatvecPtrs {
  const void *x, *w, *scales, *biases, *alpha, *residual;
  void* out;
};

// x is NaN in each block until its first thread waits for the kernels before (which
// write it): what is read before the wait is NaN.
template <class F, class W, int MT>
void matvec_run(const MatvecPtrs& p, MatvecArgs a, unsigned seed) {
  using E = typename F::Elem;
  std::vector<float> smem(matvec_smem_floats(MT));
  const E* x = static_cast<const E*>(p.x);
  std::vector<E> xb(size_t(a.M) * a.K);
  auto wait = [&] { std::copy(x, x + xb.size(), xb.begin()); };
  pp_emu::launch(
      matvec_launch(a), smem,
      [&](int bx, int by, int, int tid) {
        matvec::matvec<F, W, MT>(xb.data(), static_cast<const pp_u32*>(p.w),
                                 static_cast<const E*>(p.scales), static_cast<const E*>(p.biases),
                                 static_cast<const E*>(p.alpha), static_cast<const E*>(p.residual),
                                 static_cast<E*>(p.out), a, smem.data(), bx, by, tid, wait);
      },
      seed, [&] { std::fill(xb.begin(), xb.end(), F::store(NAN)); });
}

template <class F, class W>
void matvec_rows(const MatvecPtrs& p, MatvecArgs a, unsigned seed) {
  switch (matvec_x_rows(a.M)) {
    case 1: return matvec_run<F, W, 1>(p, a, seed);
    case 2: return matvec_run<F, W, 2>(p, a, seed);
    case 4: return matvec_run<F, W, 4>(p, a, seed);
    default: return matvec_run<F, W, 8>(p, a, seed);
  }
}

template <class F>
void matvec_format(int bits, const MatvecPtrs& p, MatvecArgs a, unsigned seed) {
  const int elem = static_cast<int>(sizeof(typename F::Elem));
  if (!matvec_k_supported(a.K, elem, bits)) {
    throw std::invalid_argument("matvec: K must be a multiple of " + std::to_string(16 / elem) +
                                " (of 32 for 4-bit weights)");
  }
  if (bits == 0) matvec_rows<F, matvec::Dense<F>>(p, a, seed);
  else if (bits == 4) matvec_rows<F, matvec::Affine<4>>(p, a, seed);
  else if (bits == 8) matvec_rows<F, matvec::Affine<8>>(p, a, seed);
  else throw std::invalid_argument("matvec: bits must be 0, 4 or 8");
}

// The tensor-core path's three launches, as csrc/matvec_cuda.cpp makes them, with
// `sms` multiprocessors deciding the K splits. The workspace starts as NaN.
template <class F, class W, int NT, bool Ahead = false>
void matvec_tc_run(const MatvecPtrs& p, const MatvecTcArgs& a, unsigned seed) {
  using E = typename F::Elem;
  std::vector<float> ws(matvec_tc_workspace_floats(a), NAN);
  float* inv_rms = ws.data();
  float* part = ws.data() + (a.M + 3) / 4 * 4;
  std::vector<float> smem(kMatvecTcThreads / 32);
  if (a.norm) {
    pp_emu::launch(matvec_tc_rms_launch(a), smem, [&](int bx, int, int, int tid) {
      matvec_tc::rms<F>(static_cast<const E*>(p.x), inv_rms, a, smem.data(), bx, tid);
    }, seed);
  }
  // The x tile as 16-bit elements, poisoned with NaN of T before every block. So are x
  // and inv_rms (the kernels before this one write them) until the block's first thread
  // waits for those kernels: what is read before the wait is NaN.
  std::vector<float> tile((matvec_tc_smem_elems(NT) + 1) / 2);
  E* xs = reinterpret_cast<E*>(tile.data());
  const E nan = F::store(NAN);
  const E* x = static_cast<const E*>(p.x);
  std::vector<E> xb(size_t(a.M) * a.K);
  std::vector<float> rms_b(inv_rms, inv_rms + a.M);
  auto wait = [&] {
    std::copy(x, x + xb.size(), xb.begin());
    std::copy(rms_b.begin(), rms_b.end(), inv_rms);
  };
  pp_emu::launch(
      matvec_tc_launch(a), tile,
      [&](int bx, int by, int, int tid) {
        matvec_tc::project<F, W, NT, Ahead>(xb.data(), static_cast<const pp_u32*>(p.w),
                                     static_cast<const E*>(p.scales), static_cast<const E*>(p.biases),
                                     static_cast<const E*>(p.alpha), inv_rms, part, a, xs, bx, by, tid, wait);
      },
      seed, [&] {
        std::fill(xs, xs + matvec_tc_smem_elems(NT), nan);
        std::fill(xb.begin(), xb.end(), nan);
        std::fill(inv_rms, inv_rms + a.M, NAN);
      });
  std::vector<float> none;
  const PpLaunch fin = matvec_tc_finish_launch(a);
  pp_emu::launch(fin, none, [&](int bx, int, int, int tid) {
    matvec_tc::finish<F>(part, static_cast<const E*>(p.residual), static_cast<E*>(p.out), a,
                         long(bx) * fin.threads + tid);
  }, seed);
}

template <class F, class W>
void matvec_tc_tiles_run(const MatvecPtrs& p, const MatvecTcArgs& a, unsigned seed) {
  switch (matvec_tc_tiles(a.M)) {
    case 1:  // the ..._ahead kernel where csrc/cuda_nodes.h picks it
      if (W::kChunk == 32 && matvec_tc_ahead(4, a.M)) return matvec_tc_run<F, W, 1, true>(p, a, seed);
      return matvec_tc_run<F, W, 1>(p, a, seed);
    case 2: return matvec_tc_run<F, W, 2>(p, a, seed);
    case 4: return matvec_tc_run<F, W, 4>(p, a, seed);
    default: return matvec_tc_run<F, W, 8>(p, a, seed);
  }
}

template <class F>
void matvec_tc_format(int bits, const MatvecPtrs& p, const MatvecArgs& m, int sms, unsigned seed) {
  if (!matvec_tc_supported(m.M, m.K, static_cast<int>(sizeof(typename F::Elem)))) {
    throw std::invalid_argument("matvec_tc: 16-bit x and K a multiple of 256 only");
  }
  using E = typename F::Elem;
  matvec_tc_chunks(m.M, [&](int m0, int rows) {  // as the hosts split more than 64 rows
    const MatvecTcArgs a = matvec_tc_args(rows, m.K, m.n_out, m.norm, m.gate, m.residual, m.eps, 2 * sms);
    MatvecPtrs c = p;
    c.x = static_cast<const E*>(p.x) + long(m0) * m.K;
    if (p.residual) c.residual = static_cast<const E*>(p.residual) + long(m0) * m.n_out;
    c.out = static_cast<E*>(p.out) + long(m0) * m.n_out;
    if (bits == 0) matvec_tc_tiles_run<F, matvec::Dense<F>>(c, a, seed);
    else if (bits == 4) matvec_tc_tiles_run<F, matvec::Affine<4>>(c, a, seed);
    else if (bits == 8) matvec_tc_tiles_run<F, matvec::Affine<8>>(c, a, seed);
    else throw std::invalid_argument("matvec_tc: bits must be 0, 4 or 8");
  });
}

}  // namespace

extern "C" {

// The tensor-core path (kernels/matvec_tc.cuh): dtype 1 bfloat16, 2 float16; `sms`
// multiprocessors of two blocks each for the split along K. Returns the splits used in *splits.
int emu_matvec_tc(int dtype, int bits, const void* x, const void* w, const void* scales, const void* biases,
                  const void* alpha, const void* residual, void* out, const MatvecArgs* a, int sms,
                  unsigned seed, int* splits) {
  const MatvecPtrs p{.x = x, .w = w, .scales = scales, .biases = biases, .alpha = alpha,
                     .residual = residual, .out = out};
  return pp_emu::guarded([&] {
    *splits = matvec_tc_args(a->M < kMatvecTcMaxRows ? a->M : kMatvecTcMaxRows, a->K, a->n_out, a->norm, a->gate,
                             a->residual, a->eps, 2 * sms).splits;
    if (dtype == 1) matvec_tc_format<pp::BF16>(bits, p, *a, sms, seed);
    else if (dtype == 2) matvec_tc_format<pp::F16>(bits, p, *a, sms, seed);
    else throw std::invalid_argument("matvec_tc: x must be bfloat16 or float16");
  });
}

// matvec_tc_splits (kernels/matvec_tc.cuh): the split count along K for `blocks` blocks of
// `steps` steps, `slots` blocks at once (PERSONAPLEX_MATVEC_TC_SPLITS as the hosts read it).
int emu_matvec_tc_splits(int blocks, int steps, int slots) { return matvec_tc_splits(blocks, steps, slots); }

// Workgroup-memory wavefronts of the x tile's 16-byte accesses, by the kernel's own
// offsets (matvec_tc::tile_offset, fragment_offset): a quarter of a warp (8 lanes) is
// served in as many wavefronts as the most lanes that hit one of the 8 16-byte bank
// groups at different addresses. Writes the most over every fragment load to
// *load_max and over every tile store to *store_max (1: conflict-free).
int emu_matvec_tc_wavefronts(int bits, int* load_max, int* store_max) {
  return pp_emu::guarded([&] {
    auto run = [&](auto w) {
      using W = decltype(w);
      auto worst = [](const int* offs) {  // 8 lanes' element offsets (16-bit elements)
        int most = 1;
        for (int a = 0; a < 8; ++a) {
          int same = 0;
          for (int b = 0; b < 8; ++b) {
            const bool group = (offs[a] * 2 / 16) % 8 == (offs[b] * 2 / 16) % 8;
            if (group && offs[a] != offs[b]) ++same;
          }
          most = std::max(most, same + 1);
        }
        return most;
      };
      constexpr int VL = PP_MATVEC_TC_STEP / W::kChunk / 4, OCT = W::kChunk / 8;
      *load_max = *store_max = 0;
      for (int i = 0; i < VL; ++i) {
        for (int o = 0; o < OCT; ++o) {
          for (int q = 0; q < 4; ++q) {
            int offs[8];
            for (int l = 0; l < 8; ++l) {
              const int lane = q * 8 + l;
              offs[l] = matvec_tc::fragment_offset<W>(lane >> 2, lane & 3, i, o);
            }
            *load_max = std::max(*load_max, worst(offs));
          }
        }
      }
      for (int e0 = 0; e0 < 8 * 8 * 32; e0 += 8) {  // every quarter of the 64-row tile's stores
        int offs[8];
        for (int l = 0; l < 8; ++l) offs[l] = matvec_tc::tile_offset<W>((e0 + l) >> 5, (e0 + l) & 31);
        *store_max = std::max(*store_max, worst(offs));
      }
    };
    if (bits == 0) run(matvec::Dense<pp::BF16>{});
    else if (bits == 4) run(matvec::Affine<4>{});
    else if (bits == 8) run(matvec::Affine<8>{});
    else throw std::invalid_argument("matvec_tc: bits must be 0, 4 or 8");
  });
}

const char* emu_error() { return pp_emu::g_error.c_str(); }

// dtype: 0 float32, 1 bfloat16, 2 float16. Null pointers for absent operands.
int emu_matvec(int dtype, int bits, const void* x, const void* w, const void* scales,
               const void* biases, const void* alpha, const void* residual, void* out,
               const MatvecArgs* a, unsigned seed) {
  const MatvecPtrs p{.x = x, .w = w, .scales = scales, .biases = biases, .alpha = alpha,
                     .residual = residual, .out = out};
  return pp_emu::guarded([&] {
    if (dtype == 0) matvec_format<pp::F32>(bits, p, *a, seed);
    else if (dtype == 1) matvec_format<pp::BF16>(bits, p, *a, seed);
    else matvec_format<pp::F16>(bits, p, *a, seed);
  });
}

}  // extern "C"
