// See cuda_common.h.

#include "cuda_common.h"

#include <atomic>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <unordered_set>
#include <utility>

#include "mlx/backend/cuda/utils.h"

namespace personaplex::cuda {

namespace {

struct Device {
  CUcontext ctx = nullptr;
  CUstream free_stream = nullptr;  // where deleters free buffers
  int n_sm = 0;
  std::map<const unsigned char*, CUmodule> modules;
  std::map<std::pair<const unsigned char*, std::string>, CUfunction> functions;
};

std::mutex g_mu;
std::unique_ptr<Device> g_devices[64];

struct PushContext {
  explicit PushContext(CUcontext c) { check(cuCtxPushCurrent(c), "personaplex", "cuCtxPushCurrent"); }
  ~PushContext() {
    CUcontext popped;
    cuCtxPopCurrent(&popped);
  }
};

// Call with g_mu held.
Device& device_locked(int device) {
  auto& d = g_devices[device];
  if (d) return *d;
  auto fresh = std::make_unique<Device>();
  CUdevice dev;
  check(cuDeviceGet(&dev, device), "personaplex", "cuDeviceGet");
  check(cuDevicePrimaryCtxRetain(&fresh->ctx, dev), "personaplex", "cuDevicePrimaryCtxRetain");
  check(cuDeviceGetAttribute(&fresh->n_sm, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, dev),
        "personaplex", "SM count");
  PushContext push(fresh->ctx);
  check(cuStreamCreate(&fresh->free_stream, CU_STREAM_NON_BLOCKING), "personaplex", "cuStreamCreate");
  d = std::move(fresh);
  return *d;
}

std::atomic<bool> g_poison{false};
std::mutex g_ours_mu;
std::unordered_set<const void*> g_ours;

}  // namespace

void check(CUresult r, const char* op, const char* what) {
  if (r != CUDA_SUCCESS) {
    const char* msg = nullptr;
    cuGetErrorString(r, &msg);
    throw std::runtime_error(std::string(op) + " (CUDA): " + what + ": " + (msg ? msg : "unknown error"));
  }
}

CUfunction function(const unsigned char* image, const char* name, int device) {
  std::lock_guard lock(g_mu);
  auto& d = device_locked(device);
  auto key = std::make_pair(image, std::string(name));
  auto it = d.functions.find(key);
  if (it != d.functions.end()) return it->second;
  PushContext push(d.ctx);
  auto& module = d.modules[image];
  if (!module) check(cuModuleLoadData(&module, image), name, "loading the embedded fatbin");
  CUfunction f;
  check(cuModuleGetFunction(&f, module, name), name, "cuModuleGetFunction");
  d.functions[key] = f;
  return f;
}

int sm_count(int device) {
  std::lock_guard lock(g_mu);
  return device_locked(device).n_sm;
}

void set_poison(bool on) { g_poison.store(on); }

bool is_ours(const void* buffer) {
  std::lock_guard lock(g_ours_mu);
  return g_ours.count(buffer) > 0;
}

mx::allocator::Data device_malloc(size_t bytes, mx::cu::CommandEncoder& enc) {
  Device* d;
  {
    std::lock_guard lock(g_mu);
    d = &device_locked(enc.device().cuda_device());
  }
  CUdeviceptr p = 0;
  if (bytes > 0) {
    check(cuMemAllocAsync(&p, bytes, static_cast<CUstream>(static_cast<cudaStream_t>(enc.stream()))),
          "personaplex", "cuMemAllocAsync");
    if (g_poison.load()) {
      check(cuMemsetD8Async(p, 0xFF, bytes, static_cast<CUstream>(static_cast<cudaStream_t>(enc.stream()))),
            "personaplex", "cuMemsetD8Async");
    }
  }
  auto* buf = new mx::cu::CudaBuffer{reinterpret_cast<void*>(p), bytes, enc.device().cuda_device()};
  {
    std::lock_guard lock(g_ours_mu);
    g_ours.insert(buf);
  }
  auto deleter = [ctx = d->ctx, stream = d->free_stream](mx::allocator::Buffer b) {
    auto* buf = static_cast<mx::cu::CudaBuffer*>(b.ptr());
    {
      std::lock_guard lock(g_ours_mu);
      g_ours.erase(buf);
    }
    if (buf->data && cuCtxPushCurrent(ctx) == CUDA_SUCCESS) {
      auto dptr = reinterpret_cast<CUdeviceptr>(buf->data);
      if (buf->device >= 0) {
        cuMemFreeAsync(dptr, stream);
      } else {  // moved to unified memory by a host read (Buffer::raw_ptr)
        unsigned int managed = 0;
        cuPointerGetAttribute(&managed, CU_POINTER_ATTRIBUTE_IS_MANAGED, dptr);
        managed ? cuMemFree(dptr) : cuMemFreeHost(buf->data);
      }
      CUcontext popped;
      cuCtxPopCurrent(&popped);
    }
    delete buf;
  };
  return mx::allocator::Data(mx::allocator::Buffer(buf), deleter);
}

void alloc_output(mx::array& a, mx::cu::CommandEncoder& enc) { a.set_data(device_malloc(a.nbytes(), enc)); }

}  // namespace personaplex::cuda
