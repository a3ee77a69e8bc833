// The Metal path of DecoderLayers: per layer, the dispatches of matvec and
// ring_attention (metal_nodes.h) from this one eval_gpu, in the order and with
// the operands of decoder_layers_cuda.cpp. q, k and v are read in place from the
// QKV projection's rows (RingArgs strides, byte offsets into qkv).

#include <cmath>

#include "decoder_layers.h"
#include "metal_nodes.h"
#include "ring_attention.h"  // rope_step

namespace personaplex {

metal::ProjBufs metal::proj_bufs(const std::vector<mx::array>& inputs, const Proj& p) {
  auto opt = [&](int i) { return i < 0 ? Buf{} : at(inputs[i]); };
  return {.w = at(inputs[p.w]), .scales = opt(p.scales), .biases = opt(p.biases)};
}

void metal::add_decoder_layers(mx::metal::CommandEncoder& enc, mx::metal::Device& d, const StackNode& node) {
  const StackShape& n = node.stack;
  const auto dt = n.dtype;
  const auto& inputs = *n.inputs;
  const int B = n.x->shape(0), C = n.x->shape(1), H = n.heads, D = C / H, L = n.layers;
  const int W = n.kc[0]->shape(2), hidden = n.hidden, bits = n.bits;
  const float eps = n.eps;
  mx::array qkv = temporary(enc, {B, 3 * C}, dt), attn = temporary(enc, {B, C}, dt),
            x1 = temporary(enc, {B, C}, dt), h = temporary(enc, {B, hidden}, dt),
            xb = temporary(enc, {B, C}, dt);
  const int64_t es = static_cast<int64_t>(mx::size_of(dt));
  const mx::array* cur = n.x;
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  for (int l = 0; l < L; ++l) {
    const LayerInputs li = layer_inputs(n.first_weight + l * layer_arrays(bits), bits);
    auto project = [&](const Proj& p, const Buf& x, const Buf& alpha, const Buf& residual, const Buf& out,
                      MatvecArgs args) {
      const ProjBufs w = proj_bufs(inputs, p);
      args.eps = eps;
      add_matvec(enc, d,
                 {.dtype = dt, .bits = bits, .x = x, .w = w.w, .scales = w.scales, .biases = w.biases,
                  .alpha = alpha, .residual = residual, .out = out, .args = args});
    };
    // qkv = in_proj(norm1(x))
    project(li.in, at(*cur), at(inputs[li.alpha1]), {}, at(qkv), {.M = B, .K = C, .n_out = 3 * C, .norm = 1});
    // attention over the ring, q / k / v read from qkv's rows [B, 3, H, D]
    add_ring_attention(enc, d,
                       {.dtype = dt, .q = at(qkv), .k = at(qkv, C * es), .v = at(qkv, 2 * C * es),
                        .kc = at(*n.kc[l]), .vc = at(*n.vc[l]), .pos = node.pos, .out = at(attn),
                        .kc_out = at(*n.kc_out[l]), .vc_out = at(*n.vc_out[l]),
                        .args = {.B = B, .H = H, .T = 1, .D = D, .W = W, .copy_k = n.copy[l],
                                 .copy_v = n.copy[L + l], .rope = n.rope_max_period > 0.f,
                                 .rope_step = rope_step(n.rope_max_period, D), .scale = scale,
                                 .new_b = 3L * C, .new_h = D, .new_t = 3L * C}});
    // x1 = x + out_proj(attn)
    project(li.out, at(attn), {}, at(*cur), at(x1), {.M = B, .K = C, .n_out = C, .residual = 1});
    // h = silu-gated linear_in(norm2(x1))
    project(li.ffn_in, at(x1), at(inputs[li.alpha2]), {}, at(h),
           {.M = B, .K = C, .n_out = hidden, .norm = 1, .gate = 1});
    // x = x1 + linear_out(h)
    mx::array* dst = l == L - 1 ? n.y : &xb;
    project(li.ffn_out, at(h), {}, at(x1), at(*dst), {.M = B, .K = hidden, .n_out = C, .residual = 1});
    cur = dst;
  }
}

void DecoderLayers::eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  const int L = layers_;
  const int n_out = static_cast<int>(outputs.size());
  metal::StackNode n{.stack = stack(inputs, outputs), .pos = metal::at(inputs[1])};
  StackShape& s = n.stack;
  for (int l = 0; l < L; ++l) {
    s.copy[l] = !metal::take_cache(*s.kc[l], *s.kc_out[l], metal::cache_free(*s.kc[l], n_out));
    s.copy[L + l] = !metal::take_cache(*s.vc[l], *s.vc_out[l], metal::cache_free(*s.vc[l], n_out));
  }
  metal::alloc_output(outputs[0]);
  metal::add_decoder_layers(mx::metal::get_command_encoder(stream()), mx::metal::device(stream().device), n);
}

}  // namespace personaplex
