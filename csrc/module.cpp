// The nanobind module personaplex_fast._ext: one function per primitive.
// Built with NB_DOMAIN mlx so mx.array arguments are accepted (see CMakeLists.txt).

#include <dlfcn.h>
#include <execinfo.h>
#include <nanobind/nanobind.h>

#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include "conv1d_stream.h"
#ifdef PERSONAPLEX_CUDA_BUILD
#include "cuda_common.h"
#endif
#include "conv_transpose1d_stream.h"
#include "decoder_layers.h"
#include "depformer_frame.h"
#include "matvec.h"
#include "ring_attention.h"
#include "rvq.h"
#include "sample_topk.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace personaplex {
void bind_tick(nb::module_& m);  // tick_bindings.cpp
}

namespace {

// Debug aid (PERSONAPLEX_SEGV_BACKTRACE=1): on a crash, print each native frame as
// library + offset (for addr2line) before dying as usual.
void print_backtrace(int sig) {
  void* frames[64];
  const int n = backtrace(frames, 64);
  for (int i = 0; i < n; ++i) {
    Dl_info info;
    if (dladdr(frames[i], &info) && info.dli_fname) {
      fprintf(stderr, "#%d %s +0x%lx %s\n", i, info.dli_fname,
              static_cast<unsigned long>(static_cast<char*>(frames[i]) - static_cast<char*>(info.dli_fbase)),
              info.dli_sname ? info.dli_sname : "?");
    }
  }
  signal(sig, SIG_DFL);
  raise(sig);
}

}  // namespace

NB_MODULE(_ext, m) {
  m.doc() = "personaplex_fast fused primitives (MLX custom primitives)";
  if (const char* e = std::getenv("PERSONAPLEX_SEGV_BACKTRACE"); e && e[0] == '1') {
    signal(SIGSEGV, print_backtrace);
  }

  m.def("ring_attention", &personaplex::ring_attention, "q"_a, "k"_a, "v"_a, "k_cache"_a,
        "v_cache"_a, "pos"_a, "scale"_a, "rope_max_period"_a, nb::kw_only(),
        "stream"_a = nb::none(),
        "One streaming attention step over a ring KV cache: returns [out, k_cache, v_cache].\n"
        "rope_max_period <= 0 disables RoPE. See csrc/ring_attention.h.");
  m.def("ring_cache_copies", &personaplex::ring_cache_copies,
        "Number of whole-cache copies ring_attention made because it could not reuse the input buffer.");
  m.def("ring_cache_waits", &personaplex::ring_cache_waits,
        "Number of times the CUDA ring_attention waited for in-flight work before reusing a cache.");

  m.def("cuda_build", []() {
#ifdef PERSONAPLEX_CUDA_BUILD
    return true;
#else
    return false;
#endif
  }, "Whether this build has the CUDA kernels.");
  m.def("metal_build", []() {
#ifdef PERSONAPLEX_METAL_BUILD
    return true;
#else
    return false;
#endif
  }, "Whether this build has the Metal kernels (macOS; compiled at first use).");
  m.def("set_gpu_poison", [](bool on) {
#ifdef PERSONAPLEX_CUDA_BUILD
    personaplex::cuda::set_poison(on);
#else
    (void)on;
#endif
  }, "on"_a, "GPU tests: fill every output the CUDA kernels allocate with 0xFF bytes first (no-op without CUDA).");

  m.def("conv1d_stream", &personaplex::conv1d_stream, "x"_a, "previous"_a, "weight"_a,
        "bias"_a.none(), "first"_a.none(), "stride"_a, "dilation"_a, "groups"_a, "elu_input"_a,
        nb::kw_only(), "stream"_a = nb::none(),
        "One streaming causal conv1d step: returns [y, previous']. See csrc/conv1d_stream.h.");
  m.def("conv_transpose1d_stream", &personaplex::conv_transpose1d_stream, "x"_a, "partial"_a,
        "weight"_a, "bias"_a.none(), "stride"_a, "groups"_a, "elu_input"_a, nb::kw_only(),
        "stream"_a = nb::none(),
        "One streaming transposed conv1d step: returns [y, partial']. See "
        "csrc/conv_transpose1d_stream.h.");
  m.def("matvec", &personaplex::matvec, "x"_a, "w"_a, "scales"_a.none(), "biases"_a.none(),
        "alpha"_a.none(), "residual"_a.none(), "bits"_a, "gate"_a, "eps"_a, nb::kw_only(),
        "stream"_a = nb::none(),
        "x [M, K] times W^T, W dense [N, K] (bits 0) or MLX affine q4/q8 (group 64), with an\n"
        "RMSNorm of x in front (alpha), a SiLU gate (gate) and a residual add. See csrc/matvec.h.");
  m.def("decoder_layers", &personaplex::decoder_layers, "x"_a, "pos"_a, "weights"_a, "k_caches"_a,
        "v_caches"_a, "heads"_a, "bits"_a, "eps"_a, "rope_max_period"_a, nb::kw_only(),
        "stream"_a = nb::none(),
        "One decode step (T = 1) through a stack of transformer layers: returns\n"
        "[y, k_caches'..., v_caches'...]. See csrc/decoder_layers.h.");
  m.def("sample_topk", &personaplex::sample_topk, "logits"_a, "noise"_a.none(), "forced"_a.none(),
        "temp"_a, "top_k"_a, "greedy"_a, nb::kw_only(), "stream"_a = nb::none(),
        "Tokens [R] int32 from logits [R, V]: temperature, top-k and Gumbel-max with the given\n"
        "noise, or greedy; forced >= 0 replaces the token. See csrc/sample_topk.h.");
  m.def("depformer_frame", &personaplex::depformer_frame, "h"_a, "text"_a, "forced"_a, "noise"_a.none(),
        "in_projs"_a, "tables"_a, "stacks"_a, "heads_w"_a, "heads"_a, "bits"_a, "eps"_a,
        "rope_max_period"_a, "temp"_a, "top_k"_a, "greedy"_a, nb::kw_only(), "stream"_a = nb::none(),
        "All codebook steps of one depformer frame, sampling included: returns [codes [Q, B],\n"
        "logits [Q, B, V]]. See csrc/depformer_frame.h.");
  m.def("rvq_encode", &personaplex::rvq_encode, "x"_a, "codebooks"_a, nb::kw_only(),
        "stream"_a = nb::none(),
        "Residual VQ codes [..., n_q] int32 of x [..., D] over codebooks [n_q, bins, D].");
  personaplex::bind_tick(m);
  m.def("rvq_decode", &personaplex::rvq_decode, "codes"_a, "codebooks"_a, nb::kw_only(),
        "stream"_a = nb::none(), "Sum of the codebook entries named by codes [..., n_q]: [..., D] float32.");
}
