// Batched-skip kernels: run one transformer layer over the active rows of a mixed-depth batch.
//
// A batch row (a token: one per sequence in decode, the flattened tokens of all sequences in
// packed prefill) with depth d runs layer l iff d > rank[l]. These kernels keep that choice on
// the device, so a layer step needs neither a Python loop nor a host sync:
//   adadepth_active_rows                 compaction: ascending active row indices + their count
//   adadepth_gather_rmsnorm_<dt>_v<k>    out[i] = rmsnorm(hidden[idx[i]]) * w, i < count
//   adadepth_scatter_residual_add_<dt>_v<k>
//                                        hidden[idx[i]] += scale * update[i], i < count,
//                                        optionally normed_out[i] = rmsnorm(new row) * w_next
// <dt> is f32, f16 or bf16; v<k> is the elements per load (16-byte vectors, or v1 for rows whose
// pointers or strides are not 16-byte aligned). All arithmetic is fp32.
//
// The file is compiled by NVRTC at run time (kernels/batched_skip.py) and must stay
// self-contained: no torch headers and not even cuda_fp16.h / cuda_bf16.h, because NVRTC only
// finds those when a CUDA toolkit include directory is on its search path, which a pip-only
// install does not have. The 16-bit storage types below are bit-compatible with __half and
// __nv_bfloat16 (one 16-bit word), and the conversions round to nearest even as those do.

// ---------------------------------------------------------------------------------------------
// 16-bit storage types and fp32 conversions
// ---------------------------------------------------------------------------------------------

struct alignas(2) f16_t { unsigned short bits; };   // IEEE binary16, layout of __half
struct alignas(2) bf16_t { unsigned short bits; };  // bfloat16, layout of __nv_bfloat16

__device__ __forceinline__ float to_f32(float x) { return x; }

__device__ __forceinline__ float to_f32(f16_t x) {
    float r;
    asm("cvt.f32.f16 %0, %1;" : "=f"(r) : "h"(x.bits));
    return r;
}

__device__ __forceinline__ float to_f32(bf16_t x) {
    // bf16 is the top half of an fp32: widening is exact.
    return __uint_as_float(static_cast<unsigned int>(x.bits) << 16);
}

template <typename T> __device__ __forceinline__ T from_f32(float x);

template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }

template <> __device__ __forceinline__ f16_t from_f32<f16_t>(float x) {
    f16_t r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.bits) : "f"(x));
    return r;
}

template <> __device__ __forceinline__ bf16_t from_f32<bf16_t>(float x) {
    bf16_t r;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r.bits) : "f"(x));
#else
    // Pre-Ampere has no bf16 convert: round to nearest even by hand, keeping NaNs quiet.
    unsigned int u = __float_as_uint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        r.bits = static_cast<unsigned short>((u >> 16) | 0x40u);
    } else {
        u += 0x7fffu + ((u >> 16) & 1u);
        r.bits = static_cast<unsigned short>(u >> 16);
    }
#endif
    return r;
}

// VEC elements moved by one load/store; 16 bytes when VEC * sizeof(T) == 16 (LDG.128/STG.128).
template <typename T, int VEC> struct alignas(sizeof(T) * VEC) Vec { T v[VEC]; };

// ---------------------------------------------------------------------------------------------
// Reductions
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ int warp_sum(int v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Sum over the block; every thread gets the same value. The warp totals are added in warp
// order by every thread, so the result is deterministic and needs only one barrier to publish.
// The caller must barrier again before the next call reuses `red`.
template <typename A>
__device__ __forceinline__ A block_sum(A v, A* red) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int nwarps = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    if (lane == 0) red[warp] = v;
    __syncthreads();
    A total = 0;
    for (int w = 0; w < nwarps; ++w) total += red[w];
    return total;
}

// ---------------------------------------------------------------------------------------------
// Active-row compaction
// ---------------------------------------------------------------------------------------------

