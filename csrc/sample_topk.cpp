// Graph construction and the CPU path of SampleTopK (see sample_topk.h).
// The CUDA path lives in sample_topk_cuda.cpp; the kernel body in kernels/sample_topk.cuh.

#include "sample_topk.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#include "common.h"
#include "cpu_kernels.h"
#include "mlx/backend/cpu/encoder.h"

namespace personaplex {

namespace {

void check(bool ok, const std::string& msg) { personaplex::check(ok, "sample_topk", msg); }

// (v, i) beats (best, best_i) when larger, or as large with a lower index (the kernel's rule).
bool beats(float v, int i, float best, int best_i) { return v > best || (v == best && i < best_i); }

template <typename T>
int32_t sample_row(const T* l, const float* noise, int V, float temp, int top_k, bool greedy,
                   std::vector<float>& s, std::vector<float>& sorted) {
  float best = -INFINITY;
  int best_i = V;
  if (greedy) {
    for (int i = 0; i < V; ++i) {
      if (beats(static_cast<float>(l[i]), i, best, best_i)) best = static_cast<float>(l[i]), best_i = i;
    }
    return best_i < V ? best_i : 0;
  }
  for (int i = 0; i < V; ++i) s[i] = static_cast<float>(l[i]) / temp;
  const bool topk = top_k > 0 && top_k < V;
  float kth = -INFINITY;
  if (topk) {  // the top_k-th largest number; NaN never counts (all kept if too few)
    sorted.clear();
    for (float v : s) {
      if (!std::isnan(v)) sorted.push_back(v);
    }
    if (static_cast<int>(sorted.size()) >= top_k) {
      std::nth_element(sorted.begin(), sorted.begin() + (top_k - 1), sorted.end(), std::greater<float>());
      kth = sorted[top_k - 1];
    }
  }
  for (int i = 0; i < V; ++i) {
    if (topk && !(s[i] >= kth)) continue;
    const float v = noise ? s[i] + noise[i] : s[i];
    if (beats(v, i, best, best_i)) best = v, best_i = i;
  }
  return best_i < V ? best_i : 0;
}

}  // namespace

void cpu::sample_topk(mx::Dtype dtype, const void* logits, const float* noise, const int32_t* forced,
                      int32_t* tokens, int R, int V, float temp, int top_k, bool greedy) {
  dispatch_float("sample_topk", dtype, [&](auto zero) {
    using T = decltype(zero);
    std::vector<float> s(V), sorted;
    for (int r = 0; r < R; ++r) {
      const size_t at = static_cast<size_t>(r) * V;
      const int32_t t = sample_row(static_cast<const T*>(logits) + at, noise ? noise + at : nullptr, V,
                                   temp, top_k, greedy, s, sorted);
      tokens[r] = forced && forced[r] >= 0 ? forced[r] : t;
    }
  });
}

mx::array sample_topk(const mx::array& logits, const std::optional<mx::array>& noise,
                      const std::optional<mx::array>& forced, float temp, int top_k, bool greedy,
                      mx::StreamOrDevice s) {
  check(logits.ndim() == 2, "logits must be [R, V], got " + shape_str(logits));
  const auto dt = logits.dtype();
  check(dt == mx::float32 || dt == mx::bfloat16 || dt == mx::float16,
        "logits must be float32, bfloat16 or float16");
  const int R = logits.shape(0), V = logits.shape(1);
  check(V > 0, "logits need at least one column");
  greedy = greedy || !(temp > 0.f);
  if (!greedy) check(std::isfinite(temp), "temp must be finite");
  const bool use_noise = noise.has_value() && !greedy;
  if (use_noise) {
    check(noise->shape() == logits.shape(), "noise must have the logits' shape " + shape_str(logits) +
                                                ", got " + shape_str(*noise));
  }
  if (forced) check(forced->ndim() == 1 && forced->shape(0) == R, "forced must be [R], got " + shape_str(*forced));
  auto st = mx::to_stream(s);
  auto c = [&](const mx::array& a) { return mx::contiguous(a, false, st); };
  std::vector<mx::array> inputs = {c(logits)};
  if (use_noise) inputs.push_back(c(mx::astype(*noise, mx::float32, st)));
  if (forced) inputs.push_back(c(mx::astype(*forced, mx::int32, st)));
  auto prim = std::make_shared<SampleTopK>(st, greedy ? 0.f : temp, greedy ? 0 : top_k, greedy, use_noise,
                                           forced.has_value());
  return mx::array({R}, mx::int32, prim, std::move(inputs));
}

bool SampleTopK::is_equivalent(const mx::Primitive& other) const {
  auto& o = static_cast<const SampleTopK&>(other);
  return temp_ == o.temp_ && top_k_ == o.top_k_ && greedy_ == o.greedy_ && noise_ == o.noise_ &&
         forced_ == o.forced_;
}

std::vector<mx::Shape> SampleTopK::output_shapes(const std::vector<mx::array>& inputs) {
  return {{inputs[0].shape(0)}};
}

void SampleTopK::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  alloc_outputs(outputs);
  auto& enc = cpu_encoder(stream(), inputs, outputs);
  auto& out = outputs[0];
  const auto& l = inputs[0];
  const float* noise = noise_ ? inputs[1].data<float>() : nullptr;
  const int32_t* forced = forced_ ? inputs[noise_ ? 2 : 1].data<int32_t>() : nullptr;
  enc.dispatch([dt = l.dtype(), l = l.data<void>(), noise, forced, o = out.data<int32_t>(), R = l.shape(0),
                V = l.shape(1), temp = temp_, top_k = top_k_, greedy = greedy_]() {
    cpu::sample_topk(dt, l, noise, forced, o, R, V, temp, top_k, greedy);
  });
}

}  // namespace personaplex
