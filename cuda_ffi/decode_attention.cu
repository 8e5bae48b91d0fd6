// Decode attention: one new token per sequence against its KV cache, in two kernels behind one FFI
// call. XLA made eight kernels of this step (RoPE, two cache updates, scores, max, exp, sum, the
// probabilities' product with v), ~15 us per Llama-2-7B layer on an H100 at batch 1.
//
//   attn_split_kernel    block (split, kv head, sequence): its share of the keys [0, pos] (at most 32)
//                        staged in shared memory by asynchronous copies while it makes RoPE of the new
//                        q (the kv head's G query heads) and k; the new k and v written into the cache
//                        (by split 0); scores, max and exponentials, and the unnormalized product
//                        with v: partials (o, max, sum) per split;
//   attn_combine_kernel  block (query head, sequence): the splits' partials rescaled to a common
//                        max and summed: the output, normalized, in the dtype of q.
//
// Splitting the keys keeps every SM streaming the cache at short contexts with few kv heads. The new
// key is read from shared memory by the block whose keys contain it, not from the cache, so no block
// waits on another's write. Rounding as the XLA model: rotated q and k round to the dtype of qkv, k
// and v again to the cache's; scores and sums are float32.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>

#if !defined(JAXQUANT_HOST_HARNESS)
#include "xla/ffi/api/ffi.h"
#endif

#include "pdl.h"

extern __shared__ float att_smem[];  // at file scope: the tests' host build defines it

namespace {

__host__ __device__ inline float att_float(float v) { return v; }
__host__ __device__ inline float att_float(__half v) { return __half2float(v); }
__host__ __device__ inline float att_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class T>
__host__ __device__ inline T att_cast(float v) {
  if constexpr (std::is_same_v<T, __half>) return __float2half_rn(v);
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __float2bfloat16_rn(v);
  else return v;
}

// v rounded to T and back: the value the XLA model holds after an astype(T).
template <class T>
__host__ __device__ inline float att_round(float v) { return att_float(att_cast<T>(v)); }

__device__ __forceinline__ float att_warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float att_warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

constexpr int kAttThreads = 128;
constexpr int kAttWarps = kAttThreads / 32;
constexpr int kAttMaxGroup = 16;  // query heads per kv head
constexpr int kAttMaxKeys = 32;   // keys per split: a lane per key in the softmax

// 16 bytes from global to shared memory; asynchronous on sm_80+, so that a block has all of its
// key and value rows in flight at once (a loop of loads waited on each row in turn: 3x slower).
__device__ __forceinline__ void att_copy16(void* dst, const void* src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d), "l"(src));
#else
  *static_cast<uint4*>(dst) = *static_cast<const uint4*>(src);
#endif
}

__device__ __forceinline__ void att_copy_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;\n" ::);
#endif
}

struct AttnArgs {
  const void* qkv;         // [B, (H + 2 KVH) * D]: q heads, then k heads, then v heads
  void* kc;                // [B, S, KVH, D] key cache (updated in place)
  void* vc;                // [B, S, KVH, D] value cache
  const int32_t* pos;      // position of the new token: its slot, and keys [0, pos] are attended
  const float* inv_freq;   // [D / 2] RoPE inverse frequencies
  float* part_o;           // [B, H, splits, D] unnormalized outputs per split
  float* part_ml;          // [B, H, splits, 2] (max, sum of exponentials) per split
  void* out;               // [B, H * D] in the dtype of qkv
  int S, H, KVH, splits;
  float scale;             // of the scores (1 / sqrt(D))
};

// Slot of the new token and the number of keys attended: dynamic_update_slice clamps its start,
// and the causal mask then admits every key.
__device__ __forceinline__ void att_extent(const AttnArgs& a, int& slot, int& keys) {
  const int pos = *a.pos;
  slot = min(max(pos, 0), a.S - 1);
  keys = min(max(pos + 1, 1), a.S);
}

// Shared memory of a split block: its key and value rows (cache dtype), then q, the new k and v
// and the scores (float32).
__host__ __device__ inline size_t attn_smem_bytes(int group, int d, int per, int cache_bytes) {
  return static_cast<size_t>(2 * per * d) * cache_bytes + static_cast<size_t>(group * d + 2 * d + group * per) * 4;
}

