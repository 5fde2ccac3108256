// The host side of graph_errors.cuh: one record per process in mapped, pinned host memory
// (the kernels write it over the bus only when a value is bad; the host reads it without a sync).
#include <c10/util/Exception.h>

#include <mutex>

#include "common.cuh"
#include "graph_errors.cuh"

namespace turbokv::cuda {
namespace {

GraphError* host_record = nullptr;
GraphError* device_record = nullptr;
std::once_flag once;

}  // namespace

GraphError* graph_error_record() {
  if (device_record == nullptr && !capturing()) {
    std::call_once(once, [] {
      void* h = nullptr;
      TKV_CUDA_CHECK(cudaHostAlloc(&h, sizeof(GraphError), cudaHostAllocMapped | cudaHostAllocPortable));
      host_record = static_cast<GraphError*>(h);
      *host_record = GraphError{};
      void* d = nullptr;
      TKV_CUDA_CHECK(cudaHostGetDevicePointer(&d, h, 0));
      device_record = static_cast<GraphError*>(d);
    });
  }
  return device_record;
}

void raise_graph_error() {
  if (host_record == nullptr) {  // the first call outside a capture allocates it, for the graphs to come
    graph_error_record();
    return;
  }
  const int code = *reinterpret_cast<volatile int*>(&host_record->code);
  if (code == kNoError) return;
  const GraphError e = *host_record;
  *host_record = GraphError{};
  const char* where = "an earlier turbokv call inside a CUDA graph got ";
  switch (code) {
    case kLengthRange:
      TORCH_CHECK_VALUE(false, where, "lengths: ", e.value, " for sequence ", e.seq,
                        ", expected 0 <= length <= cache capacity ", e.limit);
    case kLengthShort:
      TORCH_CHECK_VALUE(false, where, "lengths: ", e.value, " for sequence ", e.seq, ", expected >= ", e.limit,
                        " (the queries are the last Sq cached tokens)");
    case kStartRange:
      TORCH_CHECK_VALUE(false, where, "starts: ", e.value, " for sequence ", e.seq, ", expected 0 <= start <= length ",
                        e.limit);
    default:
      TORCH_CHECK_VALUE(false, where, "positions: ", e.value, " at flat index ", e.seq,
                        ", expected 0 <= position < cache capacity ", e.limit);
  }
}

}  // namespace turbokv::cuda
