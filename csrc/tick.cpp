// The tick program's bookkeeping and the Tick primitive's graph construction
// (see tick.h). The CPU path lives in tick_cpu.cpp, the CUDA path in tick_cuda.cpp.

#include "tick.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <stdexcept>

#include "common.h"
#include "mlx/backend/cpu/encoder.h"

namespace personaplex {

#ifdef PERSONAPLEX_CUDA_BUILD
void* device_ptr(const mx::array& a);  // tick_cuda.cpp
#endif

namespace {

constexpr const char* kOp = "tick";
constexpr long kAlign = 256;

void check(bool ok, const std::string& msg) { personaplex::check(ok, kOp, msg); }

}  // namespace

// ------------------------------------------------------------------------ TickProgram

TickProgram::TickProgram(bool gpu, int device) : gpu_(gpu), device_(device) {
#ifndef PERSONAPLEX_CUDA_BUILD
  check(!gpu, "this build has no CUDA kernels: a GPU tick program cannot run");
#endif
}

void TickProgram::check_handle(int h, const char* what) const {
  check(h >= 0 && h < static_cast<int>(mems_.size()), std::string("no memory handle ") + std::to_string(h) +
                                                          " (" + what + ")");
}

int TickProgram::buffer(long bytes, mx::Dtype dtype) {
  check(!sealed_, "buffers must be made before the first tick");
  check(bytes >= 0, "a buffer needs bytes >= 0");
  mems_.push_back({.weight = -1, .offset = arena_bytes_, .bytes = bytes, .dtype = dtype});
  arena_bytes_ += (bytes + kAlign - 1) / kAlign * kAlign;
  return static_cast<int>(mems_.size()) - 1;
}

void TickProgram::init(int h, const mx::array& data) {
  check_handle(h, "init");
  const Mem& m = mems_[h];
  check(m.weight < 0 && static_cast<long>(data.nbytes()) == m.bytes,
        "init: " + std::to_string(data.nbytes()) + " bytes for a region of " + std::to_string(m.bytes));
  check(data.is_available() && data.flags().row_contiguous, "init: the data must be evaluated and contiguous");
  std::vector<char> bytes(m.bytes);
  std::memcpy(bytes.data(), data.data<char>(), m.bytes);
  if (sealed_) {
    write(h, 0, data);
  } else {
    inits_.emplace_back(h, std::move(bytes));
  }
}

int TickProgram::weight(const mx::array& a) {
  check(a.is_available() && a.flags().row_contiguous,
        "weights must be evaluated and row-contiguous (mx.eval them, mx.contiguous if needed)");
  weights_.push_back(a);
  mems_.push_back({.weight = static_cast<int>(weights_.size()) - 1, .offset = 0, .bytes = static_cast<long>(a.nbytes()),
                   .dtype = a.dtype()});
  return static_cast<int>(mems_.size()) - 1;
}

int TickProgram::view(int h, long offset, mx::Dtype dtype) {
  check_handle(h, "view");
  Mem m = mems_[h];
  check(offset >= 0 && (m.bytes < 0 || offset <= m.bytes), "view offset out of range");
  m.offset += offset;
  if (m.bytes >= 0) m.bytes -= offset;
  m.dtype = dtype;
  mems_.push_back(m);
  return static_cast<int>(mems_.size()) - 1;
}

void TickProgram::reset_region(int h, long row_bytes, int mask, uint32_t pattern, int control_col) {
  check_handle(h, "reset_region");
  check(mems_[h].weight < 0, "reset_region: only arena regions are session state");
  check(mems_[h].bytes >= row_bytes * B_ && B_ > 0, "reset_region: the region must hold B rows (set_io first)");
  regions_.push_back({.offset = mems_[h].offset, .row_bytes = row_bytes, .pattern = pattern, .control_col = control_col,
                      .mask = mask, .pad = 0});
}

void TickProgram::update_region(int h, int count, int mode, int value) {
  check_handle(h, "update_region");
  check(mems_[h].weight < 0 && (mode == 0 || mode == 1), "update_region: an arena region, mode 0 or 1");
  updates_.push_back({.offset = mems_[h].offset, .count = count, .mode = mode, .value = value, .pad = 0});
}

void TickProgram::set_io(int pcm_in, int control, int pcm_out, int tokens, int B, int F, int C, int G) {
  for (int h : {pcm_in, control, pcm_out, tokens}) check_handle(h, "set_io");
  check(C >= 1, "control needs the reset column");
  pcm_in_ = pcm_in, control_ = control, pcm_out_ = pcm_out, tokens_ = tokens;
  B_ = B, F_ = F, C_ = C, G_ = G;
}

void TickProgram::add(prog::Op op) {
  check(!sealed_, "ops must be added before the first tick");
  ops_.push_back(std::move(op));
}

void* TickProgram::at(int h) const {
  if (h < 0) return nullptr;
  const Mem& m = mems_.at(h);
  char* base;
  if (m.weight >= 0) {
    const auto& w = weights_[m.weight];
#ifdef PERSONAPLEX_CUDA_BUILD
    base = gpu_ ? static_cast<char*>(device_ptr(w)) : const_cast<char*>(w.data<char>());
#else
    base = const_cast<char*>(w.data<char>());
#endif
  } else {
    base = static_cast<char*>(gpu_ ? cuda_base_ : host_base_);
  }
  return base + m.offset;
}

void TickProgram::materialize() {
  if (sealed_) return;
  // The reset and update tables become arena regions with their contents.
  auto table = [&](const void* data, long bytes) {
    const int h = buffer(bytes, mx::uint8);
    std::vector<char> b(bytes);
    std::memcpy(b.data(), data, bytes);
    inits_.emplace_back(h, std::move(b));
    return h;
  };
  if (!regions_.empty()) {
    const int h = table(regions_.data(), static_cast<long>(regions_.size() * sizeof(FillRegion)));
    ops_.insert(ops_.begin(), prog::FillRows{.regions = h, .control = control_, .n = static_cast<int>(regions_.size()),
                                             .B = B_, .control_cols = C_});
    fill_op_ = 0;
  }
  if (!updates_.empty()) {
    const int h = table(updates_.data(), static_cast<long>(updates_.size() * sizeof(UpdateEntry)));
    int count = 0;
    for (const auto& u : updates_) count = std::max(count, u.count);
    ops_.push_back(prog::Update{.entries = h, .n = static_cast<int>(updates_.size()), .count = count});
  }
  sealed_ = true;
  if (!gpu_) {
    host_.assign(arena_bytes_ + 64, 0);
    host_base_ = host_.data() + (64 - reinterpret_cast<uintptr_t>(host_.data()) % 64) % 64;
    for (auto& [h, bytes] : inits_) std::memcpy(at(h), bytes.data(), bytes.size());
    inits_.clear();
  }
  // GPU programs: tick_cuda.cpp allocates and fills the arena at the first use.
}

const char* prog::op_name(const Op& op) {
  static const char* names[] = {"matvec", "attention", "conv1d", "conv_transpose1d", "rvq_encode", "rvq_decode",
                                "gumbel", "sample", "embed_add", "norm", "gelu", "scale_add", "frame_in",
                                "frame_out", "fill_rows", "update", "mute", "copy", "gemm", "gate"};
  static_assert(sizeof(names) / sizeof(names[0]) == std::variant_size_v<Op>);
  return names[op.index()];
}

std::vector<std::pair<std::string, double>> TickProgram::profile() {
  materialize();
  std::vector<std::pair<std::string, double>> out;
  if (gpu_) {
    const auto ms = profile_cuda();
    for (size_t i = 0; i < ops_.size(); ++i) out.emplace_back(prog::op_name(ops_[i]), ms[i]);
    return out;
  }
  for (const auto& op : ops_) {
    const auto t = std::chrono::steady_clock::now();
    run_cpu_op(op);
    out.emplace_back(prog::op_name(op),
                     std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t).count());
  }
  return out;
}

