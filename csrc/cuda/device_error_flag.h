#pragma once
// A device-side error flag for input CONTENTS that only a kernel sees as it reads them (CSR
// segment pointers, 2:4 metadata nibbles). Kernels never read out of bounds on bad contents: they
// clamp or substitute, set the flag and poison the affected outputs with NaN; the host then raises.
// Reading the flag is a device sync, skipped while the stream is captured into a CUDA graph
// (syncing is illegal there), where the NaN outputs are the signal.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

namespace sparseq {
namespace cuda {

class DeviceErrorFlag {
 public:
  explicit DeviceErrorFlag(const at::Tensor& like) : flag_(at::zeros({1}, like.options().dtype(at::kInt))) {}
  int* data() const { return flag_.data_ptr<int>(); }
  template <typename... Args>
  void raise_if_set(cudaStream_t stream, const Args&... message) const {
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
    if (status != cudaStreamCaptureStatusNone) return;
    TORCH_CHECK(flag_.item<int>() == 0, message...);
  }

 private:
  at::Tensor flag_;
};

}  // namespace cuda
}  // namespace sparseq