template <class T, class C, int D>
__global__ void __launch_bounds__(kAttThreads) attn_split_kernel(AttnArgs a) {
  constexpr int E = D / 32;                    // dims per lane in the score products
  constexpr int kRowVecs = D * sizeof(C) / 16;  // 16-byte pieces of a key row
  const int split = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z;
  const int G = a.H / a.KVH, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  pdl_wait();  // everything here depends on pos and qkv, made by the kernels before
  pdl_launch_dependents();  // the combine kernel may launch and wait for this one
  int slot, keys;
  att_extent(a, slot, keys);
  const int max_per = (a.S + a.splits - 1) / a.splits;
  const int per = (keys + a.splits - 1) / a.splits;
  const int t0 = min(split * per, keys), n = min(t0 + per, keys) - t0;

  C* ks = reinterpret_cast<C*>(att_smem);  // [max_per][D]
  C* vs = ks + max_per * D;
  float* qs = reinterpret_cast<float*>(vs + max_per * D);  // [G][D] rotated q, times the score scale
  float* kn = qs + G * D;  // [D] rotated new k, as the cache holds it
  float* vn = kn + D;      // [D] new v
  float* sc = vn + D;      // [G][max_per] scores, then exponentials

  const size_t stride = static_cast<size_t>(a.KVH) * D;  // between consecutive keys
  const size_t head0 = static_cast<size_t>(b) * a.S * stride + static_cast<size_t>(kvh) * D;
  C* kc = static_cast<C*>(a.kc) + head0;
  C* vc = static_cast<C*>(a.vc) + head0;
  for (int i = threadIdx.x; i < n * kRowVecs; i += kAttThreads) {  // the new slot's row is replaced below
    const int t = i / kRowVecs, c = i % kRowVecs;
    att_copy16(reinterpret_cast<char*>(ks + t * D) + 16 * c, reinterpret_cast<const char*>(kc + (t0 + t) * stride) + 16 * c);
    att_copy16(reinterpret_cast<char*>(vs + t * D) + 16 * c, reinterpret_cast<const char*>(vc + (t0 + t) * stride) + 16 * c);
  }

  const T* row = static_cast<const T*>(a.qkv) + static_cast<size_t>(b) * (a.H + 2 * a.KVH) * D;
  const float pos = static_cast<float>(*a.pos);
  for (int i = threadIdx.x; i < (G + 1) * D; i += kAttThreads) {  // RoPE, rotate-half convention
    const int h = i / D, d = i % D;
    const T* src = h < G ? row + (kvh * G + h) * D : row + (a.H + kvh) * D;
    float sn, cs;
    sincosf(pos * a.inv_freq[d % (D / 2)], &sn, &cs);
    const float other = d < D / 2 ? -att_float(src[d + D / 2]) : att_float(src[d - D / 2]);
    const float y = att_round<T>(att_float(src[d]) * cs + other * sn);
    if (h < G) qs[i] = y * a.scale;
    else kn[d] = att_round<C>(y);
  }
  for (int d = threadIdx.x; d < D; d += kAttThreads) vn[d] = att_round<C>(att_float(row[(a.H + a.KVH + kvh) * D + d]));
  att_copy_wait();
  __syncthreads();
  if (slot >= t0 && slot < t0 + n)
    for (int d = threadIdx.x; d < D; d += kAttThreads) {
      ks[(slot - t0) * D + d] = att_cast<C>(kn[d]);
      vs[(slot - t0) * D + d] = att_cast<C>(vn[d]);
    }
  if (split == 0)
    for (int d = threadIdx.x; d < D; d += kAttThreads) {
      kc[slot * stride + d] = att_cast<C>(kn[d]);
      vc[slot * stride + d] = att_cast<C>(vn[d]);
    }
  __syncthreads();

  for (int t = warp; t < n; t += kAttWarps) {  // a warp per key: lanes hold E dims each
    float k[E];
#pragma unroll
    for (int e = 0; e < E; ++e) k[e] = att_float(ks[t * D + lane * E + e]);
    for (int g = 0; g < G; ++g) {
      float p = 0.f;
#pragma unroll
      for (int e = 0; e < E; ++e) p += qs[g * D + lane * E + e] * k[e];
      p = att_warp_sum(p);
      if (lane == 0) sc[g * max_per + t] = p;
    }
  }
  __syncthreads();

  const size_t part0 = (static_cast<size_t>(b) * a.H + static_cast<size_t>(kvh) * G) * a.splits + split;
  for (int g = warp; g < G; g += kAttWarps) {  // softmax pieces of head g: a lane per key
    const float s = lane < n ? sc[g * max_per + lane] : -INFINITY;
    const float m = att_warp_max(s);
    const float p = lane < n ? expf(s - m) : 0.f;
    if (lane < n) sc[g * max_per + lane] = p;
    const float l = att_warp_sum(p);
    if (lane == 0) {
      a.part_ml[(part0 + static_cast<size_t>(g) * a.splits) * 2] = m;
      a.part_ml[(part0 + static_cast<size_t>(g) * a.splits) * 2 + 1] = l;
    }
  }
  __syncthreads();

  for (int i = threadIdx.x; i < G * D; i += kAttThreads) {  // threads on consecutive dims of v's rows
    const int g = i / D, d = i % D;
    float o = 0.f;
    for (int t = 0; t < n; ++t) o += sc[g * max_per + t] * att_float(vs[t * D + d]);
    a.part_o[(part0 + static_cast<size_t>(g) * a.splits) * D + d] = o;
  }
}

