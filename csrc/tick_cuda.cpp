// The CUDA path of the tick program (see tick.h): the arena in device memory,
// the ops' kernels captured once into a CUDA graph, and per tick, on MLX's
// stream: copy pcm and control in, launch the graph, copy pcm' and the tokens out.
//
// Capture: a dry pass first resolves every CUfunction (module loads are not
// stream work) and allocates the workspaces (ring_attention's split partials,
// rvq_encode's argmins); then the same launches go to a private stream under
// thread-local capture, so that MLX's threads calling CUDA meanwhile are not
// affected. The graph reads and writes the arena and the weights only, whose
// addresses never change, so one executable serves every tick.
//
// Ordering with MLX: eval_gpu first commits what MLX has recorded so far
// (the work producing pcm and control), then queues ours on the same stream;
// MLX's later work, and its completion event for this evaluation, come after.
//
// GEMMs (large batches, the codec's large convs) go to cuBLAS (cublas_shim.h). Its
// workspace is ours, set before the capture, and every GEMM runs once eagerly in
// the dry pass, so that the capture records kernels only (no allocation, no
// heuristics).

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "common.h"
#include "cublas_shim.h"
#include "cuda_common.h"
#include "cuda_nodes.h"
#include "tick.h"

extern "C" const unsigned char matvec_fatbin[];
extern "C" const unsigned char ring_attention_fatbin[];
extern "C" const unsigned char conv1d_stream_fatbin[];
extern "C" const unsigned char conv_transpose1d_stream_fatbin[];
extern "C" const unsigned char rvq_fatbin[];
extern "C" const unsigned char sample_topk_fatbin[];
extern "C" const unsigned char depformer_frame_fatbin[];
extern "C" const unsigned char tick_fatbin[];

namespace personaplex {

namespace cu = mx::cu;

namespace {

constexpr const char* kOp = "tick (CUDA)";

void ck(CUresult r, const char* what) { cuda::check(r, kOp, what); }

struct Ctx {
  explicit Ctx(CUcontext c) { ck(cuCtxPushCurrent(c), "cuCtxPushCurrent"); }
  ~Ctx() {
    CUcontext popped;
    cuCtxPopCurrent(&popped);
  }
};


}  // namespace

namespace prog {

struct CudaState {
  CUcontext ctx = nullptr;
  CUdeviceptr arena = 0;
  CUstream capture = nullptr;
  CUgraph graph = nullptr;
  CUgraphExec exec = nullptr;
  std::vector<CUdeviceptr> workspaces;  // per op that needs one (dry pass order)
  size_t next_workspace = 0;
  bool dry = true;
  int device = 0;
  CUstream launch_stream = nullptr;  // where launches go: the capture stream, or (profile) eagerly
  // Programmatic dependent launch (kernels/portable.h, pp_grid_dependency): in the capture,
  // a kernel that directly follows one of ours may be scheduled before that one ends. Only
  // after ours, whose kernels all begin by waiting for their predecessor; never after a
  // copy or a cuBLAS GEMM (plain launches order those), and not in the profile's eager
  // launches (events between kernels).
  bool pdl = false;
  bool after_ours = false;
  // time_range: the ops outside the range are walked (their workspaces handed out in
  // order) but launch nothing; the range's first kernel is then launched plainly.
  bool muted = false;
  void* cublas = nullptr;            // handle, made in the dry pass
  CUdeviceptr cublas_ws = 0;

