// One row's Hadamard transform of n = A * B across a thread-block cluster (a decode step's few rows):
// y = s * (D x) / sqrt(n), D = F_A (x) H_B with F_A a dense +-1 A x A factor given as sign bits (A <=
// 256; H_K (x) H_{2^r} of a K * 2^p width, or its transpose for an inverse) and H_B Sylvester (B = 32 *
// TB <= 1024); s optional. A row of x may come as P partial sums (a split matvec's), added as they
// load. A forward transform's signs go on x before (the caller's elementwise producer takes them for
// free), so the row stage loads nothing but x.
//
// A single-row transform in one block leaves 131 SMs idle and costs 4-5 us at n = 4096 on an H100; the
// K-point factor as XLA dots adds a pad, a split-K GEMM and a sum. Here C blocks (a cluster) share a
// row: each warp transforms rows of B (H_B: registers, then shuffles) and stores every element in the
// shared memory of the block that owns its column (distributed shared memory); after one cluster
// barrier each block applies F_A to its columns (a thread per output and 4 columns, F_A's row as sign
// bits) and writes them. G clusters per row each keep B / G of the columns, B / (G C) per block.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>

#include "pdl.h"
#include "rht_cluster.h"

#if !defined(JAXQUANT_HOST_HARNESS)
#include <cooperative_groups.h>

#include "xla/ffi/api/ffi.h"
#endif

