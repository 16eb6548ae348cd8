// A minimal CUDA runtime over the driver API, covering the calls NIXL's mooncake_backend_test makes
// (cudaGetDeviceCount, cudaSetDevice, cudaMalloc, cudaFree, cudaMemset, cudaMemcpy, cudaGetErrorString), so that
// the test builds with HAVE_CUDA against the fake CUDA driver of tests/fakes/cuda, without the CUDA toolkit. Like
// the runtime, each thread works in the primary context of its current device (0 until cudaSetDevice).
#pragma once

#include <cstddef>

#include "cuda.h"

typedef int cudaError_t;
enum { cudaSuccess = 0 };
enum cudaMemcpyKind {
    cudaMemcpyHostToHost = 0,
    cudaMemcpyHostToDevice = 1,
    cudaMemcpyDeviceToHost = 2,
    cudaMemcpyDeviceToDevice = 3,
};

inline cudaError_t cudaSetDevice(int ordinal) {
    CUdevice dev;
    CUcontext ctx;
    CUresult r = cuInit(0);
    if (r == CUDA_SUCCESS) r = cuDeviceGet(&dev, ordinal);
    if (r == CUDA_SUCCESS) r = cuDevicePrimaryCtxRetain(&ctx, dev);
    if (r == CUDA_SUCCESS) r = cuCtxSetCurrent(ctx);
    return r;
}

// The runtime's implicit initialisation: the current device's primary context, made current once per thread.
inline cudaError_t nixlUpstreamEnsureContext() {
    static thread_local bool ready = false;
    if (ready) return cudaSuccess;
    cudaError_t r = cudaSetDevice(0);
    ready = r == cudaSuccess;
    return r;
}

inline cudaError_t cudaGetDeviceCount(int *count) {
    CUresult r = cuInit(0);
    return r == CUDA_SUCCESS ? cuDeviceGetCount(count) : r;
}

inline cudaError_t cudaMalloc(void **ptr, size_t size) {
    cudaError_t r = nixlUpstreamEnsureContext();
    CUdeviceptr p = 0;
    if (r == cudaSuccess) r = cuMemAlloc_v2(&p, size);
    *ptr = reinterpret_cast<void *>(p);
    return r;
}

inline cudaError_t cudaFree(void *ptr) { return cuMemFree_v2(reinterpret_cast<CUdeviceptr>(ptr)); }

inline cudaError_t cudaMemset(void *ptr, int value, size_t n) {
    return cuMemsetD8_v2(reinterpret_cast<CUdeviceptr>(ptr), static_cast<unsigned char>(value), n);
}

inline cudaError_t cudaMemcpy(void *dst, const void *src, size_t n, cudaMemcpyKind kind) {
    auto d = reinterpret_cast<CUdeviceptr>(dst);
    auto s = reinterpret_cast<CUdeviceptr>(src);
    switch (kind) {
    case cudaMemcpyDeviceToHost: return cuMemcpyDtoH_v2(dst, s, n);
    case cudaMemcpyHostToDevice: return cuMemcpyHtoD_v2(d, src, n);
    case cudaMemcpyDeviceToDevice: return cuMemcpyDtoD_v2(d, s, n);
    default: return 1; // cudaErrorInvalidValue: host-to-host is not needed here
    }
}

inline const char *cudaGetErrorString(cudaError_t) { return "CUDA error (see the driver's code)"; }
