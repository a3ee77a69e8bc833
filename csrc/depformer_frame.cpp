// Graph construction and the CPU path of DepformerFrame (see depformer_frame.h).
// The CUDA path lives in depformer_frame_cuda.cpp; its own kernel (embed_add) in
// kernels/depformer_frame.cuh, the others are matvec's, ring_attention's and
// sample_topk's.

#include "depformer_frame.h"

#include <cstring>
#include <stdexcept>
#include <string>

#include "common.h"
#include "cpu_kernels.h"
#include "decoder_layers_common.h"
#include "mlx/backend/cpu/encoder.h"

namespace personaplex {

namespace {

constexpr const char* kOp = "depformer_frame";

void check(bool ok, const std::string& msg) { personaplex::check(ok, kOp, msg); }


}  // namespace

// out[b, :] = T(pre[b, :] + table[tokens[b], :]); token -1 adds zeros, others are clamped.
void cpu::embed_add(mx::Dtype dt, const void* pre, const void* table, const int32_t* tokens, void* out,
                    int B, int D, int rows) {
  dispatch_float(kOp, dt, [&](auto zero) {
    using T = decltype(zero);
    const T* p = static_cast<const T*>(pre);
    const T* tab = static_cast<const T*>(table);
    T* o = static_cast<T*>(out);
    for (int b = 0; b < B; ++b) {
      const int t = tokens[b];
      const T* row = t == -1 ? nullptr : tab + static_cast<size_t>(t < 0 ? 0 : t >= rows ? rows - 1 : t) * D;
      for (int c = 0; c < D; ++c) {
        const float e = row ? static_cast<float>(row[c]) : 0.f;
        o[b * D + c] = static_cast<T>(static_cast<float>(p[b * D + c]) + e);
      }
    }
  });
}

std::vector<mx::array> depformer_frame(const mx::array& h, const mx::array& text, const mx::array& forced,
                                       const std::optional<mx::array>& noise,
                                       const std::vector<std::vector<mx::array>>& in_projs,
                                       const std::vector<mx::array>& tables,
                                       const std::vector<std::vector<mx::array>>& stacks,
                                       const std::vector<std::vector<mx::array>>& heads_w, int heads,
                                       int bits, float eps, float rope_max_period, float temp, int top_k,
                                       bool greedy, mx::StreamOrDevice s) {
  check(h.ndim() == 2 && h.shape(0) > 0, "h must be [B, C_in], got " + shape_str(h));
  const auto dt = h.dtype();
  check(dt == mx::float32 || dt == mx::bfloat16 || dt == mx::float16, "h must be float32, bfloat16 or float16");
  check(bits == 0 || bits == 4 || bits == 8, "bits must be 0 (dense), 4 or 8");
  const int B = h.shape(0), C_in = h.shape(1);
  const int Q = static_cast<int>(tables.size());
  check(Q > 0, "need one embedding table per codebook");
  check(heads_w.size() == tables.size(), "need one head per codebook (" + std::to_string(Q) + "), got " +
                                             std::to_string(heads_w.size()));
  const int n_in = static_cast<int>(in_projs.size()), n_stack = static_cast<int>(stacks.size());
  check(n_in == 1 || n_in == Q, "need 1 or Q input projections, got " + std::to_string(n_in));
  check(n_stack == 1 || n_stack == Q, "need 1 or Q layer stacks, got " + std::to_string(n_stack));
  const int D = tables[0].ndim() == 2 ? tables[0].shape(1) : 0;
  check(D > 0, "embedding tables must be [rows, D], got " + shape_str(tables[0]));
  check(heads > 0 && D % heads == 0 && (D / heads) % 2 == 0, "D must split into heads of even size");
  check(!bits || (D % 64 == 0 && C_in % 64 == 0), "quantized weights need widths divisible by 64");
  const size_t pa = proj_arrays(bits), per = layer_arrays(bits);
  for (auto& t : tables) {
    check(t.ndim() == 2 && t.shape(1) == D && t.shape(0) > 0 && t.dtype() == dt,
          "embedding tables must be [rows, " + std::to_string(D) + "] of h's dtype, got " + shape_str(t));
  }
  for (auto& p : in_projs) {
    check(p.size() == pa, "each projection is w, or w, scales, biases when quantized");
    check_projection(kOp, "in_proj", p.data(), D, C_in, bits, dt);
  }
  const int V = heads_w[0].size() && heads_w[0][0].ndim() == 2 ? heads_w[0][0].shape(0) : 0;
  for (auto& p : heads_w) {
    check(p.size() == pa, "each projection is w, or w, scales, biases when quantized");
    check_projection(kOp, "head", p.data(), V, D, bits, dt);
  }
  check(V > 0, "heads must have rows");
  const int L = static_cast<int>(stacks[0].size() / per);
  for (auto& st : stacks) {
    check(L > 0 && st.size() == L * per, "every layer stack needs " + std::to_string(per) +
                                             " weights per layer, the same number of layers");
    check_layer_stack(kOp, st.data(), L, D, bits, dt);
  }
  check(text.ndim() == 1 && text.shape(0) == B, "text must be [B], got " + shape_str(text));
  check(forced.ndim() == 2 && forced.shape(0) == Q && forced.shape(1) == B,
        "forced must be [Q, B], got " + shape_str(forced));
  greedy = greedy || !(temp > 0.f);
  const bool use_noise = noise.has_value() && !greedy;
  if (use_noise) {
    check(noise->ndim() == 3 && noise->shape(0) == Q && noise->shape(1) == B && noise->shape(2) == V,
          "noise must be [Q, B, V], got " + shape_str(*noise));
  }

  auto st = mx::to_stream(s);
  auto c = [&](const mx::array& a) { return mx::contiguous(a, false, st); };
  auto i32 = [&](const mx::array& a) { return c(mx::astype(a, mx::int32, st)); };
  mx::array pos = mx::broadcast_to(mx::reshape(mx::arange(Q, mx::int32, st), {Q, 1}, st), {Q, B}, st);
  std::vector<mx::array> inputs = {c(h), i32(text), i32(forced), i32(pos)};
  if (use_noise) inputs.push_back(c(mx::astype(*noise, mx::float32, st)));
  auto w = [&](const mx::array& a) { return dense_input(a, st); };
  for (auto& p : in_projs) for (auto& a : p) inputs.push_back(w(a));
  for (auto& t : tables) inputs.push_back(w(t));
  for (auto& stk : stacks) push_layer_stack(inputs, stk.data(), L, D, bits, dt, st);
  for (auto& p : heads_w) for (auto& a : p) inputs.push_back(w(a));
  const DepformerSpec spec{.Q = Q, .n_in = n_in, .n_stack = n_stack, .layers = L, .heads = heads,
                           .bits = bits, .eps = eps, .rope_max_period = rope_max_period,
                           .temp = greedy ? 0.f : temp, .top_k = greedy ? 0 : top_k, .greedy = greedy};
  auto prim = std::make_shared<DepformerFrame>(st, spec, use_noise);
  return mx::array::make_arrays({{Q, B}, {Q, B, V}}, {mx::int32, dt}, prim, std::move(inputs));
}

StackShape DepformerFrame::step_stack(int k, const std::vector<mx::array>& inputs, std::vector<mx::array>& caches,
                                      const mx::array& x, mx::array& y) const {
  const int L = s_.layers;
  StackShape s{.dtype = x.dtype(),
               .bits = s_.bits,
               .heads = s_.heads,
               .layers = L,
               .hidden = inputs[layer(0, 0).ffn_in.w].shape(0) / 2,
               .eps = s_.eps,
               .rope_max_period = s_.rope_max_period,
               .inputs = &inputs,
               .first_weight = stack_index(k),
               .x = &x,
               .y = &y,
               .copy = std::vector<char>(2 * L, 0)};
  for (int l = 0; l < L; ++l) {
    s.kc.push_back(&caches[l]);
    s.vc.push_back(&caches[L + l]);
    s.kc_out.push_back(&caches[l]);
    s.vc_out.push_back(&caches[L + l]);
  }
  return s;
}

bool DepformerFrame::is_equivalent(const mx::Primitive& other) const {
  auto& o = static_cast<const DepformerFrame&>(other).s_;
  return noise_ == static_cast<const DepformerFrame&>(other).noise_ && s_.Q == o.Q && s_.n_in == o.n_in &&
         s_.n_stack == o.n_stack && s_.layers == o.layers && s_.heads == o.heads && s_.bits == o.bits &&
         s_.eps == o.eps && s_.rope_max_period == o.rope_max_period && s_.temp == o.temp &&
         s_.top_k == o.top_k && s_.greedy == o.greedy;
}

std::vector<mx::Shape> DepformerFrame::output_shapes(const std::vector<mx::array>& inputs) {
  const int B = inputs[0].shape(0), V = inputs[head_index(0)].shape(0);
  return {{s_.Q, B}, {s_.Q, B, V}};
}

void DepformerFrame::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  alloc_outputs(outputs);
  auto& enc = cpu_encoder(stream(), inputs, outputs);
  const auto dt = inputs[0].dtype();
  const int B = inputs[0].shape(0), C_in = inputs[0].shape(1), Q = s_.Q, L = s_.layers;
  const int D = inputs[table_index(0)].shape(1), V = outputs[1].shape(2);
  const int hidden = inputs[layer(0, 0).ffn_in.w].shape(0) / 2;
  auto data = [](const mx::array& a) -> const void* { return a.data<void>(); };
  std::vector<ProjPointers> in_ptrs(Q), head_ptrs(Q);
  std::vector<const void*> table(Q);
  std::vector<int> rows(Q);
  std::vector<LayerPointers> layers(static_cast<size_t>(Q) * L);
  for (int k = 0; k < Q; ++k) {
    in_ptrs[k] = proj_pointers(inputs, in_proj(k), data);
    head_ptrs[k] = proj_pointers(inputs, head(k), data);
    table[k] = data(inputs[table_index(k)]);
    rows[k] = inputs[table_index(k)].shape(0);
    for (int l = 0; l < L; ++l) {
      layers[k * L + l] = layer_pointers(inputs, layer(k, l), data);
    }
  }
  enc.dispatch([=, h = data(inputs[0]), text = inputs[1].data<int32_t>(), forced = inputs[2].data<int32_t>(),
                pos = inputs[3].data<int32_t>(), noise = noise_ ? inputs[4].data<float>() : nullptr,
                codes = outputs[0].data<int32_t>(), logits = outputs[1].data<char>(), sp = s_]() {
    const size_t es = mx::size_of(dt);
    const int H = sp.heads;
    // The frame's caches: scratch, NaN-filled so a read of an unwritten slot shows.
    const size_t cache_bytes = static_cast<size_t>(B) * D * Q * es;
    std::vector<std::vector<char>> caches(2 * L, std::vector<char>(cache_bytes, '\xff'));
    std::vector<const void*> kc(L), vc(L);
    std::vector<void*> kc_w(L), vc_w(L);
    for (int l = 0; l < L; ++l) {
      kc[l] = kc_w[l] = caches[l].data();
      vc[l] = vc_w[l] = caches[L + l].data();
    }
    const std::vector<char> no_copy(2 * L, 0);
    std::vector<char> pre(B * D * es), x(B * D * es), y(B * D * es);
    for (int k = 0; k < Q; ++k) {
      const ProjPointers& ip = in_ptrs[k];
      cpu::matvec(dt, h, ip.w, ip.scales, ip.biases, nullptr, nullptr, pre.data(), B, C_in, D, sp.bits,
                  false, sp.eps);
      cpu::embed_add(dt, pre.data(), table[k], k == 0 ? text : codes + (k - 1) * B, x.data(), B, D, rows[k]);
      cpu::decoder_layers(dt, x.data(), y.data(), pos + k * B, &layers[k * L], L, kc.data(), vc.data(),
                          kc_w.data(), vc_w.data(), no_copy.data(), cache_bytes, B, D, H, Q, hidden, sp.bits,
                          sp.eps, sp.rope_max_period);
      char* lk = logits + static_cast<size_t>(k) * B * V * es;
      const ProjPointers& hp = head_ptrs[k];
      cpu::matvec(dt, y.data(), hp.w, hp.scales, hp.biases, nullptr, nullptr, lk, B, D, V, sp.bits, false,
                  sp.eps);
      cpu::sample_topk(dt, lk, noise ? noise + static_cast<size_t>(k) * B * V : nullptr, forced + k * B,
                       codes + k * B, B, V, sp.temp, sp.top_k, sp.greedy);
    }
  });
}

}  // namespace personaplex
