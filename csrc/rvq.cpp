// Graph construction and the CPU paths of RvqEncode / RvqDecode (see rvq.h).

#include "rvq.h"

#include <algorithm>
#include <vector>

#include "codec_common.h"
#include "cpu_kernels.h"
#include "mlx/backend/cpu/encoder.h"

namespace personaplex {

namespace {

using codec::check;
using codec::shape_str;

void rvq_encode_cpu(const float* x, const float* books, int32_t* codes, size_t n, int n_q,
                    int bins, int D) {
  // |e|^2 of every entry, once per call.
  std::vector<float> norms(static_cast<size_t>(n_q) * bins);
  for (size_t j = 0; j < norms.size(); ++j) {
    const float* e = books + j * D;
    norms[j] = codec::dot(e, e, D);
  }
  std::vector<float> r(D);
  for (size_t i = 0; i < n; ++i) {
    std::copy(x + i * D, x + (i + 1) * D, r.begin());
    for (int q = 0; q < n_q; ++q) {
      const float* book = books + static_cast<size_t>(q) * bins * D;
      const float rr = codec::dot(r.data(), r.data(), D);
      int best = 0;
      float best_d = INFINITY;
      for (int j = 0; j < bins; ++j) {
        const float d = (rr - 2.f * codec::dot(r.data(), book + static_cast<size_t>(j) * D, D)) +
                        norms[static_cast<size_t>(q) * bins + j];
        if (d < best_d) {  // strict: the lowest index wins a tie
          best_d = d;
          best = j;
        }
      }
      codes[i * n_q + q] = best;
      const float* e = book + static_cast<size_t>(best) * D;
      for (int k = 0; k < D; ++k) r[k] -= e[k];
    }
  }
}

void rvq_decode_cpu(const int32_t* codes, const float* books, float* out, size_t n, int n_q,
                    int bins, int D) {
  for (size_t i = 0; i < n; ++i) {
    float* o = out + i * D;
    std::fill(o, o + D, 0.f);
    for (int q = 0; q < n_q; ++q) {
      const int c = std::clamp(codes[i * n_q + q], 0, bins - 1);
      const float* e = books + (static_cast<size_t>(q) * bins + c) * D;
      for (int k = 0; k < D; ++k) o[k] += e[k];
    }
  }
}

void check_books(const char* op, const mx::array& books) {
  check(books.ndim() == 3 && books.size() > 0, op,
        "codebooks must be [n_q, bins, D], got " + shape_str(books));
}

}  // namespace

void cpu::rvq_encode(const float* x, const float* books, int32_t* codes, size_t n, int n_q, int bins, int D) {
  rvq_encode_cpu(x, books, codes, n, n_q, bins, D);
}

void cpu::rvq_decode(const int32_t* codes, const float* books, float* out, size_t n, int n_q, int bins, int D) {
  rvq_decode_cpu(codes, books, out, n, n_q, bins, D);
}

mx::array rvq_encode(const mx::array& x, const mx::array& codebooks, mx::StreamOrDevice s) {
  check_books("rvq_encode", codebooks);
  check(x.ndim() >= 1 && x.shape(-1) == codebooks.shape(2), "rvq_encode",
        "x " + shape_str(x) + " must end in the codebook dim " + std::to_string(codebooks.shape(2)));
  auto st = mx::to_stream(s);
  auto f32 = [&](const mx::array& a) { return mx::contiguous(mx::astype(a, mx::float32, st), false, st); };
  auto shape = x.shape();
  shape.back() = codebooks.shape(0);
  return mx::array(shape, mx::int32, std::make_shared<RvqEncode>(st), {f32(x), f32(codebooks)});
}

mx::array rvq_decode(const mx::array& codes, const mx::array& codebooks, mx::StreamOrDevice s) {
  check_books("rvq_decode", codebooks);
  check(codes.ndim() >= 1 && codes.shape(-1) == codebooks.shape(0), "rvq_decode",
        "codes " + shape_str(codes) + " must end in n_q = " + std::to_string(codebooks.shape(0)));
  auto st = mx::to_stream(s);
  auto shape = codes.shape();
  shape.back() = codebooks.shape(2);
  return mx::array(shape, mx::float32, std::make_shared<RvqDecode>(st),
                   {mx::contiguous(mx::astype(codes, mx::int32, st), false, st),
                    mx::contiguous(mx::astype(codebooks, mx::float32, st), false, st)});
}

std::vector<mx::Shape> RvqEncode::output_shapes(const std::vector<mx::array>& inputs) {
  auto shape = inputs[0].shape();
  shape.back() = inputs[1].shape(0);
  return {shape};
}

std::vector<mx::Shape> RvqDecode::output_shapes(const std::vector<mx::array>& inputs) {
  auto shape = inputs[0].shape();
  shape.back() = inputs[1].shape(2);
  return {shape};
}

void RvqEncode::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  alloc_outputs(outputs);
  auto& enc = cpu_encoder(stream(), inputs, outputs);
  auto& out = outputs[0];
  const auto& books = inputs[1];
  const int n_q = books.shape(0), bins = books.shape(1), D = books.shape(2);
  enc.dispatch([x = inputs[0].data<float>(), b = books.data<float>(), c = out.data<int32_t>(),
                n = out.size() / n_q, n_q, bins, D]() { rvq_encode_cpu(x, b, c, n, n_q, bins, D); });
}

void RvqDecode::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  alloc_outputs(outputs);
  auto& enc = cpu_encoder(stream(), inputs, outputs);
  auto& out = outputs[0];
  const auto& books = inputs[1];
  const int n_q = books.shape(0), bins = books.shape(1), D = books.shape(2);
  enc.dispatch([c = inputs[0].data<int32_t>(), b = books.data<float>(), o = out.data<float>(),
                n = out.size() / D, n_q, bins, D]() { rvq_decode_cpu(c, b, o, n, n_q, bins, D); });
}

}  // namespace personaplex
