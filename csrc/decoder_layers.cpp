// Graph construction and the CPU path of DecoderLayers (see decoder_layers.h).
// The CUDA path lives in decoder_layers_cuda.cpp; its kernels are matvec's and
// ring_attention's, so there is no kernel source of its own.

#include "decoder_layers.h"

#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

#include "common.h"
#include "cpu_kernels.h"
#include "decoder_layers_common.h"
#include "mlx/backend/cpu/encoder.h"
#include "ring_attention.h"

namespace personaplex {

namespace {

void check(bool ok, const std::string& msg) { personaplex::check(ok, "decoder_layers", msg); }

}  // namespace

void check_projection(const char* op, const std::string& what, const mx::array* w, int N, int K, int bits,
                      mx::Dtype dt) {
  const int cols = bits ? K * bits / 32 : K;
  personaplex::check(w[0].ndim() == 2 && w[0].shape(0) == N && w[0].shape(1) == cols, op,
                     what + " weight must be [" + std::to_string(N) + ", " + std::to_string(cols) +
                         "], got " + shape_str(w[0]));
  personaplex::check(w[0].dtype() == (bits ? mx::uint32 : dt), op, what + " weight has the wrong dtype");
  for (int i = 1; bits && i < 3; ++i) {
    personaplex::check(w[i].ndim() == 2 && w[i].shape(0) == N && w[i].shape(1) == K / 64 && w[i].dtype() == dt,
                       op, what + " scales and biases must be [" + std::to_string(N) + ", " +
                               std::to_string(K / 64) + "] of x's dtype, got " + shape_str(w[i]));
  }
}

void check_layer_stack(const char* op, const mx::array* weights, int L, int C, int bits, mx::Dtype dt) {
  const LayerInputs li = layer_inputs(0, bits);  // input offsets within one layer's weights
  for (int l = 0; l < L; ++l) {
    const mx::array* w = weights + l * layer_arrays(bits);
    const std::string at = "layer " + std::to_string(l) + ": ";
    personaplex::check(w[li.alpha1].size() == static_cast<size_t>(C) && w[li.alpha2].size() == static_cast<size_t>(C),
                       op, at + "norm alphas must hold C values");
    check_projection(op, at + "in_proj", w + li.in.w, 3 * C, C, bits, dt);
    check_projection(op, at + "out_proj", w + li.out.w, C, C, bits, dt);
    const int hidden2 = w[li.ffn_in.w].ndim() == 2 ? w[li.ffn_in.w].shape(0) : 0;
    personaplex::check(hidden2 > 0 && hidden2 % 2 == 0, op, at + "linear_in needs an even number of rows");
    check_projection(op, at + "linear_in", w + li.ffn_in.w, hidden2, C, bits, dt);
    check_projection(op, at + "linear_out", w + li.ffn_out.w, C, hidden2 / 2, bits, dt);
  }
}

void push_layer_stack(std::vector<mx::array>& inputs, const mx::array* weights, int L, int C, int bits,
                      mx::Dtype dt, mx::Stream st) {
  const LayerInputs li = layer_inputs(0, bits);
  const int per = layer_arrays(bits);
  for (int i = 0; i < L * per; ++i) {
    const bool alpha = i % per == li.alpha1 || i % per == li.alpha2;
    const auto& w = weights[i];
    inputs.push_back(alpha ? gain_input(w, C, dt, st) : dense_input(w, st));
  }
}

std::vector<mx::array> decoder_layers(const mx::array& x, const mx::array& pos,
                                      const std::vector<mx::array>& weights,
                                      const std::vector<mx::array>& k_caches,
                                      const std::vector<mx::array>& v_caches, int heads, int bits,
                                      float eps, float rope_max_period, mx::StreamOrDevice s) {
  check(x.ndim() == 2, "x must be [B, C], got " + shape_str(x));
  const auto dt = x.dtype();
  check(dt == mx::float32 || dt == mx::bfloat16 || dt == mx::float16,
        "x must be float32, bfloat16 or float16");
  check(bits == 0 || bits == 4 || bits == 8, "bits must be 0 (dense), 4 or 8");
  const int B = x.shape(0), C = x.shape(1);
  check(heads > 0 && C % heads == 0 && (C / heads) % 2 == 0, "C must split into heads of even size");
  check(!bits || C % 64 == 0, "quantized weights need C divisible by 64");
  const int L = static_cast<int>(k_caches.size());
  const int per = layer_arrays(bits);
  check(L > 0 && v_caches.size() == k_caches.size(), "need one k and one v cache per layer");
  check(weights.size() == static_cast<size_t>(L * per),
        "expected " + std::to_string(per) + " weights per layer (" + std::to_string(L * per) +
            "), got " + std::to_string(weights.size()));
  check(pos.ndim() == 1 && pos.shape(0) == B, "pos must be [B], got " + shape_str(pos));
  const int D = C / heads;
  check_layer_stack("decoder_layers", weights.data(), L, C, bits, dt);
  for (int l = 0; l < L; ++l) {
    for (auto* c : {&k_caches[l], &v_caches[l]}) {
      check(c->ndim() == 4 && c->shape(0) == B && c->shape(1) == heads && c->shape(3) == D &&
                c->shape() == k_caches[l].shape() && c->dtype() == dt,
            "layer " + std::to_string(l) + ": caches must be [B, H, W, D] of x's dtype, got " + shape_str(*c));
    }
  }
  auto st = mx::to_stream(s);
  auto c = [&](const mx::array& a) { return mx::contiguous(a, false, st); };
  std::vector<mx::array> inputs = {c(x), c(mx::astype(pos, mx::int32, st))};
  push_layer_stack(inputs, weights.data(), L, C, bits, dt, st);
  for (auto& k : k_caches) inputs.push_back(c(k));
  for (auto& v : v_caches) inputs.push_back(c(v));
  std::vector<mx::Shape> shapes = {x.shape()};
  for (auto& k : k_caches) shapes.push_back(k.shape());
  for (auto& v : v_caches) shapes.push_back(v.shape());
  auto prim = std::make_shared<DecoderLayers>(st, L, heads, bits, eps, rope_max_period);
  return mx::array::make_arrays(std::move(shapes), std::vector<mx::Dtype>(shapes.size(), dt), prim,
                                std::move(inputs));
}

StackShape DecoderLayers::stack(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) const {
  const int L = layers_;
  StackShape s{.dtype = inputs[0].dtype(),
               .bits = bits_,
               .heads = heads_,
               .layers = L,
               .hidden = inputs[layer(0).ffn_in.w].shape(0) / 2,
               .eps = eps_,
               .rope_max_period = rope_max_period_,
               .inputs = &inputs,
               .first_weight = weight_index(0),
               .x = &inputs[0],
               .y = &outputs[0],
               .copy = std::vector<char>(2 * L)};
  for (int l = 0; l < L; ++l) {
    s.kc.push_back(&inputs[cache_index(l, false)]);
    s.vc.push_back(&inputs[cache_index(l, true)]);
    s.kc_out.push_back(&outputs[1 + l]);
    s.vc_out.push_back(&outputs[1 + L + l]);
  }
  return s;
}

bool DecoderLayers::is_equivalent(const mx::Primitive& other) const {
  auto& o = static_cast<const DecoderLayers&>(other);
  return layers_ == o.layers_ && heads_ == o.heads_ && bits_ == o.bits_ && eps_ == o.eps_ &&
         rope_max_period_ == o.rope_max_period_;
}

std::vector<mx::Shape> DecoderLayers::output_shapes(const std::vector<mx::array>& inputs) {
  std::vector<mx::Shape> shapes = {inputs[0].shape()};
  for (int l = 0; l < layers_; ++l) shapes.push_back(inputs[cache_index(l, false)].shape());
  for (int l = 0; l < layers_; ++l) shapes.push_back(inputs[cache_index(l, true)].shape());
  return shapes;
}

void DecoderLayers::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  const auto& x = inputs[0];
  const auto dt = x.dtype();
  const int B = x.shape(0), C = x.shape(1), H = heads_, L = layers_;
  const int W = inputs[cache_index(0, false)].shape(2);
  const int n_out = static_cast<int>(outputs.size());
  outputs[0].set_data(mx::allocator::malloc(outputs[0].nbytes()));
  std::vector<char> copy(2 * L);
  for (int l = 0; l < L; ++l) {
    copy[l] = !donate_cache(inputs[cache_index(l, false)], outputs[1 + l], n_out);
    copy[L + l] = !donate_cache(inputs[cache_index(l, true)], outputs[1 + L + l], n_out);
  }
  auto& enc = cpu_encoder(stream(), inputs, outputs);
  auto data = [](const mx::array& a) -> const void* { return a.data<void>(); };
  std::vector<LayerPointers> layers(L);
  for (int l = 0; l < L; ++l) layers[l] = layer_pointers(inputs, layer(l), data);
  std::vector<const void*> kc(L), vc(L);  // held by the task's copies of these vectors
  std::vector<void*> kc_out(L), vc_out(L);
  for (int l = 0; l < L; ++l) {
    kc[l] = inputs[cache_index(l, false)].data<void>();
    vc[l] = inputs[cache_index(l, true)].data<void>();
    kc_out[l] = outputs[1 + l].data<void>();
    vc_out[l] = outputs[1 + L + l].data<void>();
  }
  const int hidden = inputs[layer(0).ffn_in.w].shape(0) / 2;
  enc.dispatch([=, x = x.data<void>(), pos = inputs[1].data<int32_t>(), y = outputs[0].data<void>(),
                cache_bytes = outputs[1].nbytes(), bits = bits_, eps = eps_, mp = rope_max_period_]() {
    cpu::decoder_layers(dt, x, y, pos, layers.data(), L, kc.data(), vc.data(), kc_out.data(), vc_out.data(),
                        copy.data(), cache_bytes, B, C, H, W, hidden, bits, eps, mp);
  });
}

