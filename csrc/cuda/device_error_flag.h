#pragma once
// A device-side error flag for input CONTENTS that only a kernel sees as it reads them (CSR
// segment pointers, 2:4 metadata nibbles). Kernels never read out of bounds on bad contents: they
// clamp or substitute, set the flag and poison the affected outputs with NaN; the host then raises.
// Reading the flag is a device sync (~10 us of latency per call), skipped while the stream is
// captured into a CUDA graph (syncing is illegal there) and when the environment sets
// SPARSEQ_CUDA_CONTENT_CHECKS=0; the NaN outputs are the signal then.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <cstdlib>
#include <string>

namespace sparseq {
namespace cuda {

class DeviceErrorFlag {
 public:
  explicit DeviceErrorFlag(const at::Tensor& like) : flag_(at::zeros({1}, like.options().dtype(at::kInt))) {}
  int* data() const { return flag_.data_ptr<int>(); }
  // The flag's value (a bitmask of what the kernel found), or 0 while the stream is being
  // captured or the check is switched off (see above).
  int read(cudaStream_t stream) const {
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
    if (status != cudaStreamCaptureStatusNone || !enabled()) return 0;
    return flag_.item<int>();
  }

 private:
  static bool enabled() {
    static const bool on = [] {
      const char* v = std::getenv("SPARSEQ_CUDA_CONTENT_CHECKS");
      return v == nullptr || std::string(v) != "0";
    }();
    return on;
  }
  at::Tensor flag_;
};

}  // namespace cuda
}  // namespace sparseq