template <class T, int D>
__global__ void __launch_bounds__(D) attn_combine_kernel(AttnArgs a) {
  const int h = blockIdx.x, b = blockIdx.y, d = threadIdx.x;
  pdl_wait();
  const float* ml = a.part_ml + (static_cast<size_t>(b) * a.H + h) * a.splits * 2;
  const float* po = a.part_o + (static_cast<size_t>(b) * a.H + h) * a.splits * D + d;
  // One pass with a running max, so that every load is independent of the others: unrolled, they
  // are in flight together (a pass for the max first cost another round trip to L2).
  float m = -INFINITY, l = 0.f, o = 0.f;
#pragma unroll 8
  for (int s = 0; s < a.splits; ++s) {
    const float ms = ml[2 * s], ls = ml[2 * s + 1], os = po[static_cast<size_t>(s) * D];
    const float mn = fmaxf(m, ms);  // finite from split 0 on (it always has keys)
    const float keep = expf(m - mn), w = expf(ms - mn);  // w = 0 for a split without keys (max -inf)
    l = l * keep + w * ls;
    o = o * keep + w * os;
    m = mn;
  }
  static_cast<T*>(a.out)[(static_cast<size_t>(b) * a.H + h) * D + d] = att_cast<T>(o / l);
}

}  // namespace

#if !defined(JAXQUANT_HOST_HARNESS)  // the launches and the FFI handler (the tests' host build stops above)
namespace ffi = xla::ffi;