namespace {

constexpr int kRhtcMaxA = 256;
constexpr int kRhtcThreads = 256;  // 512 cost 1.3-2 us more per call on an H100 (session 15)

struct RhtcArgs {
  const float* x;         // [parts, rows, A * B] ([rows, 2 A B] with io.swiglu)
  const uint32_t* bits;   // [A, words]: bit a of output a' set where its factor entry is -1
  const float* signs;     // [A * B] multiplied after, or nullptr
  void* y;                // [rows, A * B] in io.dtype
  int a_rows, words, parts;
  int blocks, groups;     // C blocks per cluster, G clusters per row: B / (G C) columns per block
  int64_t rows;
  float scale;
  RhtcIo io;              // rht_cluster.h
};

// Four consecutive elements of a float32 (dtype 0), fp16 (1) or bf16 (2) vector; i a multiple of 4.
__host__ __device__ inline float4 rhtc_load4(const void* p, int dtype, int64_t i) {
  if (dtype == 0) return *reinterpret_cast<const float4*>(static_cast<const float*>(p) + i);
  const uint2 u = *reinterpret_cast<const uint2*>(static_cast<const uint16_t*>(p) + i);
  if (dtype == 1) {
    __half2 lo, hi;
    memcpy(&lo, &u.x, 4);
    memcpy(&hi, &u.y, 4);
    const float2 a = __half22float2(lo), b = __half22float2(hi);
    return make_float4(a.x, a.y, b.x, b.y);
  }
  auto bf = [](uint32_t bits) { float f; memcpy(&f, &bits, 4); return f; };
  return make_float4(bf(u.x << 16), bf(u.x & 0xFFFF0000u), bf(u.y << 16), bf(u.y & 0xFFFF0000u));
}

__host__ __device__ inline void rhtc_store4(void* p, int dtype, int64_t i, float4 v) {
  if (dtype == 0) {
    *reinterpret_cast<float4*>(static_cast<float*>(p) + i) = v;
    return;
  }
  uint2 u;
  if (dtype == 1) {
    const __half2 lo = __floats2half2_rn(v.x, v.y), hi = __floats2half2_rn(v.z, v.w);
    memcpy(&u.x, &lo, 4);
    memcpy(&u.y, &hi, 4);
  } else {
    const __nv_bfloat162 lo = __floats2bfloat162_rn(v.x, v.y), hi = __floats2bfloat162_rn(v.z, v.w);
    memcpy(&u.x, &lo, 4);
    memcpy(&u.y, &hi, 4);
  }
  *reinterpret_cast<uint2*>(static_cast<uint16_t*>(p) + i) = u;
}

__host__ __device__ inline float rhtc_silu(float z) { return z / (1.f + expf(-z)); }

#if !defined(JAXQUANT_HOST_HARNESS)  // the tests' host build brings its own cluster emulation
__device__ __forceinline__ float* rhtc_peer_smem(float* local, int rank) {
  return cooperative_groups::this_cluster().map_shared_rank(local, rank);
}
__device__ __forceinline__ void rhtc_cluster_sync() { cooperative_groups::this_cluster().sync(); }
#endif

__host__ __device__ inline float rhtc_sign(uint32_t bit) {  // bit 0 -> 1.0f, 1 -> -1.0f
  const uint32_t u = 0x3f800000u | (bit << 31);
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

__device__ __forceinline__ void rhtc_prefetch_l1(const float* p) {
#if defined(__CUDA_ARCH__)
  asm volatile("prefetch.global.L1 [%0];" ::"l"(p));
#endif
}

// Between a layer's uses the weights stream through L2 and evict the signs and the factor's bits, so
// each block asks for its share of them (128-byte lines) before the dependent loads that need them.
__device__ __forceinline__ void rhtc_prefetch(const void* base, int bytes, int part, int parts) {
#if defined(__CUDA_ARCH__)
  const char* p = static_cast<const char*>(base);
  for (int off = (part * static_cast<int>(blockDim.x) + static_cast<int>(threadIdx.x)) * 128; off < bytes;
       off += parts * static_cast<int>(blockDim.x) * 128) {
    asm volatile("prefetch.global.L2 [%0];" ::"l"(p + off));
  }
#endif
}

// Block `rank` of cluster `group` for `row`. The cluster owns columns [group * B / G, ...) of the
// row's A x B view (every cluster transforms all A rows of B and keeps its columns), a block B / (G C)
// of them: cols = its A_pad x (B / (G C)) floats of shared memory (A_pad: A rounded up to 8).
template <int TB>
__device__ void rht_cluster_block(const RhtcArgs& a, float* cols, int rank, int group, int64_t row) {
  constexpr int B = 32 * TB;
  const int n = a.a_rows * B, span = B / a.groups, cpb = span / a.blocks, lane = threadIdx.x % 32;
  const int warps = blockDim.x / 32, warp0 = rank * warps + static_cast<int>(threadIdx.x) / 32;
  const int a_pad = (a.a_rows + 7) / 8 * 8, first = group * span;
  if (a.signs) rhtc_prefetch(a.signs, n * 4, group * a.blocks + rank, a.groups * a.blocks);
  if (a.io.in_signs) rhtc_prefetch(a.io.in_signs, n * 4, group * a.blocks + rank, a.groups * a.blocks);
  rhtc_prefetch(a.bits, a.a_rows * a.words * 4, rank, a.blocks);
  const bool swiglu = a.io.swiglu;
  const int parts = swiglu ? 2 : a.parts;  // gate and up are the two "parts" of a swiglu row
  // part p of the row: a split matvec's partial, or the gate (p = 0) / up (p = 1) half of a swiglu row
  auto part = [&](int p) { return a.x + (swiglu ? (2 * row + p) * n : (p * a.rows + row) * n); };
  const float gate_scale = swiglu ? a.io.gate_up_scale[0] : 0.f, up_scale = swiglu ? a.io.gate_up_scale[1] : 0.f;
  float out_scale[3] = {a.scale, a.scale, a.scale};  // weights: read before pdl_wait
  if (a.io.out_scale) {
    const int last = (a.io.scale_split[0] < n) + (a.io.scale_split[1] < n);
    for (int i = 0; i < 3; ++i) out_scale[i] *= a.io.out_scale[i < last ? i : last];
  }
  for (int i = a.a_rows * cpb + static_cast<int>(threadIdx.x); i < a_pad * cpb; i += blockDim.x) cols[i] = 0.f;
  pdl_wait();  // the prefetches and the padding above may overlap the kernel that makes x
  // Rows of B: element j = t * 32 + lane, so every load is one warp-contiguous 128 bytes. A warp's
  // later rows are asked into L1 first: their loads then wait on L1, not on L2, after the first row's.
  for (int r = warp0 + a.blocks * warps; r < a.a_rows; r += a.blocks * warps) {
    for (int p = 0; p < parts; ++p) {
#pragma unroll
      for (int t = 0; t < TB; ++t) rhtc_prefetch_l1(part(p) + int64_t{r} * B + t * 32 + lane);
    }
  }
  for (int r = warp0; r < a.a_rows; r += a.blocks * warps) {
    float v[TB];
    const float* xr = part(0) + static_cast<int64_t>(r) * B + lane;
#pragma unroll
    for (int t = 0; t < TB; ++t) v[t] = xr[t * 32];
    if (swiglu) {
      const float* up = part(1) + static_cast<int64_t>(r) * B + lane;
      const float* s = a.io.in_signs + static_cast<int64_t>(r) * B + lane;
#pragma unroll
      for (int t = 0; t < TB; ++t) v[t] = rhtc_silu(gate_scale * v[t]) * (up_scale * up[t * 32]) * s[t * 32];
    }
#pragma unroll 4
    for (int p = 1; p < a.parts && !swiglu; ++p) {  // unrolled so that several parts' loads are in flight
      const float* xp = part(p) + static_cast<int64_t>(r) * B + lane;
#pragma unroll
      for (int t = 0; t < TB; ++t) v[t] += xp[t * 32];
    }
#pragma unroll
    for (int h = 1; h < TB; h *= 2) {  // the bits of t
#pragma unroll
      for (int t = 0; t < TB; ++t) {
        if (t & h) continue;
        const float u = v[t], w = v[t + h];
        v[t] = u + w;
        v[t + h] = u - w;
      }
    }
#pragma unroll
    for (int m = 1; m < 32; m *= 2) {  // the bits of the lane
#pragma unroll
      for (int t = 0; t < TB; ++t) {
        const float o = __shfl_xor_sync(0xffffffffu, v[t], m);
        v[t] = lane & m ? o - v[t] : v[t] + o;
      }
    }
#pragma unroll
    for (int t = 0; t < TB; ++t) {
      const int j = t * 32 + lane - first;
      if (j >= 0 && j < span) rhtc_peer_smem(cols, j / cpb)[r * cpb + j % cpb] = v[t];
    }
  }
  rhtc_cluster_sync();
  pdl_launch_dependents();
  // F_A on this block's columns: item = (output a', 4 columns), its A inputs 8 at a time (loads first).
  // (Splitting an item's sum over lanes cost more than its shorter chain saved.)
  const int quads = cpb / 4, j0 = first + rank * cpb;
  for (int item = threadIdx.x; item < a.a_rows * quads; item += blockDim.x) {
    const int out = item / quads, q = item % quads;
    float4 acc[2] = {make_float4(0.f, 0.f, 0.f, 0.f), make_float4(0.f, 0.f, 0.f, 0.f)};
    const float4* c4 = reinterpret_cast<const float4*>(cols) + q;
    // A loop over the sign words, not unrolled: in a decode step the weights evict the kernel's code from
    // L2 between layers, and the unrolled body (a third of the library) took 13.4 us against 6.1 at 11008.
#pragma unroll 1
    for (int w = 0; w < a.words; ++w) {
      const uint32_t bits = a.bits[out * a.words + w];
#pragma unroll
      for (int e0 = 0; e0 < 32; e0 += 8) {
        const int i0 = w * 32 + e0;
        if (i0 >= a_pad) break;
        float4 v[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) v[e] = c4[(i0 + e) * quads];
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          const float s = rhtc_sign((bits >> (e0 + e)) & 1u);
          float4& c = acc[e & 1];
          c.x = fmaf(s, v[e].x, c.x);
          c.y = fmaf(s, v[e].y, c.y);
          c.z = fmaf(s, v[e].z, c.z);
          c.w = fmaf(s, v[e].w, c.w);
        }
      }
    }
    const int o = out * B + j0 + q * 4;
    const float os = out_scale[(o >= a.io.scale_split[0]) + (o >= a.io.scale_split[1])];
    float4 res = make_float4((acc[0].x + acc[1].x) * os, (acc[0].y + acc[1].y) * os, (acc[0].z + acc[1].z) * os,
                             (acc[0].w + acc[1].w) * os);
    if (a.signs) {
      const float4 s = *reinterpret_cast<const float4*>(a.signs + o);
      res = make_float4(res.x * s.x, res.y * s.y, res.z * s.z, res.w * s.w);
    }
    if (a.io.resid) {
      const float4 r = rhtc_load4(a.io.resid, a.io.dtype, row * n + o);
      res = make_float4(r.x + res.x, r.y + res.y, r.z + res.z, r.w + res.w);
    }
    rhtc_store4(a.y, a.io.dtype, row * n + o, res);
  }
}

#if !defined(JAXQUANT_HOST_HARNESS)
template <int TB>
__global__ void __launch_bounds__(kRhtcThreads) rht_cluster_kernel(RhtcArgs a) {
  extern __shared__ float4 rhtc_smem[];
  rht_cluster_block<TB>(a, reinterpret_cast<float*>(rhtc_smem),
                        static_cast<int>(cooperative_groups::this_cluster().block_rank()),
                        static_cast<int>(blockIdx.x) / a.blocks, blockIdx.y);
}
#endif

}  // namespace