// Block b owns rows [b*chunk, (b+1)*chunk). It first counts the active rows before its chunk
// itself (row_depth is small and L2-resident, and this keeps the compaction one launch with no
// workspace and no inter-block communication), then scans its chunk blockDim.x rows at a time
// with warp ballots. Active rows go to the front in ascending order; every slot at or after
// `count` is set to -1 (inactive row j goes to slot n-1-(inactive rows before j)), so the whole
// output is defined. Launch with blockDim.x a multiple of 32 (<= 1024) and
// gridDim.x = max(1, ceil(n / chunk)); the last block writes count.
extern "C" __global__ void __launch_bounds__(1024)
adadepth_active_rows(const int* __restrict__ row_depth, int n, int layer_rank, int chunk,
                     int* __restrict__ active_idx, int* __restrict__ count) {
    __shared__ int red[32];
    __shared__ int warp_cnt[32];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int nwarps = blockDim.x >> 5;
    const long long start_ll = static_cast<long long>(blockIdx.x) * chunk;
    const int start = static_cast<int>(start_ll < n ? start_ll : n);
    const int end = (start + chunk < n && start + chunk > start) ? start + chunk : n;

    // Actives before this chunk.
    int pre = 0;
    for (int j = threadIdx.x; j < start; j += blockDim.x) pre += row_depth[j] > layer_rank;
    int offset = block_sum(pre, red);

    for (int base = start; base < end; base += blockDim.x) {
        const int j = base + threadIdx.x;
        const bool active = j < end && row_depth[j] > layer_rank;
        const unsigned int mask = __ballot_sync(0xffffffffu, active);
        if (lane == 0) warp_cnt[warp] = __popc(mask);
        __syncthreads();
        int before = 0, total = 0;  // actives in earlier warps of this round / in the round
        for (int w = 0; w < nwarps; ++w) {
            const int c = warp_cnt[w];
            before += (w < warp) ? c : 0;
            total += c;
        }
        const int pos = offset + before + __popc(mask & ((1u << lane) - 1u));
        if (j < end) {
            if (active) active_idx[pos] = j;
            else active_idx[n - 1 - (j - pos)] = -1;  // j - pos = inactive rows before j
        }
        offset += total;
        __syncthreads();  // warp_cnt is rewritten next round
    }
    if (blockIdx.x == gridDim.x - 1 && threadIdx.x == 0) *count = offset;
}

// ---------------------------------------------------------------------------------------------
// Row kernels (one block per active row, grid-stride over rows)
// ---------------------------------------------------------------------------------------------
//
// The number of active rows is only known on the device, so the grid is sized on the host
// for every possible row: either one block per row (blocks past `count` exit at once) or a
// persistent grid of about what fits on the GPU at once, each block looping over rows. The
// kernels work with any grid; batched_skip.py picks by block size.
//
// Two variants per operation:
//   cached (MAXV > 0): each thread keeps its <= MAXV vectors of the row in registers between
//     the sum of squares and the normalisation, so every byte is read once. Launch with
//     nvec = dim / VEC <= MAXV * blockDim.x.
//   stream: no register copy of the row; the normalisation pass reads the row again (an L1/L2
//     hit, the block has just read it). For rows too long for the cached variant, and with
//     VEC = 1 for rows whose pointers or strides are not 16-byte aligned.
// blockDim.x must be a multiple of 32 and at most 512 (the __launch_bounds__ below).
//
// RMSNorm follows the Hugging Face Llama/Qwen2 definition so the engine's CUDA path matches
// its CPU path: y = w * to_T(x * rsqrt(mean(x^2) + eps)), i.e. rounded to the storage type
// before the weight multiply. Entries of active_idx outside [0, n_rows) are skipped, so a bad
// index cannot read or write out of bounds.

// out = w * to_T(x * rstd), as fp32 arithmetic on the stored values.
template <typename T, int VEC>
__device__ __forceinline__ Vec<T, VEC> norm_vec(const Vec<T, VEC>& x, const Vec<T, VEC>& w,
                                                float rstd) {
    Vec<T, VEC> o;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
        const float normed = to_f32(from_f32<T>(to_f32(x.v[e]) * rstd));
        o.v[e] = from_f32<T>(to_f32(w.v[e]) * normed);
    }
    return o;
}

// h + u * scale, rounded to T. Separate multiply and add (no FMA) so the result rounds exactly
// like torch's `h + u * scale`.
template <typename T, int VEC>
__device__ __forceinline__ Vec<T, VEC> residual_vec(const Vec<T, VEC>& h, const Vec<T, VEC>& u,
                                                    float scale) {
    Vec<T, VEC> r;
#pragma unroll
    for (int e = 0; e < VEC; ++e)
        r.v[e] = from_f32<T>(__fadd_rn(to_f32(h.v[e]), __fmul_rn(to_f32(u.v[e]), scale)));
    return r;
}