std::vector<double> TickProgram::time_range(int first, int end, int reps) {
  materialize();
  check(0 <= first && first < end && end <= ops(), "time_range: ops [" + std::to_string(first) + ", " +
                                                        std::to_string(end) + ") are not a part of the " +
                                                        std::to_string(ops()) + " ops");
  check(reps >= 1, "time_range: reps must be at least 1");
  if (gpu_) return time_range_cuda(first, end, reps);
  std::vector<double> out;
  for (int i = first; i < end; ++i) run_cpu_op(ops_[i]);  // warm, as the graph's first launch
  for (int r = 0; r < reps; ++r) {
    const auto t = std::chrono::steady_clock::now();
    for (int i = first; i < end; ++i) run_cpu_op(ops_[i]);
    out.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t).count());
  }
  return out;
}

void TickProgram::run_ops() {
  check(!gpu_, "run_ops runs a CPU program's ops");
  materialize();
  for (const auto& op : ops_) run_cpu_op(op);
}

void TickProgram::run_cpu(const float* pcm, const int32_t* control, float* pcm_out, int32_t* tokens) {
  check(!gpu_, "run_cpu on a GPU program");
  check(pcm_in_ >= 0, "set_io must name the tick's operands before the first tick");
  materialize();
  std::memcpy(at(pcm_in_), pcm, sizeof(float) * B_ * F_);
  std::memcpy(at(control_), control, sizeof(int32_t) * B_ * C_);
  for (const auto& op : ops_) run_cpu_op(op);
  std::memcpy(pcm_out, at(pcm_out_), sizeof(float) * B_ * F_);
  std::memcpy(tokens, at(tokens_), sizeof(int32_t) * B_ * G_);
}