#if !defined(JAXQUANT_HOST_HARNESS)  // the launch and the FFI handler
namespace ffi = xla::ffi;

namespace {

cudaLaunchConfig_t rhtc_config(int blocks, int groups, int64_t rows, size_t smem, cudaLaunchAttribute* attr) {
  cudaLaunchConfig_t cfg = {};
  attr->id = cudaLaunchAttributeClusterDimension;
  attr->val.clusterDim.x = blocks;
  attr->val.clusterDim.y = 1;
  attr->val.clusterDim.z = 1;
  cfg.gridDim = dim3(blocks * groups, static_cast<unsigned>(rows), 1);
  cfg.blockDim = dim3(kRhtcThreads, 1, 1);
  cfg.dynamicSmemBytes = smem;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cfg;
}

// blocks (C) and groups (G) of 0 take the defaults: the smallest cluster whose warps take a row each
// (at most 16 where the GPU schedules that, else 8), and as many clusters as leave each block 4
// columns (on an H100 the fastest or within 0.3 us of it at the Llama widths, session 15; at A = 56
// neither smaller clusters nor more columns a block shortened the 70B linear's tail, session 21).
template <int TB>
cudaError_t launch_rht_cluster(cudaStream_t stream, RhtcArgs a, int64_t rows, int blocks, int groups) {
  constexpr int b = 32 * TB;
  static const int largest = [] {  // found once per instantiation: the attribute is per kernel
    cudaLaunchAttribute attr;
    cudaLaunchConfig_t cfg = rhtc_config(16, 1, 1, 32768 * sizeof(float) / 16, &attr);
    int clusters = 0;
    if (cudaFuncSetAttribute(rht_cluster_kernel<TB>, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) ==
            cudaSuccess &&
        cudaOccupancyMaxActiveClusters(&clusters, rht_cluster_kernel<TB>, &cfg) == cudaSuccess && clusters > 0) {
      return 16;
    }
    cudaGetLastError();
    return 8;
  }();
  if (blocks <= 0) {
    for (blocks = 2; blocks < largest && blocks * (kRhtcThreads / 32) < a.a_rows; blocks *= 2) {
    }
    if (blocks > b / 4) blocks = b / 4;
  }
  if (groups <= 0) groups = b / 4 / blocks > 1 ? b / 4 / blocks : 1;
  if (blocks > largest || b % (blocks * groups) || (b / (blocks * groups)) % 4) return cudaErrorInvalidConfiguration;
  a.blocks = blocks;
  a.groups = groups;
  const size_t smem = static_cast<size_t>((a.a_rows + 7) / 8 * 8) * (b / (blocks * groups)) * sizeof(float);
  cudaLaunchAttribute attr;
  cudaLaunchConfig_t cfg = rhtc_config(blocks, groups, rows, smem, &attr);
  cfg.stream = stream;
  return launch_dependent(rht_cluster_kernel<TB>, cfg, a);
}

}  // namespace

