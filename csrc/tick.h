// The tick program: one 80 ms frame of every session (Mimi encode, the LM step
// with sampling, Mimi decode) as a fixed list of our kernels over memory the
// program owns, run by one primitive.
//
// Why: built op by op, a frame is ~1,700 MLX graph nodes, and building,
// recording and launching them costs ~14 ms of host time per tick on an H200,
// more than the bytes the frame must move (docs/PERF.md). Here the frame is
// described once (python/personaplex_fast/tick/ walks the models and adds the
// ops), the sessions' streaming state (KV rings, token rings, codec conv and
// transformer states, seeds) lives in the program's arena and is updated in
// place, and MLX sees one node per tick:
//   Tick(pcm [B, F] float32, control [B, C] int32) -> (pcm' [B, F] float32,
//                                                      tokens [B, 1 + dep_q] int32)
// On the CPU the ops run one after another in one task of MLX's CPU encoder, on
// the same C++ kernels as the primitives'. On CUDA the first tick captures the
// ops' launches into a CUDA graph and every tick replays it: a copy in, one
// graph launch, copies out, on MLX's stream (see tick_cuda.cpp).
//
// Memory is named by handles: arena regions (state and scratch, zeroed or given
// initial bytes), weights (evaluated, row-contiguous MLX arrays the program
// holds), and views (a handle plus a byte offset). Control column 0 resets a
// session: a bit set of state classes whose rows (every region registered with
// that bit) are refilled before the tick; the builder (python/personaplex_fast/tick/builder.py) names them.

#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <variant>
#include <vector>

#include "codec.cuh"                    // GatherArgs
#include "conv1d_stream.cuh"            // Conv1dArgs
#include "conv_transpose1d_stream.cuh"  // ConvTrArgs
#include "depformer_frame.cuh"          // EmbedArgs
#include "matvec.cuh"                   // MatvecArgs
#include "mlx/array.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"
#include "ring_attention.cuh"  // RingArgs
#include "rvq.cuh"             // RvqArgs
#include "sample_topk.cuh"     // SampleArgs
#include "tick.cuh"            // the program's own kernels' args

namespace personaplex {

namespace mx = mlx::core;

namespace prog {

// Every op's memory operands are handles; -1: none.
struct Matvec {
  int x, w, scales, biases, alpha, residual, out;
  int bits;
  MatvecArgs args;
};
struct Attention {
  int q, k, v, kc, vc, pos, out;
  int ks, vs;  // >= 0: an 8-bit ring, kc / vc int8 codes and these float32 row scales [B, H, W]
  float rope_max_period;  // <= 0: no RoPE (the args carry the step)
  RingArgs args;
};
// y [M, N] = x [M, K] W[N, K]^T (+ y when accumulate): cuBLAS on CUDA (float32
// accumulation), where batches make the weights' reuse worth a GEMM; a plain loop
// on the CPU (programs built for the CPU use matvec, which rounds as the reference).
struct Gemm {
  int x, w, y;
  int M, N, K;
  int accumulate;
};
struct Conv1d {
  int x, state, first, w, bias, y;
  int buf, next;  // scratch: the gathered inputs [B, context + T, C_in], the next state
  int gemm;       // on CUDA as [im2col +] a cuBLAS GEMM (one group)
  int cols;       // its scratch [B * T_out, K * C_in]; -1 at K = 1, stride 1 (rows as they are)
  GatherArgs gather;
  Conv1dArgs conv;
};
struct ConvTranspose1d {
  int x, partial, w, bias, y;
  int xe, next;  // scratch: the ELU of x, the next partial
  int w_t, z;    // >= 0: on CUDA as GEMM + col2im (w_t [K, C_out, C_in], z scratch [B, T, K, C_out])
  int elu;
  ConvTrArgs conv;
};
struct RvqEncode {
  int x, books, codes, part;  // part: scratch of the CUDA path
  RvqArgs args;
};
struct RvqDecode {
  int codes, books, out;
  RvqArgs args;
};
struct Gumbel {
  int seeds, offsets, out;
  GumbelArgs args;
};
struct Sample {
  int logits, noise, forced, out;
  int rows;
  SampleArgs args;
};
struct EmbedAdd {
  int pre, table, tokens, out;
  EmbedArgs args;
};
struct Norm {
  int x, w, b, out;
  NormArgs args;
};
struct Gelu {
  int x, out;
  RowsArgs args;
};
struct Gate {
  int x, out;  // x [rows, 2 * cols] -> out [rows, cols]
  RowsArgs args;
};
struct ScaleAdd {
  int x, scale, y, out;
  RowsArgs args;
};
struct FrameIn {
  int tokens, forced, offsets, delays, sem, ac, cur, now;
  int n_ac;
  FrameArgs args;
};
struct FrameOut {
  int tokens, offsets, delays, gen, out, sem, ac, valid;
  FrameArgs args;
};
struct FillRows {
  int regions, control;  // regions: FillRegion [n] in the arena
  int n, B, control_cols;
};
struct Update {
  int entries;  // UpdateEntry [n] in the arena
  int n, count;  // count: the largest entry's elements
};
struct Mute {
  int x, valid, out;
  RowsArgs args;
};
struct Copy {
  int dst, src;
  long bytes;
};

using Op = std::variant<Matvec, Attention, Conv1d, ConvTranspose1d, RvqEncode, RvqDecode, Gumbel, Sample,
                        EmbedAdd, Norm, Gelu, ScaleAdd, FrameIn, FrameOut, FillRows, Update, Mute, Copy, Gemm,
                        Gate>;

// The op's kind, as the profile names it.
const char* op_name(const Op& op);

struct CudaState;  // tick_cuda.cpp

}  // namespace prog

class TickProgram {
 public:
  // gpu: the arena lives in device `device`'s memory and the ticks run there.
  explicit TickProgram(bool gpu, int device = 0);
  ~TickProgram();
  TickProgram(const TickProgram&) = delete;
  TickProgram& operator=(const TickProgram&) = delete;