void TickProgram::write(int h, long offset, const mx::array& src) {
  check_handle(h, "write");
  const Mem& m = mems_[h];
  check(m.weight < 0, "write: only arena regions can be written");
  check(src.is_available() && src.flags().row_contiguous, "write: the source must be evaluated and contiguous");
  check(offset >= 0 && offset + static_cast<long>(src.nbytes()) <= m.bytes,
        "write: " + std::to_string(src.nbytes()) + " bytes at " + std::to_string(offset) +
            " do not fit a region of " + std::to_string(m.bytes));
  materialize();
  if (!gpu_) {
    std::memcpy(static_cast<char*>(at(h)) + offset, src.data<char>(), src.nbytes());
    return;
  }
  write_cuda(h, offset, src);
}

mx::array TickProgram::read(int h, long offset, long bytes) {
  check_handle(h, "read");
  const Mem& m = mems_[h];
  check(m.weight < 0 && offset >= 0 && bytes >= 0 && offset + bytes <= m.bytes, "read: out of the region");
  materialize();
  std::vector<uint8_t> out(bytes);
  if (!gpu_) {
    std::memcpy(out.data(), static_cast<char*>(at(h)) + offset, bytes);
  } else {
    read_cuda(h, offset, out.data(), bytes);
  }
  return mx::array(out.begin(), {static_cast<int>(bytes)}, mx::uint8);
}

// --------------------------------------------------------------------------- primitive

void Tick::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  for (auto& o : outputs) o.set_data(mx::allocator::malloc(o.nbytes()));
  auto& enc = mx::cpu::get_command_encoder(stream());
  for (auto& a : inputs) enc.set_input_array(a);
  for (auto& a : outputs) enc.set_output_array(a);
  enc.dispatch([prog = program_, pcm = inputs[0].data<float>(), control = inputs[1].data<int32_t>(),
                out = outputs[0].data<float>(), tokens = outputs[1].data<int32_t>()]() {
    prog->run_cpu(pcm, control, out, tokens);
  });
}

std::vector<mx::array> tick(std::shared_ptr<TickProgram> program, const mx::array& pcm, const mx::array& control,
                            mx::StreamOrDevice s) {
  check(program != nullptr, "no program");
  const int B = program->batch(), F = program->frame(), C = program->control_cols(), G = program->token_cols();
  check(B > 0, "the program has no operands yet (set_io)");
  check(pcm.shape() == mx::Shape{B, F}, "pcm must be [" + std::to_string(B) + ", " + std::to_string(F) +
                                            "], got " + shape_str(pcm));
  check(control.shape() == mx::Shape{B, C}, "control must be [" + std::to_string(B) + ", " + std::to_string(C) +
                                                "], got " + shape_str(control));
  auto st = mx::to_stream(s);
  check((st.device == mx::Device::gpu) == program->gpu(),
        std::string("a ") + (program->gpu() ? "GPU" : "CPU") + " program runs on the " +
            (program->gpu() ? "GPU" : "CPU") + " stream only");
  auto c = [&](const mx::array& a, mx::Dtype dt) { return mx::contiguous(mx::astype(a, dt, st), false, st); };
  return mx::array::make_arrays({{B, F}, {B, G}}, {mx::float32, mx::int32},
                                std::make_shared<Tick>(st, std::move(program)),
                                {c(pcm, mx::float32), c(control, mx::int32)});
}

}  // namespace personaplex
