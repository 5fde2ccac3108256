// Value errors found inside a CUDA graph. While a graph is captured the ops cannot copy
// lengths or positions to the host (no syncs), so the kernels check them where they read them
// and record the first bad value in host-mapped memory; the next turbokv CUDA op called
// outside a capture raises it. The kernels also clamp or
// skip the bad value, so nothing outside the cache is read or written meanwhile.
#pragma once

#include <cstdint>

namespace turbokv::cuda {

enum GraphErrorCode : int {
  kNoError = 0,
  kLengthRange = 1,   // value = length, limit = cache capacity
  kLengthShort = 2,   // value = length, limit = number of queries
  kStartRange = 3,    // value = start, limit = length
  kPositionRange = 4  // value = position, limit = cache capacity; seq = flat index
};

struct GraphError {
  int claim;  // 0 until a kernel takes the record
  int code;   // written last: the host reads it first
  int64_t seq, value, limit;
};

// The device address of the record, allocated on the first call outside a capture (nullptr
// before that: then a graph's kernels only clamp).
GraphError* graph_error_record();
// Raises the recorded error, if any, and clears it (host; no sync).
void raise_graph_error();

#ifdef __CUDACC__
__device__ __forceinline__ void record_graph_error(GraphError* e, int code, int64_t seq, int64_t value, int64_t limit) {
  if (e == nullptr || atomicCAS(&e->claim, 0, 1) != 0) return;
  e->seq = seq;
  e->value = value;
  e->limit = limit;
  __threadfence_system();
  *reinterpret_cast<volatile int*>(&e->code) = code;
}
#endif

}  // namespace turbokv::cuda
