// The nanobind module personaplex_fast._ext: one function per primitive.
// Built with NB_DOMAIN mlx so mx.array arguments are accepted (see CMakeLists.txt).

#include <nanobind/nanobind.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include "ring_attention.h"

namespace nb = nanobind;
using namespace nb::literals;

NB_MODULE(_ext, m) {
  m.doc() = "personaplex_fast fused primitives (MLX custom primitives)";

  m.def("ring_attention", &personaplex::ring_attention, "q"_a, "k"_a, "v"_a, "k_cache"_a,
        "v_cache"_a, "pos"_a, "scale"_a, "rope_max_period"_a, nb::kw_only(),
        "stream"_a = nb::none(),
        "One streaming attention step over a ring KV cache: returns [out, k_cache, v_cache].\n"
        "rope_max_period <= 0 disables RoPE. See csrc/ring_attention.h.");
  m.def("ring_cache_copies", &personaplex::ring_cache_copies,
        "Number of whole-cache copies ring_attention made because it could not reuse the input buffer.");
}
