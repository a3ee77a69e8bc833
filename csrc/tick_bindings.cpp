// Python bindings of the tick program (see tick.h): personaplex_fast._ext.TickProgram,
// whose methods add one op each, with named arguments, and _ext.tick. Every
// op checks that its operands' regions hold what it will read or write, so a
// mistake in the builder (python/personaplex_fast/tick/) is a ValueError
// here, not a write past a region.

#include <nanobind/nanobind.h>
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/vector.h>

#include <cmath>
#include <string>

#include "common.h"
#include "ring_attention.h"  // rope_step
#include "tick.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace personaplex {

namespace {

using P = TickProgram;

// Region h holds at least `bytes` (-1: none needed, any handle incl. -1).
void need(const P& p, int h, long bytes, const char* op, const char* what) {
  if (bytes <= 0 && h < 0) return;
  check(h >= 0, op, std::string(what) + " is required");
  const auto& m = p.mem(h);
  check(m.bytes < 0 || m.bytes >= bytes, op,
        std::string(what) + " holds " + std::to_string(m.bytes) + " bytes, needs " + std::to_string(bytes));
}

long es(const P& p, int h) { return static_cast<long>(mx::size_of(p.mem(h).dtype)); }

void same_dtype(const P& p, const char* op, std::initializer_list<int> hs) {
  int first = -1;
  for (int h : hs) {
    if (h < 0) continue;
    if (first < 0) first = h;
    check(p.mem(h).dtype == p.mem(first).dtype, op, "operands must share one dtype");
  }
}

}  // namespace