  // A zeroed arena region of `bytes` (dtype: what it holds, for the ops' checks).
  int buffer(long bytes, mx::Dtype dtype);
  // Gives region h its initial bytes (an evaluated array of exactly its size).
  void init(int h, const mx::array& data);
  // A weight: an evaluated, row-contiguous array, held until the program dies.
  int weight(const mx::array& a);
  int view(int h, long offset_bytes, mx::Dtype dtype);
  // Session rows of region h that a reset refills with `pattern` (4 bytes,
  // repeated), or, control_col >= 0, with the session's control value there,
  // in ticks whose control column 0 has a bit of `mask` set for the session.
  void reset_region(int h, long row_bytes, int mask, uint32_t pattern, int control_col);
  // At the end of every tick: int32 region h (count elements) += value, or
  // (mode 1) uint8 region h = value.
  void update_region(int h, int count, int mode, int value);
  void add(prog::Op op);
  // The tick's operands: pcm_in [B, F] float32, control [B, C] int32 (filled
  // before the ops), pcm_out [B, F] float32, tokens [B, G] int32 (read after).
  void set_io(int pcm_in, int control, int pcm_out, int tokens, int B, int F, int C, int G);

  // Between ticks (nothing in flight): copy an evaluated array into region h at
  // `offset`, or read `bytes` of it back as uint8.
  void write(int h, long offset, const mx::array& src);
  mx::array read(int h, long offset, long bytes);

  int batch() const { return B_; }
  int frame() const { return F_; }
  int control_cols() const { return C_; }
  int token_cols() const { return G_; }
  bool gpu() const { return gpu_; }
  int device() const { return device_; }
  long arena_bytes() const { return arena_bytes_; }
  int ops() const { return static_cast<int>(ops_.size()); }

  // The ops once, on a CPU program's arena, without the tick's copies (tests).
  void run_ops();
  // Each op's time in ms, running them once outside the graph (benchmarks; it
  // advances the sessions like a tick, with whatever the operands hold).
  std::vector<std::pair<std::string, double>> profile();
  // Ops [first, end) alone, once to warm and then `reps` times one after another: each
  // of those times' ms. On CUDA they are captured as the tick captures them (programmatic
  // dependent launch included) into a graph of their own, its launches between events: a
  // part of the tick (e.g. the temporal transformer) as the graph runs it. It advances
  // the sessions as those ops do, on what the operands hold (benchmarks).
  std::vector<double> time_range(int first, int end, int reps);
  // Where op i as add() was called sits among the ops the ticks run (the program puts
  // its reset op first when it has one): i + op_offset(). Seals the program.
  int op_offset() {
    materialize();
    return fill_op_ >= 0 ? 1 : 0;
  }
  // One tick on host memory (the CPU task of Tick).
  void run_cpu(const float* pcm, const int32_t* control, float* pcm_out, int32_t* tokens);
  // One tick on `stream` (CUstream); device pointers of the four operands.
  void run_cuda(void* stream, const void* pcm, const void* control, void* pcm_out, void* tokens);

  struct Mem {
    int weight;   // -1: arena
    long offset;  // bytes into the arena or the weight
    long bytes;   // -1: to the end
    mx::Dtype dtype;
  };
  // Address of handle h in host memory (CPU programs) or device memory (GPU).
  void* at(int h) const;
  const Mem& mem(int h) const { return mems_.at(h); }

 private:
  void materialize();
  void write_cuda(int h, long offset, const mx::array& src);
  std::vector<double> profile_cuda();
  std::vector<double> time_range_cuda(int first, int end, int reps);
  void read_cuda(int h, long offset, void* dst, long bytes);
  void check_handle(int h, const char* what) const;
  void run_cpu_op(const prog::Op& op);

  bool gpu_;
  int device_;
  long arena_bytes_ = 0;
  std::vector<Mem> mems_;
  std::vector<mx::array> weights_;
  std::vector<std::pair<int, std::vector<char>>> inits_;  // applied when the arena is made
  std::vector<FillRegion> regions_;
  std::vector<UpdateEntry> updates_;
  std::vector<prog::Op> ops_;
  int fill_op_ = -1;
  int pcm_in_ = -1, control_ = -1, pcm_out_ = -1, tokens_ = -1;
  int B_ = 0, F_ = 0, C_ = 0, G_ = 0;
  bool sealed_ = false;  // the arena exists: no more buffers
  std::vector<char> host_;  // the CPU arena (64-byte aligned inside)
  char* host_base_ = nullptr;
  std::shared_ptr<prog::CudaState> cuda_;  // shared_ptr: CudaState is complete only in tick_cuda.cpp
  void* cuda_base_ = nullptr;

  friend struct prog::CudaState;
};

class Tick : public mx::Primitive {
 public:
  Tick(mx::Stream stream, std::shared_ptr<TickProgram> program)
      : mx::Primitive(stream), program_(std::move(program)) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;

  const char* name() const override { return "Tick"; }
  // Never merged with another tick: each one advances the program's state.
  bool is_equivalent(const mx::Primitive&) const override { return false; }

 private:
  std::shared_ptr<TickProgram> program_;
};

// pcm [B, F] float32, control [B, C] int32 -> {pcm' [B, F] float32, tokens [B, G] int32}.
std::vector<mx::array> tick(std::shared_ptr<TickProgram> program, const mx::array& pcm,
                            const mx::array& control, mx::StreamOrDevice s = {});

}  // namespace personaplex