template <typename T, int VEC>
__device__ __forceinline__ float sum_squares(const Vec<T, VEC>& x) {
    float s = 0.f;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
        const float f = to_f32(x.v[e]);
        s += f * f;
    }
    return s;
}

template <typename T, int VEC, int MAXV>
__device__ __forceinline__ void gather_rmsnorm_impl(
        const T* __restrict__ hidden, long long ld_hidden, int n_rows,
        const int* __restrict__ active_idx, int n_idx, const int* __restrict__ count_ptr,
        const T* __restrict__ weight, T* __restrict__ out, long long ld_out,
        T* __restrict__ gathered, long long ld_gathered, int dim, float eps) {
    using V = Vec<T, VEC>;
    __shared__ float red[32];
    const int nvec = dim / VEC;
    const int count = min(*count_ptr, n_idx);
    const float inv_dim = 1.f / static_cast<float>(dim);
    const V* wrow = reinterpret_cast<const V*>(weight);

    for (int i = blockIdx.x; i < count; i += gridDim.x) {
        const int src = active_idx[i];
        if (src < 0 || src >= n_rows) continue;  // uniform over the block: no barrier skew
        const V* hrow = reinterpret_cast<const V*>(hidden + src * ld_hidden);
        V* grow = reinterpret_cast<V*>(gathered + i * ld_gathered);
        V* orow = reinterpret_cast<V*>(out + i * ld_out);
        float ss = 0.f;
        if constexpr (MAXV > 0) {
            V x[MAXV];
            // All loads first, so up to MAXV 16-byte loads per thread are in flight at once.
#pragma unroll
            for (int k = 0; k < MAXV; ++k) {
                const int v = threadIdx.x + k * blockDim.x;
                if (v < nvec) x[k] = hrow[v];
            }
#pragma unroll
            for (int k = 0; k < MAXV; ++k) {
                const int v = threadIdx.x + k * blockDim.x;
                if (v < nvec) {
                    if (gathered != nullptr) grow[v] = x[k];
                    ss += sum_squares(x[k]);
                }
            }
            const float rstd = 1.f / sqrtf(block_sum(ss, red) * inv_dim + eps);
#pragma unroll
            for (int k = 0; k < MAXV; ++k) {
                const int v = threadIdx.x + k * blockDim.x;
                // The weight is re-read per row (an L1 hit) instead of living in registers,
                // which are better spent on row data in flight.
                if (v < nvec) orow[v] = norm_vec(x[k], wrow[v], rstd);
            }
        } else {
            for (int v = threadIdx.x; v < nvec; v += blockDim.x) {
                const V x = hrow[v];
                if (gathered != nullptr) grow[v] = x;
                ss += sum_squares(x);
            }
            const float rstd = 1.f / sqrtf(block_sum(ss, red) * inv_dim + eps);
            for (int v = threadIdx.x; v < nvec; v += blockDim.x)
                orow[v] = norm_vec(hrow[v], wrow[v], rstd);
        }
        __syncthreads();  // red is reused by the next row
    }
}