void cpu::decoder_layers(mx::Dtype dt, const void* x, void* y, const int32_t* pos,
                         const LayerPointers* layers, int L, const void* const* kc, const void* const* vc,
                         void* const* kc_out, void* const* vc_out, const char* copy, size_t cache_bytes,
                         int B, int C, int H, int W, int hidden, int bits, float eps, float mp) {
  const int D = C / H;
  const size_t es = mx::size_of(dt);
  std::vector<char> cur(B * C * es), qkv(B * 3 * C * es), q(B * C * es), k(B * C * es), v(B * C * es),
      krot(B * C * es), attn(B * C * es), x1(B * C * es), h(B * hidden * es);
  std::memcpy(cur.data(), x, B * C * es);
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  for (int l = 0; l < L; ++l) {
    const LayerPointers& p = layers[l];
    cpu::matvec(dt, cur.data(), p.in.w, p.in.scales, p.in.biases, p.alpha1, nullptr, qkv.data(), B, C,
                3 * C, bits, false, eps);
    for (int b = 0; b < B; ++b) {  // [B, 3, H, D] rows -> q, k, v [B, H, 1, D]
      std::memcpy(q.data() + b * C * es, qkv.data() + (b * 3 + 0) * C * es, C * es);
      std::memcpy(k.data() + b * C * es, qkv.data() + (b * 3 + 1) * C * es, C * es);
      std::memcpy(v.data() + b * C * es, qkv.data() + (b * 3 + 2) * C * es, C * es);
    }
    cpu::ring_attend(dt, q.data(), k.data(), v.data(), kc[l], vc[l], pos, attn.data(), krot.data(), B,
                     H, 1, D, W, scale, mp);
    if (copy[l]) std::memcpy(kc_out[l], kc[l], cache_bytes);
    if (copy[L + l]) std::memcpy(vc_out[l], vc[l], cache_bytes);
    cpu::ring_write(dt, kc_out[l], krot.data(), pos, B, H, 1, D, W);
    cpu::ring_write(dt, vc_out[l], v.data(), pos, B, H, 1, D, W);
    cpu::matvec(dt, attn.data(), p.out.w, p.out.scales, p.out.biases, nullptr, cur.data(), x1.data(), B,
                C, C, bits, false, eps);
    cpu::matvec(dt, x1.data(), p.ffn_in.w, p.ffn_in.scales, p.ffn_in.biases, p.alpha2, nullptr,
                h.data(), B, C, 2 * hidden, bits, true, eps);
    cpu::matvec(dt, h.data(), p.ffn_out.w, p.ffn_out.scales, p.ffn_out.biases, nullptr, x1.data(),
                l == L - 1 ? y : cur.data(), B, hidden, C, bits, false, eps);
  }
}

}  // namespace personaplex
