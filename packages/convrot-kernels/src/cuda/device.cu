// DeviceScope and the cached per-device queries of device.h.
#include "device.h"

#include <cuda_runtime.h>

#include <cstdint>
#include <mutex>
#include <vector>

#include "../primitives.h"
#include "common.cuh"

namespace convrot::cuda {
namespace {

int current_device_index() {
  int device = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  return device;
}

DeviceFacts query_facts(int device) {
  int major = 0, minor = 0, sms = 0;
  check(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), "cudaDeviceGetAttribute");
  check(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device), "cudaDeviceGetAttribute");
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  return DeviceFacts{major * 10 + minor, sms};
}

// One answer per (kernel, device, threads, bytes); a handful of entries per model, so a scan
// under a lock costs less than the query it saves.
struct LaunchQuery {
  const void* kernel;
  int device;
  int threads;
  size_t bytes;
  int answer;
};

std::mutex launch_queries_lock;
std::vector<LaunchQuery> launch_queries;

template <typename Query>
int cached(const void* kernel, int threads, size_t bytes, Query query) {
  const int device = current_device_index();
  std::lock_guard<std::mutex> hold(launch_queries_lock);
  for (const LaunchQuery& q : launch_queries) {
    if (q.kernel == kernel && q.device == device && q.threads == threads && q.bytes == bytes) return q.answer;
  }
  const int answer = query();
  launch_queries.push_back(LaunchQuery{kernel, device, threads, bytes, answer});
  return answer;
}

// The dynamic shared-memory limit set on each (kernel, device).
struct SmemLimit {
  const void* kernel;
  int device;
  size_t bytes;
};

std::mutex smem_limits_lock;
std::vector<SmemLimit> smem_limits;

void set_max_dynamic_smem(const void* kernel, size_t bytes) {
  check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)),
        "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
}

}  // namespace

DeviceScope::DeviceScope(int device) : previous_(current_device_index()), changed_(previous_ != device) {
  if (changed_) check(cudaSetDevice(device), "cudaSetDevice");
}

DeviceScope::~DeviceScope() {
  if (changed_) cudaSetDevice(previous_);
}

const DeviceFacts& current_device() {
  constexpr int kMaxDevices = 64;
  static DeviceFacts facts[kMaxDevices];
  static std::once_flag queried[kMaxDevices];
  const int device = current_device_index();
  if (device >= kMaxDevices) throw std::runtime_error("convrot_kernels CUDA: more than 64 devices");
  std::call_once(queried[device], [device] { facts[device] = query_facts(device); });
  return facts[device];
}

void allow_dynamic_smem(const void* kernel, size_t bytes) {
  // Up to 48 KB (less the kernels' few static bytes) needs no attribute.
  if (bytes <= 46 * 1024) return;
  // The attribute is the kernel's one limit, whatever size set it last: only ever raise it, or a
  // launch of a size set earlier would exceed a smaller size set since.
  const int device = current_device_index();
  std::lock_guard<std::mutex> hold(smem_limits_lock);
  for (SmemLimit& limit : smem_limits) {
    if (limit.kernel != kernel || limit.device != device) continue;
    if (bytes > limit.bytes) {
      set_max_dynamic_smem(kernel, bytes);
      limit.bytes = bytes;
    }
    return;
  }
  set_max_dynamic_smem(kernel, bytes);
  smem_limits.push_back(SmemLimit{kernel, device, bytes});
}

int resident_blocks_per_multiprocessor(const void* kernel, int threads, size_t smem) {
  return cached(kernel, threads, smem, [&] {
    int blocks = 0;
    check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, smem), "cudaOccupancy");
    return blocks > 0 ? blocks : 1;
  });
}

}  // namespace convrot::cuda