cudaError_t rht_cluster_run(cudaStream_t stream, const float* x, const uint32_t* bits, const float* signs, void* y,
                            int a_rows, int parts, int64_t rows, int64_t n, float scale, int blocks, int groups,
                            const RhtcIo* io) {
  if (a_rows < 1 || a_rows > kRhtcMaxA || n % a_rows || parts < 1 || rows < 1 || rows > 65535 ||
      (io && (io->dtype < 0 || io->dtype > 2 || (io->swiglu && (parts != 1 || !io->in_signs || !io->gate_up_scale)) ||
              io->scale_split[0] % 4 || io->scale_split[1] % 4 || io->scale_split[0] > io->scale_split[1]))) {
    return cudaErrorInvalidValue;
  }
  RhtcArgs a{x, bits, signs, y, a_rows, (a_rows + 31) / 32, parts, 0, 0, rows, scale, io ? *io : RhtcIo{}};
  switch (n / a_rows) {
    case 32: return launch_rht_cluster<1>(stream, a, rows, blocks, groups);
    case 64: return launch_rht_cluster<2>(stream, a, rows, blocks, groups);
    case 128: return launch_rht_cluster<4>(stream, a, rows, blocks, groups);
    case 256: return launch_rht_cluster<8>(stream, a, rows, blocks, groups);
    case 512: return launch_rht_cluster<16>(stream, a, rows, blocks, groups);
    case 1024: return launch_rht_cluster<32>(stream, a, rows, blocks, groups);
    default: return cudaErrorInvalidValue;
  }
}

