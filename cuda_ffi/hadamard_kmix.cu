// The K-point factor of a Hadamard transform of n = K * 2^p for a few rows (a decode step), after the
// 2^p kernel: y[r, a, j] = scale * sum_i s(i, a) w[r, i, j] (* signs[a * M + j]) with s = +-1 given as
// bits. XLA ran this as a split-K GEMM between a pad and a sum of the splits: three kernels, ~5 us per
// use at K = 172 on an H100.
//
// A block takes 4 columns j of one row and every output a (a thread per a): the block stages
// w[r, :, j0 .. j0 + 4) in shared memory, a thread holds its K sign bits in registers and adds the
// staged values with those signs (float32, in order of i).
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <string>

#if !defined(JAXQUANT_HOST_HARNESS)
#include "xla/ffi/api/ffi.h"
#endif

extern __shared__ float4 kmix_smem[];  // at file scope: the tests' host build defines it

namespace {

constexpr int kKmixCols = 4;     // columns per block: one float4
constexpr int kKmixMaxWords = 8;  // sign words per output: K <= 256

struct KmixArgs {
  const float* w;          // [rows, K, M]
  const uint32_t* bits;    // [K, words]: bit i of output a's row is set where s(i, a) = -1
  const float* signs;      // [K * M] multiplied after, or nullptr
  float* y;                // [rows, K, M]
  int k, m, words;
  float scale;
};

__host__ __device__ inline float kmix_sign(uint32_t bit) {  // bit 0 -> 1.0f, 1 -> -1.0f
  const uint32_t u = 0x3f800000u | (bit << 31);
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

__global__ void __launch_bounds__(256) hadamard_kmix_kernel(KmixArgs a) {
  const int j0 = blockIdx.x * kKmixCols, r = blockIdx.y, out = threadIdx.x;
  const float* wr = a.w + static_cast<size_t>(r) * a.k * a.m + j0;
  for (int i = threadIdx.x; i < a.k; i += blockDim.x) kmix_smem[i] = *reinterpret_cast<const float4*>(wr + static_cast<size_t>(i) * a.m);
  uint32_t bits[kKmixMaxWords];
#pragma unroll
  for (int q = 0; q < kKmixMaxWords; ++q) bits[q] = out < a.k && q < a.words ? a.bits[out * a.words + q] : 0u;
  __syncthreads();
  if (out >= a.k) return;
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
  for (int q = 0; q < kKmixMaxWords; ++q) {
    if (q * 32 >= a.k) break;
#pragma unroll
    for (int e = 0; e < 32; ++e) {
      const int i = q * 32 + e;
      if (i >= a.k) break;
      const float s = kmix_sign((bits[q] >> e) & 1u);
      const float4 v = kmix_smem[i];
      acc.x = fmaf(s, v.x, acc.x);
      acc.y = fmaf(s, v.y, acc.y);
      acc.z = fmaf(s, v.z, acc.z);
      acc.w = fmaf(s, v.w, acc.w);
    }
  }
  const size_t o = static_cast<size_t>(out) * a.m + j0;
  float4 res = make_float4(acc.x * a.scale, acc.y * a.scale, acc.z * a.scale, acc.w * a.scale);
  if (a.signs) {
    const float4 s = *reinterpret_cast<const float4*>(a.signs + o);
    res = make_float4(res.x * s.x, res.y * s.y, res.z * s.z, res.w * s.w);
  }
  *reinterpret_cast<float4*>(a.y + static_cast<size_t>(r) * a.k * a.m + o) = res;
}

}  // namespace

#if !defined(JAXQUANT_HOST_HARNESS)  // the launch and the FFI handler (the tests' host build stops above)
namespace ffi = xla::ffi;

namespace {

ffi::Error HadamardKmixImpl(cudaStream_t stream, ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::U32> bits,
                            ffi::Buffer<ffi::F32> signs, ffi::Result<ffi::Buffer<ffi::F32>> y, int64_t has_signs,
                            double scale) {
  auto wd = w.dimensions(), bd = bits.dimensions();
  if (wd.size() < 2 || bd.size() != 2 || y->element_count() != w.element_count()) {
    return ffi::Error::InvalidArgument("hadamard_kmix: w must be [..., K, M], bits [K, words], y like w");
  }
  const int64_t k = wd[wd.size() - 2], m = wd[wd.size() - 1];
  if (k < 1 || k > 32 * kKmixMaxWords || bd[0] != k || bd[1] != (k + 31) / 32 || m % kKmixCols ||
      (has_signs && signs.element_count() != static_cast<size_t>(k * m))) {
    return ffi::Error::InvalidArgument("hadamard_kmix: K must be <= 256 with K x ceil(K / 32) bits, M a multiple of 4");
  }
  const int64_t rows = static_cast<int64_t>(w.element_count()) / (k * m);
  if (rows == 0) return ffi::Error::Success();
  if (rows > 65535) return ffi::Error::InvalidArgument("hadamard_kmix: at most 65535 rows (a decode step's few)");
  KmixArgs a{w.typed_data(), bits.typed_data(), has_signs ? signs.typed_data() : nullptr, y->typed_data(),
             static_cast<int>(k), static_cast<int>(m), static_cast<int>(bd[1]), static_cast<float>(scale)};
  const int threads = static_cast<int>((k + 31) / 32 * 32);
  hadamard_kmix_kernel<<<dim3(static_cast<unsigned>(m / kKmixCols), static_cast<unsigned>(rows)), threads,
                         static_cast<size_t>(k) * sizeof(float4), stream>>>(a);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return ffi::Error::Internal(std::string("hadamard_kmix: ") + cudaGetErrorString(err));
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxquantHadamardKmix, HadamardKmixImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("has_signs")
                                  .Attr<double>("scale"),
                              {ffi::Traits::kCmdBufferCompatible});
#endif