template <typename T, int VEC, int MAXV>
__device__ __forceinline__ void scatter_residual_add_impl(
        T* __restrict__ hidden, long long ld_hidden, int n_rows,
        const T* __restrict__ update, long long ld_update,
        const int* __restrict__ active_idx, int n_idx, const int* __restrict__ count_ptr,
        float scale, const T* __restrict__ next_weight, T* __restrict__ normed_out,
        long long ld_normed, int dim, float eps) {
    using V = Vec<T, VEC>;
    __shared__ float red[32];
    const int nvec = dim / VEC;
    const int count = min(*count_ptr, n_idx);
    const float inv_dim = 1.f / static_cast<float>(dim);
    const bool fuse_norm = next_weight != nullptr;
    const V* wrow = reinterpret_cast<const V*>(next_weight);

    for (int i = blockIdx.x; i < count; i += gridDim.x) {
        const int dst = active_idx[i];
        if (dst < 0 || dst >= n_rows) continue;  // uniform over the block: no barrier skew
        V* hrow = reinterpret_cast<V*>(hidden + dst * ld_hidden);
        const V* urow = reinterpret_cast<const V*>(update + i * ld_update);
        V* nrow = reinterpret_cast<V*>(normed_out + i * ld_normed);
        float ss = 0.f;
        if constexpr (MAXV > 0) {
            V h[MAXV], u[MAXV];
#pragma unroll
            for (int k = 0; k < MAXV; ++k) {
                const int v = threadIdx.x + k * blockDim.x;
                if (v < nvec) {
                    h[k] = hrow[v];
                    u[k] = urow[v];
                }
            }
#pragma unroll
            for (int k = 0; k < MAXV; ++k) {
                const int v = threadIdx.x + k * blockDim.x;
                if (v < nvec) {
                    h[k] = residual_vec(h[k], u[k], scale);
                    hrow[v] = h[k];
                    // The next norm sees the row as stored, as an unfused gather would.
                    ss += sum_squares(h[k]);
                }
            }
            if (fuse_norm) {
                const float rstd = 1.f / sqrtf(block_sum(ss, red) * inv_dim + eps);
#pragma unroll
                for (int k = 0; k < MAXV; ++k) {
                    const int v = threadIdx.x + k * blockDim.x;
                    if (v < nvec) nrow[v] = norm_vec(h[k], wrow[v], rstd);
                }
                __syncthreads();  // red is reused by the next row
            }
        } else {
            for (int v = threadIdx.x; v < nvec; v += blockDim.x) {
                const V r = residual_vec(hrow[v], urow[v], scale);
                hrow[v] = r;
                ss += sum_squares(r);
            }
            if (fuse_norm) {
                const float rstd = 1.f / sqrtf(block_sum(ss, red) * inv_dim + eps);
                // Each thread re-reads only the vectors it wrote itself, so no barrier is needed.
                for (int v = threadIdx.x; v < nvec; v += blockDim.x)
                    nrow[v] = norm_vec(hrow[v], wrow[v], rstd);
                __syncthreads();  // red is reused by the next row
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// extern "C" entry points, one per (dtype, vector width, variant)
// ---------------------------------------------------------------------------------------------
// The parameter lists are mirrored by _ActiveRowsParams / _GatherParams / _ScatterParams in
// batched_skip.py: keep them in the same order with the same C types.

#define ADADEPTH_ROW_KERNELS(SUFFIX, T, VEC, MAXV)                                              \
    extern "C" __global__ void __launch_bounds__(512) adadepth_gather_rmsnorm_##SUFFIX(         \
            const T* __restrict__ hidden, long long ld_hidden, int n_rows,                      \
            const int* __restrict__ active_idx, int n_idx, const int* __restrict__ count,       \
            const T* __restrict__ weight, T* __restrict__ out, long long ld_out,                \
            T* __restrict__ gathered, long long ld_gathered, int dim, float eps) {              \
        gather_rmsnorm_impl<T, VEC, MAXV>(hidden, ld_hidden, n_rows, active_idx, n_idx, count,  \
                                          weight, out, ld_out, gathered, ld_gathered, dim,      \
                                          eps);                                                 \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(512) adadepth_scatter_residual_add_##SUFFIX(   \
            T* __restrict__ hidden, long long ld_hidden, int n_rows,                            \
            const T* __restrict__ update, long long ld_update,                                  \
            const int* __restrict__ active_idx, int n_idx, const int* __restrict__ count,       \
            float scale, const T* __restrict__ next_weight, T* __restrict__ normed_out,         \
            long long ld_normed, int dim, float eps) {                                          \
        scatter_residual_add_impl<T, VEC, MAXV>(hidden, ld_hidden, n_rows, update, ld_update,   \
                                                active_idx, n_idx, count, scale, next_weight,   \
                                                normed_out, ld_normed, dim, eps);               \
    }

// Cached, 16-byte vectors, up to 4 per thread: dim <= 4 * 512 * VEC (8192 fp32, 16384 16-bit).
ADADEPTH_ROW_KERNELS(f32_v4, float, 4, 4)
ADADEPTH_ROW_KERNELS(f16_v8, f16_t, 8, 4)
ADADEPTH_ROW_KERNELS(bf16_v8, bf16_t, 8, 4)
// Stream, 16-byte vectors: aligned rows of any length.
ADADEPTH_ROW_KERNELS(f32_v4_stream, float, 4, 0)
ADADEPTH_ROW_KERNELS(f16_v8_stream, f16_t, 8, 0)
ADADEPTH_ROW_KERNELS(bf16_v8_stream, bf16_t, 8, 0)
// Stream, scalar: any row.
ADADEPTH_ROW_KERNELS(f32_v1_stream, float, 1, 0)
ADADEPTH_ROW_KERNELS(f16_v1_stream, f16_t, 1, 0)
ADADEPTH_ROW_KERNELS(bf16_v1_stream, bf16_t, 1, 0)