namespace {

ffi::Error RhtClusterImpl(cudaStream_t stream, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U32> bits,
                          ffi::Buffer<ffi::F32> signs, ffi::Result<ffi::Buffer<ffi::F32>> y, int64_t parts,
                          int64_t has_signs, double scale, int64_t blocks, int64_t groups) {
  auto bd = bits.dimensions(), yd = y->dimensions();
  const int64_t n = yd.size() ? yd[yd.size() - 1] : 0;
  if (bd.size() != 2 || n == 0 || parts < 1 || x.element_count() != static_cast<size_t>(parts) * y->element_count() ||
      (has_signs && signs.element_count() != static_cast<size_t>(n))) {
    return ffi::Error::InvalidArgument("rht_cluster: x must be [parts, ..., n], y [..., n], signs [n], bits [A, words]");
  }
  const int64_t a_rows = bd[0];
  if (a_rows < 1 || a_rows > kRhtcMaxA || bd[1] != (a_rows + 31) / 32 || n % a_rows) {
    return ffi::Error::InvalidArgument("rht_cluster: A must be <= 256 with A x ceil(A / 32) bits and divide n");
  }
  const int64_t b = n / a_rows, rows = static_cast<int64_t>(y->element_count()) / n;
  if (rows == 0) return ffi::Error::Success();
  if (rows > 65535) return ffi::Error::InvalidArgument("rht_cluster: at most 65535 rows (a decode step's few)");
  if (b < 32 || b > 1024 || (b & (b - 1))) {
    return ffi::Error::InvalidArgument("rht_cluster: n / A must be a power of two in [32, 1024]");
  }
  cudaError_t err = rht_cluster_run(stream, x.typed_data(), bits.typed_data(), has_signs ? signs.typed_data() : nullptr,
                                    y->typed_data(), static_cast<int>(a_rows), static_cast<int>(parts), rows, n,
                                    static_cast<float>(scale), static_cast<int>(blocks), static_cast<int>(groups));
  if (err == cudaSuccess) err = cudaGetLastError();
  if (err != cudaSuccess) return ffi::Error::Internal(std::string("rht_cluster: ") + cudaGetErrorString(err));
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxquantRhtCluster, RhtClusterImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("parts")
                                  .Attr<int64_t>("has_signs")
                                  .Attr<double>("scale")
                                  .Attr<int64_t>("blocks")
                                  .Attr<int64_t>("groups"),
                              {ffi::Traits::kCmdBufferCompatible});
#endif