void bind_tick(nb::module_& m) {
  nb::class_<P>(m, "TickProgram",
                "One frame of every session as a fixed list of kernels over memory the program owns\n"
                "(see csrc/tick.h); built by personaplex_fast.tick.")
      .def(nb::new_([](bool gpu, int device) { return std::make_shared<P>(gpu, device); }), "gpu"_a,
           "device"_a = 0)
      .def("buffer", &P::buffer, "bytes"_a, "dtype"_a, "A zeroed arena region; returns its handle.")
      .def("init", &P::init, "h"_a, "data"_a, "Initial bytes of region h (an evaluated array of its size).")
      .def("weight", &P::weight, "array"_a, "Holds an evaluated, row-contiguous array; returns its handle.")
      .def("view", &P::view, "h"_a, "offset"_a, "dtype"_a, "Handle h plus a byte offset, as dtype.")
      .def("reset_region", &P::reset_region, "h"_a, "row_bytes"_a, "mask"_a, "pattern"_a = 0u,
           "control_col"_a = -1)
      .def("update_region", &P::update_region, "h"_a, "count"_a, "mode"_a, "value"_a)
      .def("set_io", &P::set_io, "pcm_in"_a, "control"_a, "pcm_out"_a, "tokens"_a, "B"_a, "F"_a, "C"_a, "G"_a)
      .def("write", &P::write, "h"_a, "offset"_a, "src"_a)
      .def("read", &P::read, "h"_a, "offset"_a, "bytes"_a)
      .def("run_ops", &P::run_ops, "The ops once on a CPU program's arena (tests of single ops).")
      .def_prop_ro("arena_bytes", &P::arena_bytes)
      .def_prop_ro("ops", &P::ops)
      .def_prop_ro("gpu", &P::gpu)
      .def(
          "matvec",
          [](P& p, int x, int w, int out, int M, int K, int n_out, int scales, int biases, int alpha,
             int residual, int bits, bool gate, float eps) {
            const char* op = "tick matvec";
            check(bits == 0 || bits == 4 || bits == 8, op, "bits must be 0, 4 or 8");
            check(K % (bits == 4 ? 32 : 8) == 0 && M > 0 && n_out > 0, op, "K must be a multiple of 8 (32 at 4 bits)");
            const long e = es(p, x), rows = gate ? 2L * n_out : n_out;
            need(p, x, M * static_cast<long>(K) * e, op, "x");
            need(p, w, bits ? rows * K * bits / 8 : rows * K * e, op, "w");
            need(p, scales, bits ? rows * (K / 64) * e : 0, op, "scales");
            need(p, biases, bits ? rows * (K / 64) * e : 0, op, "biases");
            need(p, alpha, alpha >= 0 ? K * e : 0, op, "alpha");
            need(p, residual, residual >= 0 ? M * static_cast<long>(n_out) * e : 0, op, "residual");
            need(p, out, M * static_cast<long>(n_out) * e, op, "out");
            same_dtype(p, op, {x, alpha, residual, out, bits ? scales : -1});
            p.add(prog::Matvec{.x = x, .w = w, .scales = scales, .biases = biases, .alpha = alpha, .residual = residual,
                               .out = out, .bits = bits, .args =
                               MatvecArgs{.M = M, .K = K, .n_out = n_out, .norm = alpha >= 0, .gate = gate,
                                          .residual = residual >= 0, .eps = eps}});
          },
          "x"_a, "w"_a, "out"_a, "M"_a, "K"_a, "n_out"_a, "scales"_a = -1, "biases"_a = -1, "alpha"_a = -1,
          "residual"_a = -1, "bits"_a = 0, "gate"_a = false, "eps"_a = 1e-8f)
      .def(
          "attention",
          [](P& p, int q, int k, int v, int kc, int vc, int pos, int out, int B, int H, int T, int D, int W,
             std::vector<long> new_strides, std::vector<long> out_strides, float rope_max_period, bool chunk_window,
             int k_scales, int v_scales) {
            const char* op = "tick attention";
            check(new_strides.size() == 3 && (out_strides.empty() || out_strides.size() == 3), op,
                  "strides are (session, head, position)");
            check(!p.gpu() || D == 16 || D == 32 || D == 64 || D == 128, op,
                  "head dim must be 16, 32, 64 or 128 on the GPU");
            const long e = es(p, q);
            auto span = [&](const std::vector<long>& s) {
              return ((B - 1) * s[0] + (H - 1) * s[1] + (T - 1) * s[2] + D) * e;
            };
            for (int h : {q, k, v}) need(p, h, span(new_strides), op, "q, k, v");
            // An 8-bit ring: int8 codes and float32 scales per row (see RingArgs' kernels).
            const bool int8 = k_scales >= 0 || v_scales >= 0;
            const long rows = static_cast<long>(B) * H * W;
            need(p, kc, rows * D * (int8 ? 1 : e), op, "k_cache");
            need(p, vc, rows * D * (int8 ? 1 : e), op, "v_cache");
            if (int8) {
              need(p, k_scales, 4 * rows, op, "k_scales");
              need(p, v_scales, 4 * rows, op, "v_scales");
              for (int h : {kc, vc}) check(p.mem(h).dtype == mx::int8, op, "an 8-bit ring's caches hold int8 codes");
              for (int h : {k_scales, v_scales}) check(p.mem(h).dtype == mx::float32, op, "scales are float32");
              check(!p.gpu() || D <= 128, op, "an 8-bit ring takes head dims up to 128");
            }
            need(p, pos, 4L * B, op, "pos");
            need(p, out, out_strides.empty() ? static_cast<long>(B) * H * T * D * e : span(out_strides), op, "out");
            same_dtype(p, op, {q, k, v, int8 ? -1 : kc, int8 ? -1 : vc, out});
            RingArgs a{.B = B, .H = H, .T = T, .D = D, .W = W, .S = 0, .copy_k = 0, .copy_v = 0,
                       .rope = rope_max_period > 0.f, .rope_step = rope_step(rope_max_period, D),
                       .scale = 1.f / std::sqrt(static_cast<float>(D)), .new_b = new_strides[0],
                       .new_h = new_strides[1], .new_t = new_strides[2], .chunk_window = chunk_window};
            if (!out_strides.empty()) {
              a.out_b = out_strides[0], a.out_h = out_strides[1], a.out_t = out_strides[2];
            }
            p.add(prog::Attention{.q = q, .k = k, .v = v, .kc = kc, .vc = vc, .pos = pos, .out = out,
                                  .ks = int8 ? k_scales : -1, .vs = int8 ? v_scales : -1,
                                  .rope_max_period = rope_max_period, .args = a});
          },
          "q"_a, "k"_a, "v"_a, "k_cache"_a, "v_cache"_a, "pos"_a, "out"_a, "B"_a, "H"_a, "T"_a, "D"_a, "W"_a,
          "new_strides"_a, "out_strides"_a = std::vector<long>{}, "rope_max_period"_a = 0.f,
          "chunk_window"_a = false, "k_scales"_a = -1, "v_scales"_a = -1,
          "k_scales, v_scales: an 8-bit ring (int8 codes in k_cache, v_cache, a float32 scale per row [B, H, W]).")
      .def(
          "conv1d",
          [](P& p, int x, int state, int w, int y, int B, int T, int C_in, int C_out, int K, int stride,
             int dilation, int groups, bool elu, int bias, int first, bool gemm) {
            const char* op = "tick conv1d";
            const int context = (K - 1) * dilation + 1 - stride;
            check(context >= 0 && T % stride == 0 && C_in % groups == 0 && C_out % groups == 0, op,
                  "inconsistent conv shape");
            const long e = es(p, x);
            need(p, x, static_cast<long>(B) * T * C_in * e, op, "x");
            need(p, state, static_cast<long>(B) * context * C_in * e, op, "state");
            need(p, w, static_cast<long>(C_out) * K * (C_in / groups) * e, op, "w");
            need(p, bias, bias >= 0 ? C_out * e : 0, op, "bias");
            need(p, first, first >= 0 ? B : 0, op, "first");
            need(p, y, static_cast<long>(B) * (T / stride) * C_out * e, op, "y");
            same_dtype(p, op, {x, state, w, bias, y});
            int buf = -1, next = -1;
            if (context > 0 || elu) buf = p.buffer(static_cast<long>(B) * (context + T) * C_in * e, p.mem(x).dtype);
            if (context > 0) next = p.buffer(static_cast<long>(B) * context * C_in * e, p.mem(x).dtype);
            check(!gemm || groups == 1, op, "the GEMM form takes one group");
            // K = 1 at stride 1 reads its rows as they are; other shapes gather windows.
            const int cols = gemm && !(K == 1 && stride == 1)
                                 ? p.buffer(static_cast<long>(B) * (T / stride) * K * C_in * e, p.mem(x).dtype)
                                 : -1;
            Conv1dArgs conv{.B = B, .T = T, .C_in = C_in, .C_out = C_out, .K = K, .context = context,
                            .stride = stride, .dilation = dilation, .groups = groups, .lanes = 0,
                            .has_bias = bias >= 0};
            conv.lanes = conv1d_lanes(conv);
            p.add(prog::Conv1d{.x = x, .state = state, .first = first, .w = w, .bias = bias, .y = y, .buf = buf,
                               .next = next, .gemm = gemm, .cols = cols,
                               .gather = GatherArgs{.B = B, .T = T, .C = C_in, .context = context, .elu = elu,
                                                    .has_first = first >= 0},
                               .conv = conv});
          },
          "x"_a, "state"_a, "w"_a, "y"_a, "B"_a, "T"_a, "C_in"_a, "C_out"_a, "K"_a, "stride"_a = 1,
          "dilation"_a = 1, "groups"_a = 1, "elu"_a = false, "bias"_a = -1, "first"_a = -1, "gemm"_a = false,
          "gemm: on CUDA as im2col + a cuBLAS GEMM (one group); the CPU path is the same either way.")
      .def(
          "conv_transpose1d",
          [](P& p, int x, int partial, int w, int y, int B, int T, int C_in, int C_out, int K, int stride,
             int groups, bool elu, int bias, int w_t) {
            const char* op = "tick conv_transpose1d";
            check(K >= stride && C_in % groups == 0 && C_out % groups == 0, op, "inconsistent conv shape");
            const long e = es(p, x), overlap = K - stride;
            need(p, x, static_cast<long>(B) * T * C_in * e, op, "x");
            need(p, partial, B * overlap * C_out * e, op, "partial");
            need(p, w, static_cast<long>(C_out) * K * (C_in / groups) * e, op, "w");
            need(p, bias, bias >= 0 ? C_out * e : 0, op, "bias");
            need(p, y, static_cast<long>(B) * T * stride * C_out * e, op, "y");
            same_dtype(p, op, {x, partial, w, bias, y});
            const int xe = elu ? p.buffer(static_cast<long>(B) * T * C_in * e, p.mem(x).dtype) : -1;
            const int next = p.buffer(std::max(B * overlap * C_out * e, 1L), p.mem(x).dtype);
            int z = -1;
            if (w_t >= 0) {
              check(groups == 1, op, "the GEMM form takes one group");
              need(p, w_t, static_cast<long>(K) * C_out * C_in * e, op, "w_t");
              same_dtype(p, op, {x, w_t});
              z = p.buffer(static_cast<long>(B) * T * K * C_out * e, p.mem(x).dtype);
            }
            ConvTrArgs conv{.B = B, .T = T, .C_in = C_in, .C_out = C_out, .K = K, .stride = stride,
                            .groups = groups, .lanes = 0, .has_bias = bias >= 0};
            conv.lanes = convtr_lanes(conv);
            p.add(prog::ConvTranspose1d{.x = x, .partial = partial, .w = w, .bias = bias, .y = y, .xe = xe, .next = next,
                                        .w_t = w_t, .z = z, .elu = elu, .conv = conv});
          },
          "x"_a, "partial"_a, "w"_a, "y"_a, "B"_a, "T"_a, "C_in"_a, "C_out"_a, "K"_a, "stride"_a, "groups"_a = 1,
          "elu"_a = false, "bias"_a = -1, "w_t"_a = -1,
          "w_t: the weights as [K, C_out, C_in]: on CUDA as a cuBLAS GEMM over the taps + an overlap-add.")
      .def(
          "rvq_encode",
          [](P& p, int x, int books, int codes, int n, int n_q, int bins, int D) {
            const char* op = "tick rvq_encode";
            check(p.mem(x).dtype == mx::float32 && p.mem(books).dtype == mx::float32, op, "float32 only");
            need(p, x, 4L * n * D, op, "x");
            need(p, books, 4L * n_q * bins * D, op, "books");
            need(p, codes, 4L * n * n_q, op, "codes");
            p.add(prog::RvqEncode{.x = x, .books = books, .codes = codes, .part = -1,
                                  .args = RvqArgs{.n = n, .n_q = n_q, .bins = bins, .D = D}});
          },
          "x"_a, "books"_a, "codes"_a, "n"_a, "n_q"_a, "bins"_a, "D"_a)
      .def(
          "rvq_decode",
          [](P& p, int codes, int books, int out, int n, int n_q, int bins, int D) {
            const char* op = "tick rvq_decode";
            check(p.mem(out).dtype == mx::float32 && p.mem(books).dtype == mx::float32, op, "float32 only");
            need(p, codes, 4L * n * n_q, op, "codes");
            need(p, books, 4L * n_q * bins * D, op, "books");
            need(p, out, 4L * n * D, op, "out");
            p.add(prog::RvqDecode{.codes = codes, .books = books, .out = out,
                                  .args = RvqArgs{.n = n, .n_q = n_q, .bins = bins, .D = D}});
          },
          "codes"_a, "books"_a, "out"_a, "n"_a, "n_q"_a, "bins"_a, "D"_a)
      .def(
          "gumbel",
          [](P& p, int seeds, int offsets, int out, int B, int V, int streams, int stream0) {
            const char* op = "tick gumbel";
            need(p, seeds, 4L * B, op, "seeds");
            need(p, offsets, 4L * B, op, "offsets");
            need(p, out, 4L * streams * B * V, op, "out");
            p.add(prog::Gumbel{.seeds = seeds, .offsets = offsets, .out = out, .args =
                               GumbelArgs{.B = B, .V = V, .streams = streams, .stream0 = stream0}});
          },
          "seeds"_a, "offsets"_a, "out"_a, "B"_a, "V"_a, "streams"_a, "stream0"_a)
      .def(
          "sample",
          [](P& p, int logits, int out, int rows, int V, float temp, int top_k, bool greedy, int noise,
             int forced) {
            const char* op = "tick sample";
            greedy = greedy || !(temp > 0.f);
            need(p, logits, static_cast<long>(rows) * V * es(p, logits), op, "logits");
            need(p, noise, greedy || noise < 0 ? 0 : 4L * rows * V, op, "noise");
            need(p, forced, forced >= 0 ? 4L * rows : 0, op, "forced");
            need(p, out, 4L * rows, op, "out");
            const bool use_noise = !greedy && noise >= 0;
            p.add(prog::Sample{.logits = logits, .noise = use_noise ? noise : -1, .forced = forced, .out = out, .rows = rows,
                               .args =
                               SampleArgs{.V = V, .temp = greedy ? 0.f : temp, .top_k = greedy ? 0 : top_k,
                                          .greedy = greedy, .has_noise = use_noise, .has_forced = forced >= 0}});
          },
          "logits"_a, "out"_a, "rows"_a, "V"_a, "temp"_a, "top_k"_a, "greedy"_a = false, "noise"_a = -1,
          "forced"_a = -1)
      .def(
          "embed_add",
          [](P& p, int pre, int table, int tokens, int out, int B, int D, int rows) {
            const char* op = "tick embed_add";
            const long e = es(p, pre);
            need(p, pre, static_cast<long>(B) * D * e, op, "pre");
            need(p, table, static_cast<long>(rows) * D * e, op, "table");
            need(p, tokens, 4L * B, op, "tokens");
            need(p, out, static_cast<long>(B) * D * e, op, "out");
            same_dtype(p, op, {pre, table, out});
            p.add(prog::EmbedAdd{.pre = pre, .table = table, .tokens = tokens, .out = out,
                                 .args = EmbedArgs{.B = B, .D = D, .rows = rows}});
          },
          "pre"_a, "table"_a, "tokens"_a, "out"_a, "B"_a, "D"_a, "rows"_a)
      .def(
          "norm",
          [](P& p, int x, int w, int out, int rows, int dim, float eps, int b) {
            const char* op = "tick norm";
            const long e = es(p, x);
            need(p, x, static_cast<long>(rows) * dim * e, op, "x");
            need(p, w, dim * e, op, "w");
            need(p, b, b >= 0 ? dim * e : 0, op, "b");
            need(p, out, static_cast<long>(rows) * dim * e, op, "out");
            same_dtype(p, op, {x, w, b, out});
            p.add(prog::Norm{.x = x, .w = w, .b = b, .out = out,
                             .args = NormArgs{.rows = rows, .dim = dim, .eps = eps, .layer = b >= 0}});
          },
          "x"_a, "w"_a, "out"_a, "rows"_a, "dim"_a, "eps"_a, "b"_a = -1,
          "RMSNorm of rows (b = -1) or LayerNorm with bias b.")
      .def(
          "gelu",
          [](P& p, int x, int out, int rows, int cols) {
            need(p, x, static_cast<long>(rows) * cols * es(p, x), "tick gelu", "x");
            need(p, out, static_cast<long>(rows) * cols * es(p, x), "tick gelu", "out");
            p.add(prog::Gelu{.x = x, .out = out, .args = RowsArgs{.rows = rows, .cols = cols}});
          },
          "x"_a, "out"_a, "rows"_a, "cols"_a)
      .def(
          "scale_add",
          [](P& p, int x, int y, int out, int rows, int cols, int scale) {
            const char* op = "tick scale_add";
            const long n = static_cast<long>(rows) * cols * es(p, x);
            need(p, x, n, op, "x");
            need(p, y, n, op, "y");
            need(p, out, n, op, "out");
            need(p, scale, scale >= 0 ? cols * es(p, x) : 0, op, "scale");
            same_dtype(p, op, {x, y, out, scale});
            p.add(prog::ScaleAdd{.x = x, .scale = scale, .y = y, .out = out, .args = RowsArgs{.rows = rows, .cols = cols}});
          },
          "x"_a, "y"_a, "out"_a, "rows"_a, "cols"_a, "scale"_a = -1, "out = x + scale * y (per column), or x + y.")
      .def(
          "frame_in",
          [](P& p, int tokens, int forced, int offsets, int delays, int sem, int ac, int cur, int now, int B,
             int n_q, int dep_q, int n_sem, int n_ac, int R, int max_delay, int text_initial, int audio_initial,
             int card) {
            const char* op = "tick frame_in";
            const int user_q = n_q - dep_q;
            check(user_q >= 0 && user_q <= n_sem + n_ac && R > max_delay + 1, op, "inconsistent streams");
            need(p, tokens, 4L * B * (1 + n_q) * R, op, "tokens");
            need(p, forced, 4L * B * (1 + dep_q) * R, op, "forced");
            need(p, offsets, 4L * B, op, "offsets");
            need(p, delays, 4L * (1 + n_q), op, "delays");
            need(p, sem, 4L * B * n_sem, op, "sem");
            need(p, ac, 4L * B * n_ac, op, "ac");
            need(p, cur, 4L * B * (1 + n_q), op, "cur");
            need(p, now, 4L * B * (1 + dep_q), op, "now");
            p.add(prog::FrameIn{.tokens = tokens, .forced = forced, .offsets = offsets, .delays = delays, .sem = sem,
                                .ac = ac, .cur = cur, .now = now, .n_ac = n_ac, .args =
                                FrameArgs{.B = B, .n_q = n_q, .dep_q = dep_q, .user_q = user_q, .n_sem = n_sem,
                                          .R = R, .max_delay = max_delay, .text_initial = text_initial,
                                          .audio_initial = audio_initial, .card = card}});
          },
          "tokens"_a, "forced"_a, "offsets"_a, "delays"_a, "sem"_a, "ac"_a, "cur"_a, "now"_a, "B"_a, "n_q"_a,
          "dep_q"_a, "n_sem"_a, "n_ac"_a, "R"_a, "max_delay"_a, "text_initial"_a, "audio_initial"_a, "card"_a)
      .def(
          "frame_out",
          [](P& p, int tokens, int offsets, int delays, int gen, int out, int sem, int ac, int valid, int B,
             int n_q, int dep_q, int n_sem, int R, int max_delay, int card) {
            const char* op = "tick frame_out";
            check(n_sem <= dep_q && R > max_delay + 1, op, "inconsistent streams");
            need(p, tokens, 4L * B * (1 + n_q) * R, op, "tokens");
            need(p, offsets, 4L * B, op, "offsets");
            need(p, delays, 4L * (1 + n_q), op, "delays");
            need(p, gen, 4L * B * (1 + dep_q), op, "gen");
            need(p, out, 4L * B * (1 + dep_q), op, "out");
            need(p, sem, 4L * B * n_sem, op, "sem");
            need(p, ac, 4L * B * (dep_q - n_sem), op, "ac");
            need(p, valid, 4L * B, op, "valid");
            p.add(prog::FrameOut{.tokens = tokens, .offsets = offsets, .delays = delays, .gen = gen, .out = out,
                                 .sem = sem, .ac = ac, .valid = valid, .args =
                                 FrameArgs{.B = B, .n_q = n_q, .dep_q = dep_q, .user_q = n_q - dep_q,
                                           .n_sem = n_sem, .R = R, .max_delay = max_delay, .card = card}});
          },
          "tokens"_a, "offsets"_a, "delays"_a, "gen"_a, "out"_a, "sem"_a, "ac"_a, "valid"_a, "B"_a, "n_q"_a,
          "dep_q"_a, "n_sem"_a, "R"_a, "max_delay"_a, "card"_a)
      .def(
          "gemm",
          [](P& p, int x, int w, int y, int M, int N, int K, bool accumulate) {
            const char* op = "tick gemm";
            const long e = es(p, x);
            need(p, x, static_cast<long>(M) * K * e, op, "x");
            need(p, w, static_cast<long>(N) * K * e, op, "w");
            need(p, y, static_cast<long>(M) * N * e, op, "y");
            same_dtype(p, op, {x, w, y});
            p.add(prog::Gemm{.x = x, .w = w, .y = y, .M = M, .N = N, .K = K, .accumulate = accumulate});
          },
          "x"_a, "w"_a, "y"_a, "M"_a, "N"_a, "K"_a, "accumulate"_a = false,
          "y [M, N] = x [M, K] W [N, K]^T (+ y): a cuBLAS GEMM on CUDA.")
      .def(
          "gate",
          [](P& p, int x, int out, int rows, int cols) {
            need(p, x, 2L * rows * cols * es(p, x), "tick gate", "x");
            need(p, out, static_cast<long>(rows) * cols * es(p, x), "tick gate", "out");
            same_dtype(p, "tick gate", {x, out});
            p.add(prog::Gate{.x = x, .out = out, .args = RowsArgs{.rows = rows, .cols = cols}});
          },
          "x"_a, "out"_a, "rows"_a, "cols"_a, "out = silu(first half of x) * second half, as matvec's gate.")
      .def("profile", &P::profile, "Each op's time (ms), the ops run once outside the graph.")
      .def("time_range", &P::time_range, "first"_a, "end"_a, "reps"_a = 50,
           "Ops [first, end) alone, reps times in a row: each time's ms (on CUDA, as a graph of their own, "
           "captured as the tick's).")
      .def("op_offset", &P::op_offset,
           "Where the op added i-th sits among the ops the ticks run: i + op_offset() (the program's reset op "
           "comes first). Seals the program.")
      .def(
          "mute",
          [](P& p, int x, int valid, int out, int rows, int cols) {
            need(p, x, 4L * rows * cols, "tick mute", "x");
            need(p, out, 4L * rows * cols, "tick mute", "out");
            need(p, valid, 4L * rows, "tick mute", "valid");
            p.add(prog::Mute{.x = x, .valid = valid, .out = out, .args = RowsArgs{.rows = rows, .cols = cols}});
          },
          "x"_a, "valid"_a, "out"_a, "rows"_a, "cols"_a)
      .def(
          "copy",
          [](P& p, int dst, int src, long bytes) {
            need(p, dst, bytes, "tick copy", "dst");
            need(p, src, bytes, "tick copy", "src");
            p.add(prog::Copy{.dst = dst, .src = src, .bytes = bytes});
          },
          "dst"_a, "src"_a, "bytes"_a);

  m.def(
      "tick",
      [](std::shared_ptr<P> program, const mx::array& pcm, const mx::array& control, mx::StreamOrDevice s) {
        return tick(std::move(program), pcm, control, s);
      },
      "program"_a, "pcm"_a, "control"_a, nb::kw_only(), "stream"_a = nb::none(),
      "One frame of every session through the program: returns [pcm' [B, F] float32, tokens [B, G] int32].");
}

}  // namespace personaplex