  // One kernel launch of an op: resolved in the dry pass, launched in the capture.
  void kernel(const unsigned char* image, const std::string& name, const PpLaunch& plan, void** params,
              unsigned smem = 0) {
    CUfunction f = cuda::function(image, name.c_str(), device);
    if (dry) {
      if (smem > 48 * 1024) {
        ck(cuFuncSetAttribute(f, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, static_cast<int>(smem)),
           "opting a kernel in to its workgroup memory");
      }
      return;
    }
    if (muted) {
      after_ours = false;
      return;
    }
    // The wait is compiled for compute_90 and later only: a kernel JIT-compiled from the
    // compute_80 PTX (any GPU but sm_90) is launched plainly.
    int ptx = 0;
    if (pdl && after_ours) ck(cuFuncGetAttribute(&ptx, CU_FUNC_ATTRIBUTE_PTX_VERSION, f), "cuFuncGetAttribute");
    CUlaunchAttribute attr{};
    attr.id = CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    attr.value.programmaticStreamSerializationAllowed = 1;
    CUlaunchConfig cfg{};
    cfg.gridDimX = plan.grid_x;
    cfg.gridDimY = plan.grid_y;
    cfg.gridDimZ = plan.grid_z;
    cfg.blockDimX = plan.threads;
    cfg.blockDimY = cfg.blockDimZ = 1;
    cfg.sharedMemBytes = smem;
    cfg.hStream = launch_stream;
    cfg.attrs = &attr;
    cfg.numAttrs = ptx >= 90 ? 1 : 0;
    ck(cuLaunchKernelEx(&cfg, f, params, nullptr), name.c_str());
    after_ours = true;
  }
  void copy(void* dst, const void* src, size_t bytes) {
    if (dry || muted || bytes == 0) return;
    after_ours = false;
    ck(cuMemcpyAsync(reinterpret_cast<CUdeviceptr>(dst), reinterpret_cast<CUdeviceptr>(src), bytes, launch_stream),
       "cuMemcpyAsync");
  }
  // Row-major y [M, N] (+)= x [M, K] w [N, K]^T, float32 accumulation. Runs eagerly in
  // the dry pass too (on the scratch it will own), so cuBLAS settles before the capture.
  void gemm(mx::Dtype dt, const void* x, const void* w, void* y, int M, int N, int K, bool accumulate) {
    if (muted) {
      after_ours = false;
      return;
    }
    const Cublas& cb = Cublas::get();
    if (!cublas) {
      cublas_check(cb.create(&cublas), "cublasCreate");
      ck(cuMemAlloc(&cublas_ws, kCublasWorkspace), "cuMemAlloc (cuBLAS workspace)");
      cublas_check(cb.set_workspace(cublas, reinterpret_cast<void*>(cublas_ws), kCublasWorkspace),
                   "cublasSetWorkspace");
    }
    cublas_check(cb.set_stream(cublas, launch_stream), "cublasSetStream");
    after_ours = false;
    const float one = 1.f, beta = accumulate ? 1.f : 0.f;
    const cudaDataType_t t = cuda_type(dt);
    // Column-major view: y^T [N, M] = w [K, N]^T x^T [K, M].
    cublas_check(cb.gemm_ex(cublas, Cublas::kOpT, Cublas::kOpN, N, M, K, &one, w, t, K, x, t, K, &beta, y, t, N,
                            Cublas::kCompute32F, Cublas::kGemmDefault),
                 "cublasGemmEx");
  }
  // Scratch that no op needs past its own launches (the tensor-core matvec's
  // partials): one region for all, as large as the largest asked for in the dry pass
  // (which launches nothing and gets null), allocated before the capture.
  size_t shared_bytes = 0;
  CUdeviceptr shared_ws = 0;
  void* shared(size_t bytes) {
    if (dry) {
      shared_bytes = std::max(shared_bytes, bytes);
      return nullptr;
    }
    return reinterpret_cast<void*>(shared_ws);
  }
  // A workspace of `bytes` for the op being walked: allocated in the dry pass,
  // handed out again, in the same order, in the capture.
  void* workspace(size_t bytes) {
    if (dry) {
      CUdeviceptr p = 0;
      ck(cuMemAlloc(&p, std::max<size_t>(bytes, 256)), "cuMemAlloc (workspace)");
      workspaces.push_back(p);
      return reinterpret_cast<void*>(p);
    }
    return reinterpret_cast<void*>(workspaces.at(next_workspace++));
  }
};

}  // namespace prog

namespace {

// The launches of one op, on `s` (see CudaState); `at` resolves handles.
template <class At>
void launch_op(prog::CudaState& s, const TickProgram& p, const prog::Op& op, At at) {
  const int device = s.device;
  auto dts = [&](int h) { return std::string(cuda::kernel_dtype(kOp, p.mem(h).dtype)); };
  auto flat = [&](const char* name, long items, void** params, int h = -1) {
    s.kernel(tick_fatbin, h >= 0 ? std::string(name) + "_" + dts(h) : std::string(name), tick_flat_launch(items),
             params);
  };
  std::visit(
      [&](const auto& o) {
        using O = std::decay_t<decltype(o)>;
        if constexpr (std::is_same_v<O, prog::Matvec>) {
          MatvecArgs a = o.args;
          if (cuda::matvec_takes_tc(a, p.mem(o.x).dtype, o.bits)) {
            const size_t es = mx::size_of(p.mem(o.x).dtype);
            matvec_tc_chunks(a.M, [&](int m0, int rows) {  // one workspace: the chunks run in order
              const MatvecTcArgs t = matvec_tc_args(rows, a.K, a.n_out, a.norm, a.gate, a.residual, a.eps,
                                                    cuda::matvec_tc_slots(dts(o.x), o.bits, rows, device));
              float* ws = static_cast<float*>(s.shared(sizeof(float) * matvec_tc_workspace_floats(t)));
              cuda::matvec_tc_launches(dts(o.x), o.bits, t, cuda::offset(at(o.x), size_t(m0) * a.K * es), at(o.w),
                                       at(o.scales), at(o.biases), at(o.alpha),
                                       cuda::offset(at(o.residual), size_t(m0) * a.n_out * es),
                                       cuda::offset(at(o.out), size_t(m0) * a.n_out * es), ws,
                                       [&](const std::string& name, const PpLaunch& plan, void** params) {
                                         s.kernel(matvec_fatbin, name, plan, params);
                                       });
            });
            return;
          }
          const std::string name = "matvec_" + dts(o.x) + "_" + matvec_weights_name(o.bits) +
                                   "_m" + std::to_string(matvec_x_rows(a.M));
          void *x = at(o.x), *w = at(o.w), *sc = at(o.scales), *bi = at(o.biases), *al = at(o.alpha),
               *res = at(o.residual), *out = at(o.out);
          a.early = matvec_early() ? 1 : 0;
          void* params[] = {&x, &w, &sc, &bi, &al, &res, &out, &a};
          s.kernel(matvec_fatbin, name, matvec_launch(a), params);
        } else if constexpr (std::is_same_v<O, prog::Attention>) {
          RingArgs a = o.args;
          a.S = ring_splits(a, cuda::sm_count(device));
          void* ws = s.workspace(sizeof(float) * ring_workspace_floats(a));
          void *q = at(o.q), *k = at(o.k), *v = at(o.v), *kc = at(o.kc), *vc = at(o.vc), *pos = at(o.pos),
               *out = at(o.out);
          const std::string dt = dts(o.q);
          const std::string q_per = ring_queries_per_block(a.T) == 4 ? "_q4" : "_q1";
          if (o.ks >= 0) {  // an 8-bit ring: codes and scales, updated in place
            void *ks = at(o.ks), *vs = at(o.vs);
            void* attend[] = {&q, &k, &v, &kc, &vc, &ks, &vs, &pos, &ws, &a};
            s.kernel(ring_attention_fatbin, "ring_attend_" + dt + "_i8_d" + std::to_string(a.D) + q_per,
                     ring_attend_launch(a), attend);
            void* finish[] = {&ws, &k, &v, &pos, &kc, &vc, &ks, &vs, &out, &kc, &vc, &ks, &vs, &a};
            s.kernel(ring_attention_fatbin, "ring_finish_" + dt + "_i8", ring_finish_launch(a), finish);
          } else {
            void* attend[] = {&q, &k, &v, &kc, &vc, &pos, &ws, &a};
            s.kernel(ring_attention_fatbin, "ring_attend_" + dt + "_d" + std::to_string(a.D) + q_per,
                     ring_attend_launch(a), attend);
            void* finish[] = {&ws, &k, &v, &pos, &kc, &vc, &out, &kc, &vc, &a};
            s.kernel(ring_attention_fatbin, "ring_finish_" + dt, ring_finish_launch(a), finish);
          }
        } else if constexpr (std::is_same_v<O, prog::Conv1d>) {
          const Conv1dArgs& c = o.conv;
          const std::string dt = dts(o.x);
          const size_t es = mx::size_of(p.mem(o.x).dtype);
          void* buf = at(o.x);
          if (c.context > 0 || o.gather.elu) {
            GatherArgs g = o.gather;
            void *x = at(o.x), *prev = at(o.state), *first = at(o.first), *b = at(o.buf), *next = at(o.next);
            void* params[] = {&x, &prev, &first, &b, &next, &g};
            s.kernel(conv1d_stream_fatbin, "conv1d_gather_" + dt, gather_launch(kOp, g), params);
            buf = b;
          }
          if (o.gemm) {
            const int M = c.B * (c.T / c.stride);
            void* rows = buf;
            if (o.cols >= 0) {
              Im2colArgs ia{.B = c.B, .T_out = c.T / c.stride, .C_in = c.C_in, .K = c.K, .stride = c.stride,
                            .dilation = c.dilation, .rows = c.context + c.T};
              void* cols = at(o.cols);
              void* params[] = {&buf, &cols, &ia};
              flat("tick_im2col", static_cast<long>(M) * c.K * c.C_in, params, o.x);
              rows = cols;
            }
            void* y = at(o.y);
            if (c.has_bias) {
              RowsArgs ra{.rows = M, .cols = c.C_out};
              void* bias = at(o.bias);
              void* params[] = {&bias, &y, &ra};
              flat("tick_bias_rows", conv1d_outputs(c), params, o.x);
            }
            s.gemm(p.mem(o.x).dtype, rows, at(o.w), y, M, c.C_out, c.K * c.C_in, c.has_bias);
          } else {
            Conv1dArgs a = c;
            void *w = at(o.w), *bias = at(o.bias), *y = at(o.y);
            void* params[] = {&buf, &w, &bias, &y, &a};
            s.kernel(conv1d_stream_fatbin, "conv1d_" + dt, conv1d_launch(a), params);
          }
          if (c.context > 0) s.copy(at(o.state), at(o.next), es * c.B * c.context * c.C_in);
        } else if constexpr (std::is_same_v<O, prog::ConvTranspose1d>) {
          const ConvTrArgs& c = o.conv;
          const std::string dt = dts(o.x);
          const size_t es = mx::size_of(p.mem(o.x).dtype);
          void* xin = at(o.x);
          if (o.elu) {
            GatherArgs g{.B = c.B, .T = c.T, .C = c.C_in, .context = 0, .elu = 1, .has_first = 0};
            void *x = at(o.x), *xe = at(o.xe);
            void* params[] = {&x, &xe, &g};
            s.kernel(conv_transpose1d_stream_fatbin, "convtr_elu_" + dt, gather_launch(kOp, g), params);
            xin = xe;
          }
          void *partial = at(o.partial), *bias = at(o.bias), *y = at(o.y), *next = at(o.next);
          if (o.w_t >= 0) {
            void* z = at(o.z);
            s.gemm(p.mem(o.x).dtype, xin, at(o.w_t), z, c.B * c.T, c.K * c.C_out, c.C_in, false);
            Col2imArgs ca{.B = c.B, .T = c.T, .C_out = c.C_out, .K = c.K, .stride = c.stride, .has_bias = c.has_bias};
            void* params[] = {&z, &partial, &bias, &y, &next, &ca};
            flat("tick_col2im", col2im_outputs(ca), params, o.x);
          } else {
            ConvTrArgs a = c;
            void* w = at(o.w);
            void* params[] = {&xin, &partial, &w, &bias, &y, &next, &a};
            s.kernel(conv_transpose1d_stream_fatbin, "convtr_" + dt, convtr_launch(a), params);
          }
          s.copy(at(o.partial), at(o.next), es * c.B * (c.K - c.stride) * c.C_out);
        } else if constexpr (std::is_same_v<O, prog::RvqEncode>) {
          RvqArgs a = o.args;
          int S = rvq_encode_splits(a.bins);
          const int V = rvq_encode_vectors(a.n, S, a.n_q, a.D, cuda::sm_count(device));
          const unsigned smem = 4u * rvq_encode_smem_floats(V, a.n_q, a.D);
          void* part = s.workspace(sizeof(float) * 2 * static_cast<size_t>(a.n) * a.n_q * S);
          void *x = at(o.x), *books = at(o.books), *codes = at(o.codes);
          for (int q = 0; q <= a.n_q; ++q) {
            void* params[] = {&x, &books, &codes, &part, &a, &q, &S};
            s.kernel(rvq_fatbin, "rvq_encode_v" + std::to_string(V), rvq_encode_launch(a, V, S, q), params, smem);
          }
        } else if constexpr (std::is_same_v<O, prog::RvqDecode>) {
          RvqArgs a = o.args;
          void *codes = at(o.codes), *books = at(o.books), *out = at(o.out);
          void* params[] = {&codes, &books, &out, &a};
          s.kernel(rvq_fatbin, "rvq_decode", rvq_decode_launch(a), params);
        } else if constexpr (std::is_same_v<O, prog::Gumbel>) {
          GumbelArgs a = o.args;
          void *seeds = at(o.seeds), *offsets = at(o.offsets), *out = at(o.out);
          void* params[] = {&seeds, &offsets, &out, &a};
          flat("tick_gumbel", static_cast<long>(a.streams) * a.B * a.V, params);
        } else if constexpr (std::is_same_v<O, prog::Sample>) {
          SampleArgs a = o.args;
          void *logits = at(o.logits), *noise = at(o.noise), *forced = at(o.forced), *out = at(o.out);
          void* params[] = {&logits, &noise, &forced, &out, &a};
          s.kernel(sample_topk_fatbin, "sample_topk_" + dts(o.logits), sample_topk_launch(o.rows), params);
        } else if constexpr (std::is_same_v<O, prog::EmbedAdd>) {
          EmbedArgs a = o.args;
          void *pre = at(o.pre), *table = at(o.table), *tokens = at(o.tokens), *out = at(o.out);
          void* params[] = {&pre, &table, &tokens, &out, &a};
          s.kernel(depformer_frame_fatbin, "embed_add_" + dts(o.pre), embed_add_launch(a), params);
        } else if constexpr (std::is_same_v<O, prog::Norm>) {
          NormArgs a = o.args;
          void *x = at(o.x), *w = at(o.w), *b = at(o.b), *out = at(o.out);
          void* params[] = {&x, &w, &b, &out, &a};
          s.kernel(tick_fatbin, "tick_norm_" + dts(o.x), tick_norm_launch(a), params);
        } else if constexpr (std::is_same_v<O, prog::Gelu>) {
          RowsArgs a = o.args;
          void *x = at(o.x), *out = at(o.out);
          void* params[] = {&x, &out, &a};
          flat("tick_gelu", static_cast<long>(a.rows) * a.cols, params, o.x);
        } else if constexpr (std::is_same_v<O, prog::ScaleAdd>) {
          RowsArgs a = o.args;
          void *x = at(o.x), *sc = at(o.scale), *y = at(o.y), *out = at(o.out);
          void* params[] = {&x, &sc, &y, &out, &a};
          flat("tick_scale_add", static_cast<long>(a.rows) * a.cols, params, o.x);
        } else if constexpr (std::is_same_v<O, prog::Gate>) {
          RowsArgs a = o.args;
          void *x = at(o.x), *out = at(o.out);
          void* params[] = {&x, &out, &a};
          flat("tick_gate", static_cast<long>(a.rows) * a.cols, params, o.x);
        } else if constexpr (std::is_same_v<O, prog::FrameIn>) {
          FrameArgs a = o.args;
          int n_ac = o.n_ac;
          void *tokens = at(o.tokens), *forced = at(o.forced), *offsets = at(o.offsets), *delays = at(o.delays),
               *sem = at(o.sem), *ac = at(o.ac), *cur = at(o.cur), *now = at(o.now);
          void* params[] = {&tokens, &forced, &offsets, &delays, &sem, &ac, &n_ac, &cur, &now, &a};
          flat("tick_frame_in", a.B, params);
        } else if constexpr (std::is_same_v<O, prog::FrameOut>) {
          FrameArgs a = o.args;
          void *tokens = at(o.tokens), *offsets = at(o.offsets), *delays = at(o.delays), *gen = at(o.gen),
               *out = at(o.out), *sem = at(o.sem), *ac = at(o.ac), *valid = at(o.valid);
          void* params[] = {&tokens, &offsets, &delays, &gen, &out, &sem, &ac, &valid, &a};
          flat("tick_frame_out", a.B, params);
        } else if constexpr (std::is_same_v<O, prog::FillRows>) {
          void* arena = reinterpret_cast<void*>(s.arena);
          void *regions = at(o.regions), *control = at(o.control);
          int cols = o.control_cols;
          void* params[] = {&arena, &regions, &control, &cols};
          s.kernel(tick_fatbin, "tick_fill_rows", tick_fill_launch(o.n, o.B), params);
        } else if constexpr (std::is_same_v<O, prog::Update>) {
          void* arena = reinterpret_cast<void*>(s.arena);
          void* entries = at(o.entries);
          int n = o.n;
          void* params[] = {&arena, &entries, &n};
          flat("tick_update", std::max(o.count, 1), params);
        } else if constexpr (std::is_same_v<O, prog::Mute>) {
          RowsArgs a = o.args;
          void *x = at(o.x), *valid = at(o.valid), *out = at(o.out);
          void* params[] = {&x, &valid, &out, &a};
          flat("tick_mute", static_cast<long>(a.rows) * a.cols, params);
        } else if constexpr (std::is_same_v<O, prog::Copy>) {
          s.copy(at(o.dst), at(o.src), static_cast<size_t>(o.bytes));
        } else if constexpr (std::is_same_v<O, prog::Gemm>) {
          s.gemm(p.mem(o.x).dtype, at(o.x), at(o.w), at(o.y), o.M, o.N, o.K, o.accumulate != 0);
        }
      },
      op);
}

}  // namespace

TickProgram::~TickProgram() {
  if (!cuda_) return;
  auto& s = *cuda_;
  if (cuCtxPushCurrent(s.ctx) != CUDA_SUCCESS) return;
  cuCtxSynchronize();  // no tick may still be using the arena
  if (s.exec) cuGraphExecDestroy(s.exec);
  if (s.graph) cuGraphDestroy(s.graph);
  if (s.capture) cuStreamDestroy(s.capture);
  for (auto w : s.workspaces) cuMemFree(w);
  if (s.shared_ws) cuMemFree(s.shared_ws);
  if (s.cublas_ws) cuMemFree(s.cublas_ws);
  if (s.arena) cuMemFree(s.arena);
  CUcontext popped;
  cuCtxPopCurrent(&popped);
  CUdevice dev;
  if (cuDeviceGet(&dev, s.device) == CUDA_SUCCESS) cuDevicePrimaryCtxRelease(dev);
}

// The arena on the device, zeroed and given its initial bytes (once).
void* device_ptr(const mx::array& a) { return cuda::ptr(a); }

static void make_arena(TickProgram& p, std::shared_ptr<prog::CudaState>& state, void*& base, long bytes,
                       std::vector<std::pair<int, std::vector<char>>>& inits) {
  if (state) return;
  auto s = std::make_shared<prog::CudaState>();
  s->device = p.device();
  CUdevice dev;
  ck(cuInit(0), "cuInit");
  ck(cuDeviceGet(&dev, s->device), "cuDeviceGet");
  ck(cuDevicePrimaryCtxRetain(&s->ctx, dev), "cuDevicePrimaryCtxRetain");
  Ctx push(s->ctx);
  ck(cuMemAlloc(&s->arena, std::max<long>(bytes, 256)), "cuMemAlloc (arena)");
  ck(cuMemsetD8(s->arena, 0, std::max<long>(bytes, 256)), "cuMemsetD8 (arena)");
  base = reinterpret_cast<void*>(s->arena);
  state = std::move(s);
  for (auto& [h, data] : inits) {
    ck(cuMemcpyHtoD(reinterpret_cast<CUdeviceptr>(p.at(h)), data.data(), data.size()), "cuMemcpyHtoD (init)");
  }
  inits.clear();
}

void TickProgram::write_cuda(int h, long offset, const mx::array& src) {
  make_arena(*this, cuda_, cuda_base_, arena_bytes_, inits_);
  Ctx push(cuda_->ctx);
  ck(cuCtxSynchronize(), "cuCtxSynchronize (write)");
  ck(cuMemcpy(reinterpret_cast<CUdeviceptr>(static_cast<char*>(at(h)) + offset),
              reinterpret_cast<CUdeviceptr>(mx::gpu_ptr<void>(src)), src.nbytes()),
     "cuMemcpy (write)");
}

void TickProgram::read_cuda(int h, long offset, void* dst, long bytes) {
  make_arena(*this, cuda_, cuda_base_, arena_bytes_, inits_);
  Ctx push(cuda_->ctx);
  ck(cuCtxSynchronize(), "cuCtxSynchronize (read)");
  ck(cuMemcpyDtoH(dst, reinterpret_cast<CUdeviceptr>(static_cast<char*>(at(h)) + offset), bytes),
     "cuMemcpyDtoH (read)");
}

// Whether the capture chains our kernels by programmatic dependent launch: unless
// PERSONAPLEX_PDL=0 (for timing the difference). Which launches take it, CudaState::kernel
// decides (after one of ours, for kernels built with the wait).
static bool pdl_enabled() {
  const char* e = std::getenv("PERSONAPLEX_PDL");
  return !(e && std::string(e) == "0");
}

// One capture of the ops on s.capture into a graph the caller owns: those in [first, end)
// launched as the tick launches them (programmatic dependent launch included), the others
// walked for their workspaces and launching nothing (time_range). After the dry pass.
static CUgraph capture(TickProgram& p, prog::CudaState& s, const std::vector<prog::Op>& ops, size_t first,
                       size_t end) {
  auto resolve = [&p](int h) { return p.at(h); };
  s.next_workspace = 0;
  ck(cuStreamBeginCapture(s.capture, CU_STREAM_CAPTURE_MODE_THREAD_LOCAL), "cuStreamBeginCapture");
  s.pdl = pdl_enabled();
  s.after_ours = false;
  CUgraph g = nullptr;
  try {
    for (size_t i = 0; i < ops.size(); ++i) {
      s.muted = i < first || i >= end;
      launch_op(s, p, ops[i], resolve);
    }
  } catch (...) {
    s.muted = s.pdl = false;
    cuStreamEndCapture(s.capture, &g);
    if (g) cuGraphDestroy(g);
    throw;
  }
  s.muted = s.pdl = false;
  ck(cuStreamEndCapture(s.capture, &g), "cuStreamEndCapture");
  return g;
}

// The dry pass and the tick's capture, once.
static void prepare(TickProgram& p, prog::CudaState& s, const std::vector<prog::Op>& ops) {
  if (s.exec) return;
  auto resolve = [&p](int h) { return p.at(h); };
  ck(cuStreamCreate(&s.capture, CU_STREAM_NON_BLOCKING), "cuStreamCreate");
  s.launch_stream = s.capture;
  s.dry = true;
  for (const auto& op : ops) launch_op(s, p, op, resolve);
  ck(cuStreamSynchronize(s.capture), "cuStreamSynchronize (dry pass)");
  s.dry = false;
  if (s.shared_bytes && !s.shared_ws) ck(cuMemAlloc(&s.shared_ws, s.shared_bytes), "cuMemAlloc (shared scratch)");
  s.graph = capture(p, s, ops, 0, ops.size());
  ck(cuGraphInstantiate(&s.exec, s.graph, 0), "cuGraphInstantiate");
}

void TickProgram::run_cuda(void* stream, const void* pcm, const void* control, void* pcm_out, void* tokens) {
  personaplex::check(gpu_, "tick", "run_cuda on a CPU program");
  personaplex::check(pcm_in_ >= 0, "tick", "set_io must name the tick's operands before the first tick");
  materialize();
  make_arena(*this, cuda_, cuda_base_, arena_bytes_, inits_);
  auto& s = *cuda_;
  Ctx push(s.ctx);
  prepare(*this, s, ops_);
  auto st = static_cast<CUstream>(stream);
  auto dev = [&](int h) { return reinterpret_cast<CUdeviceptr>(at(h)); };
  ck(cuMemcpyAsync(dev(pcm_in_), reinterpret_cast<CUdeviceptr>(pcm), sizeof(float) * B_ * F_, st), "copy pcm in");
  ck(cuMemcpyAsync(dev(control_), reinterpret_cast<CUdeviceptr>(control), sizeof(int32_t) * B_ * C_, st),
     "copy control in");
  ck(cuGraphLaunch(s.exec, st), "cuGraphLaunch");
  ck(cuMemcpyAsync(reinterpret_cast<CUdeviceptr>(pcm_out), dev(pcm_out_), sizeof(float) * B_ * F_, st),
     "copy pcm out");
  ck(cuMemcpyAsync(reinterpret_cast<CUdeviceptr>(tokens), dev(tokens_), sizeof(int32_t) * B_ * G_, st),
     "copy tokens out");
}

std::vector<double> TickProgram::profile_cuda() {
  make_arena(*this, cuda_, cuda_base_, arena_bytes_, inits_);
  auto& s = *cuda_;
  Ctx push(s.ctx);
  ck(cuCtxSynchronize(), "cuCtxSynchronize (profile)");
  prepare(*this, s, ops_);
  auto resolve = [this](int h) { return at(h); };
  std::vector<CUevent> ev(ops_.size() + 1);
  for (auto& e : ev) ck(cuEventCreate(&e, CU_EVENT_DEFAULT), "cuEventCreate");
  s.next_workspace = 0;
  ck(cuEventRecord(ev[0], s.capture), "cuEventRecord");
  for (size_t i = 0; i < ops_.size(); ++i) {
    launch_op(s, *this, ops_[i], resolve);
    ck(cuEventRecord(ev[i + 1], s.capture), "cuEventRecord");
  }
  ck(cuStreamSynchronize(s.capture), "cuStreamSynchronize (profile)");
  std::vector<double> ms(ops_.size());
  for (size_t i = 0; i < ops_.size(); ++i) {
    float t = 0.f;
    ck(cuEventElapsedTime(&t, ev[i], ev[i + 1]), "cuEventElapsedTime");
    ms[i] = t;
  }
  for (auto& e : ev) cuEventDestroy(e);
  return ms;
}

std::vector<double> TickProgram::time_range_cuda(int first, int end, int reps) {
  make_arena(*this, cuda_, cuda_base_, arena_bytes_, inits_);
  auto& s = *cuda_;
  Ctx push(s.ctx);
  ck(cuCtxSynchronize(), "cuCtxSynchronize (time_range)");
  prepare(*this, s, ops_);
  CUgraph graph = nullptr;
  CUgraphExec exec = nullptr;
  std::vector<CUevent> ev(reps + 1);
  for (auto& e : ev) ck(cuEventCreate(&e, CU_EVENT_DEFAULT), "cuEventCreate");
  std::vector<double> ms(reps);
  try {
    graph = capture(*this, s, ops_, first, end);
    ck(cuGraphInstantiate(&exec, graph, 0), "cuGraphInstantiate");
    ck(cuGraphLaunch(exec, s.capture), "cuGraphLaunch");  // warm
    for (int r = 0; r < reps; ++r) {
      ck(cuEventRecord(ev[r], s.capture), "cuEventRecord");
      ck(cuGraphLaunch(exec, s.capture), "cuGraphLaunch");
    }
    ck(cuEventRecord(ev[reps], s.capture), "cuEventRecord");
    ck(cuStreamSynchronize(s.capture), "cuStreamSynchronize (time_range)");
    for (int r = 0; r < reps; ++r) {
      float t = 0.f;
      ck(cuEventElapsedTime(&t, ev[r], ev[r + 1]), "cuEventElapsedTime");
      ms[r] = t;
    }
  } catch (...) {
    for (auto& e : ev) cuEventDestroy(e);
    if (exec) cuGraphExecDestroy(exec);
    if (graph) cuGraphDestroy(graph);
    throw;
  }
  for (auto& e : ev) cuEventDestroy(e);
  cuGraphExecDestroy(exec);
  cuGraphDestroy(graph);
  return ms;
}

void Tick::eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& enc = cu::get_command_encoder(stream());
  for (auto& o : outputs) cuda::alloc_output(o, enc);
  // Everything recorded before this tick (the work producing pcm and control)
  // goes to the stream first; the graph follows it there.
  enc.commit();
  program_->run_cuda(static_cast<cudaStream_t>(enc.stream()), cuda::ptr(inputs[0]), cuda::ptr(inputs[1]),
                     cuda::ptr(outputs[0]), cuda::ptr(outputs[1]));
}

}  // namespace personaplex
