// Per-device facts and per-kernel launch settings, each looked up once per device and cached:
// a host query (device attributes, occupancy, a function attribute) costs microseconds, about
// what an eager layer's whole launch may take.
#pragma once

#include <cstddef>

namespace convrot::cuda {

struct DeviceFacts {
  int compute_capability;  // major * 10 + minor
  int multiprocessors;
};

// The current device's facts (DeviceScope has made it the operands' device).
const DeviceFacts& current_device();

// Lets `kernel` use `bytes` of dynamic shared memory on the current device (needed above 48 KB);
// the attribute only ever grows, set once per kernel, device and larger size.
void allow_dynamic_smem(const void* kernel, size_t bytes);

// How many blocks of `threads` threads and `smem` dynamic shared bytes of `kernel` fit on one
// multiprocessor of the current device (at least 1).
int resident_blocks_per_multiprocessor(const void* kernel, int threads, size_t smem);

}  // namespace convrot::cuda
