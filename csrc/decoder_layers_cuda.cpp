// The CUDA path of DecoderLayers: per layer, the kernels of matvec and
// ring_attention (cuda_nodes.h) chained in MLX's graph from this one eval_gpu.
// q, k and v are read in place from the QKV projection's rows (RingArgs strides).

#include <cmath>
#include <stdexcept>
#include <string>

#include "cuda_nodes.h"
#include "decoder_layers.h"
#include "decoder_layers_common.h"
#include "ring_attention.h"  // rope_step

namespace personaplex {

namespace cu = mx::cu;

cuda::Arrays cuda::proj_reads(const std::vector<mx::array>& inputs, const Proj& p,
                              std::initializer_list<const mx::array*> more) {
  Arrays r = {&inputs[p.w]};
  if (p.scales >= 0) r.insert(r.end(), {&inputs[p.scales], &inputs[p.biases]});
  r.insert(r.end(), more);
  return r;
}

void cuda::add_decoder_layers(cu::CommandEncoder& enc, const StackNode& node) {
  const StackShape& n = node.stack;
  const auto dt = n.dtype;
  const auto& inputs = *n.inputs;
  const int B = n.x->shape(0), C = n.x->shape(1), H = n.heads, D = C / H, L = n.layers;
  const int W = n.kc[0]->shape(2), hidden = n.hidden, bits = n.bits;
  const float eps = n.eps;
  auto temp = [&](int rows, int cols) {
    mx::array a({rows, cols}, dt, nullptr, {});
    cuda::alloc_output(a, enc);
    enc.add_temporary(a);
    return a;
  };
  mx::array qkv = temp(B, 3 * C), attn = temp(B, C), x1 = temp(B, C), h = temp(B, hidden),
            xb = temp(B, C);

  const size_t es = mx::size_of(dt);
  char* qkv_p = static_cast<char*>(ptr(qkv));
  const mx::array* cur = n.x;
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  for (int l = 0; l < L; ++l) {
    const LayerInputs li = layer_inputs(n.first_weight + l * layer_arrays(bits), bits);
    auto in = [&](int i) -> const mx::array* { return i < 0 ? nullptr : &inputs[i]; };
    auto p = [&](int i) -> void* { return i < 0 ? nullptr : ptr(inputs[i]); };
    // qkv = in_proj(norm1(x))
    cuda::add_matvec(enc,
                     {.dtype = dt, .bits = bits, .x = ptr(*cur), .w = p(li.in.w), .scales = p(li.in.scales),
                      .biases = p(li.in.biases), .alpha = p(li.alpha1), .out = qkv_p,
                      .args = {.M = B, .K = C, .n_out = 3 * C, .norm = 1, .eps = eps}},
                     cuda::proj_reads(inputs, li.in, {cur, in(li.alpha1)}), {&qkv});
    // attention over the ring, q / k / v read from qkv's rows [B, 3, H, D]
    const mx::array &kc = *n.kc[l], &vc = *n.vc[l];
    cuda::add_ring_attention(enc,
                             {.dtype = dt, .q = qkv_p, .k = qkv_p + C * es, .v = qkv_p + 2 * C * es,
                              .kc = ptr(kc), .vc = ptr(vc), .pos = node.pos, .out = ptr(attn),
                              .kc_out = ptr(*n.kc_out[l]), .vc_out = ptr(*n.vc_out[l]),
                              .args = {.B = B, .H = H, .T = 1, .D = D, .W = W, .copy_k = n.copy[l],
                                       .copy_v = n.copy[L + l], .rope = n.rope_max_period > 0.f,
                                       .rope_step = rope_step(n.rope_max_period, D), .scale = scale,
                                       .new_b = 3L * C, .new_h = D, .new_t = 3L * C}},
                             {&qkv, &kc, &vc, node.pos_array}, {&attn, n.kc_out[l], n.vc_out[l]});
    // x1 = x + out_proj(attn)
    cuda::add_matvec(enc,
                     {.dtype = dt, .bits = bits, .x = ptr(attn), .w = p(li.out.w), .scales = p(li.out.scales),
                      .biases = p(li.out.biases), .residual = ptr(*cur), .out = ptr(x1),
                      .args = {.M = B, .K = C, .n_out = C, .residual = 1, .eps = eps}},
                     cuda::proj_reads(inputs, li.out, {&attn, cur}), {&x1});
    // h = silu-gated linear_in(norm2(x1))
    cuda::add_matvec(enc,
                     {.dtype = dt, .bits = bits, .x = ptr(x1), .w = p(li.ffn_in.w),
                      .scales = p(li.ffn_in.scales), .biases = p(li.ffn_in.biases), .alpha = p(li.alpha2),
                      .out = ptr(h),
                      .args = {.M = B, .K = C, .n_out = hidden, .norm = 1, .gate = 1, .eps = eps}},
                     cuda::proj_reads(inputs, li.ffn_in, {&x1, in(li.alpha2)}), {&h});
    // x = x1 + linear_out(h)
    mx::array* dst = l == L - 1 ? n.y : &xb;
    cuda::add_matvec(enc,
                     {.dtype = dt, .bits = bits, .x = ptr(h), .w = p(li.ffn_out.w),
                      .scales = p(li.ffn_out.scales), .biases = p(li.ffn_out.biases), .residual = ptr(x1),
                      .out = ptr(*dst), .args = {.M = B, .K = hidden, .n_out = C, .residual = 1, .eps = eps}},
                     cuda::proj_reads(inputs, li.ffn_out, {&h, &x1}), {dst});
    cur = dst;
  }
}

void DecoderLayers::eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  const int L = layers_;
  const int n_out = static_cast<int>(outputs.size());
  auto& enc = cu::get_command_encoder(stream());

  // Caches: all waits first (at most one synchronize), then take over or copy.
  std::vector<std::pair<const mx::array*, bool>> caches;
  for (int l = 0; l < L; ++l) {
    for (bool value : {false, true}) {
      const auto& c = inputs[cache_index(l, value)];
      caches.push_back({&c, cuda::cache_free(c, n_out)});
    }
  }
  cuda::wait_for_caches(caches, enc);
  cuda::StackNode n{.stack = stack(inputs, outputs), .pos_array = &inputs[1], .pos = cuda::ptr(inputs[1])};
  StackShape& s = n.stack;
  for (int l = 0; l < L; ++l) {
    s.copy[l] = !cuda::take_cache(*s.kc[l], *s.kc_out[l], caches[2 * l].second, enc);
    s.copy[L + l] = !cuda::take_cache(*s.vc[l], *s.vc_out[l], caches[2 * l + 1].second, enc);
  }
  cuda::alloc_output(outputs[0], enc);
  cuda::add_decoder_layers(enc, n);
}

}  // namespace personaplex