namespace {

template <class T, class C, int D>
cudaError_t launch_attn(cudaStream_t stream, const AttnArgs& a, int batch, int max_per) {
  const size_t smem = attn_smem_bytes(a.H / a.KVH, D, max_per, sizeof(C));
  cudaError_t err = launch_dependent(attn_split_kernel<T, C, D>, dim3(a.splits, a.KVH, batch), dim3(kAttThreads),
                                     smem, stream, a);
  if (err != cudaSuccess) return err;
  return launch_dependent(attn_combine_kernel<T, D>, dim3(a.H, batch), dim3(D), 0, stream, a);
}

template <class T, class C>
cudaError_t launch_attn_d(cudaStream_t stream, const AttnArgs& a, int batch, int max_per, int d) {
  if (d == 64) return launch_attn<T, C, 64>(stream, a, batch, max_per);
  if (d == 128) return launch_attn<T, C, 128>(stream, a, batch, max_per);
  return cudaErrorInvalidValue;
}

template <class T>
cudaError_t launch_attn_cache(cudaStream_t stream, const AttnArgs& a, int batch, int max_per, int d,
                              ffi::DataType cache) {
  switch (cache) {
    case ffi::DataType::F32: return launch_attn_d<T, float>(stream, a, batch, max_per, d);
    case ffi::DataType::F16: return launch_attn_d<T, __half>(stream, a, batch, max_per, d);
    case ffi::DataType::BF16: return launch_attn_d<T, __nv_bfloat16>(stream, a, batch, max_per, d);
    default: return cudaErrorInvalidValue;
  }
}

ffi::Error DecodeAttentionImpl(cudaStream_t stream, ffi::AnyBuffer qkv, ffi::AnyBuffer kc_in, ffi::AnyBuffer vc_in,
                               ffi::Buffer<ffi::S32> pos, ffi::Buffer<ffi::F32> inv_freq,
                               ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::AnyBuffer> kc,
                               ffi::Result<ffi::AnyBuffer> vc, ffi::Result<ffi::Buffer<ffi::F32>> part_o,
                               ffi::Result<ffi::Buffer<ffi::F32>> part_ml, int64_t heads, int64_t kv_heads,
                               int64_t splits, double scale) {
  auto cd = kc_in.dimensions(), qd = qkv.dimensions();
  if (cd.size() != 4 || qd.size() != 2 || vc_in.dimensions().size() != 4) {
    return ffi::Error::InvalidArgument("decode_attention: qkv must be [B, (H + 2 KVH) D], caches [B, S, KVH, D]");
  }
  const int64_t batch = cd[0], S = cd[1], d = cd[3];
  if (cd[2] != kv_heads || kv_heads < 1 || heads % kv_heads || heads / kv_heads > kAttMaxGroup ||
      qd[0] != batch || qd[1] != (heads + 2 * kv_heads) * d || (d != 64 && d != 128) ||
      vc_in.element_count() != kc_in.element_count() || vc_in.element_type() != kc_in.element_type() ||
      inv_freq.element_count() != static_cast<size_t>(d / 2) || splits < 1 ||
      (S + splits - 1) / splits > kAttMaxKeys) {
    return ffi::Error::InvalidArgument("decode_attention: inconsistent shapes or unsupported head size / grouping");
  }
  if (kc->untyped_data() != kc_in.untyped_data() || vc->untyped_data() != vc_in.untyped_data()) {
    return ffi::Error::InvalidArgument("decode_attention: the caches must be aliased to their outputs");
  }
  AttnArgs a{qkv.untyped_data(), kc->untyped_data(), vc->untyped_data(), pos.typed_data(), inv_freq.typed_data(),
             part_o->typed_data(), part_ml->typed_data(), out->untyped_data(), static_cast<int>(S),
             static_cast<int>(heads), static_cast<int>(kv_heads), static_cast<int>(splits), static_cast<float>(scale)};
  const int max_per = static_cast<int>((S + splits - 1) / splits), dd = static_cast<int>(d), bb = static_cast<int>(batch);
  cudaError_t err;
  switch (qkv.element_type()) {
    case ffi::DataType::F32: err = launch_attn_cache<float>(stream, a, bb, max_per, dd, kc_in.element_type()); break;
    case ffi::DataType::F16: err = launch_attn_cache<__half>(stream, a, bb, max_per, dd, kc_in.element_type()); break;
    case ffi::DataType::BF16:
      err = launch_attn_cache<__nv_bfloat16>(stream, a, bb, max_per, dd, kc_in.element_type());
      break;
    default: return ffi::Error::InvalidArgument("decode_attention: qkv must be float32, float16 or bfloat16");
  }
  if (err != cudaSuccess) return ffi::Error::Internal(std::string("decode_attention: ") + cudaGetErrorString(err));
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxquantDecodeAttention, DecodeAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("heads")
                                  .Attr<int64_t>("kv_heads")
                                  .Attr<int64_t>("splits")
                                  .Attr<double>("scale"),
                              {ffi::Traits::kCmdBufferCompatible});
#endif
