// What the fused CPU recurrences (cpu_fused.cpp, galite_cpu_fused.cpp) share: sigmoid pairs, fixed-order
// dot products, per-thread scratch and the subnormal flush. Included by each source, which is built into
// its own library (the build key covers this header too).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__SSE__)
#include <xmmintrin.h>
#endif

namespace {

constexpr int kLanes = 8;  // independent accumulators of a dot product (one AVX-512 register of doubles)

// exp(x) for x in [-87.33, 0] in float (NaN passes; below -87.33 it returns exp(-87.33), the smallest
// normal float, whose sigmoid use is flushed to 0 below): Cody-Waite reduction and a degree-7 Taylor
// polynomial. Branch-free, so loops over it vectorise (8 or 16 lanes).
inline float exp_nonpositive(float x) {
    x = x < -87.33f ? -87.33f : x;  // comparisons leave NaN alone
    const float shift = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer k
    const float ks = x * 1.44269504f + shift;
    const float kd = ks - shift;
    const float r = (x - kd * 0.693359375f) - kd * -2.12194440e-4f;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    // The low mantissa bits of ks hold k: (k + 127) << 23 is 2^k, without a float-to-int conversion.
    uint32_t bits;
    std::memcpy(&bits, &ks, sizeof bits);
    bits = (bits + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

// pos = sigma(x), neg = sigma(-x).
// float: from one exp, e = exp(-|x|): 1 / (1 + e) and e / (1 + e). Within 2.7 ulp of the exact sigmoid
// (measured over [-87, 87]; torch's own float sigmoid: 2.5 ulp), at half the cost of two exps. Below
// 87.33 the small one is exactly 0: torch's is 0 from 88.72 on, and between the two it is subnormal,
// which these kernels flush anyway (see FlushSubnormals). So saturated gates give decays of exactly
// 0 and 1, as in the reference.
inline void sigmoid_pair(const float* __restrict x, float* __restrict pos, float* __restrict neg, int64_t len) {
    for (int64_t i = 0; i < len; ++i) {
        const float xf = x[i];
        const float ax = xf < 0.0f ? -xf : xf;
        const float e = exp_nonpositive(-ax);
        const float big = 1.0f / (1.0f + e), small = ax >= 87.33f ? 0.0f : e * big;
        const bool nonneg = !(xf < 0.0f);  // NaN: both NaN anyway
        pos[i] = nonneg ? big : small;
        neg[i] = nonneg ? small : big;
    }
}

// double (the oracle dtype): torch's formula, 1 / (1 + exp(-x)), with the library exp.
inline void sigmoid_pair(const double* __restrict x, double* __restrict pos, double* __restrict neg, int64_t len) {
    for (int64_t i = 0; i < len; ++i) {
        pos[i] = 1.0 / (1.0 + std::exp(-x[i]));
        neg[i] = 1.0 / (1.0 + std::exp(x[i]));
    }
}

template <typename S>
inline S relu(S x) {
    return x < S(0) ? S(0) : x;  // NaN propagates, as torch's relu
}

inline double hsum(const double* acc) {
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// acc[l] += x[i] * y[i] over i = l mod kLanes: a fixed summation order that vectorises without -ffast-math.
template <typename S>
inline void dot_acc(double* acc, const S* x, const S* y, int64_t len) {
    int64_t i = 0;
    for (; i + kLanes <= len; i += kLanes)
        for (int l = 0; l < kLanes; ++l) acc[l] += static_cast<double>(x[i + l]) * static_cast<double>(y[i + l]);
    for (int l = 0; i + l < len; ++l) acc[l] += static_cast<double>(x[i + l]) * static_cast<double>(y[i + l]);
}

// Row (n, t, h) of each of the eight projections (or of their gradients): base pointers and element
// strides of (n, t, h), the last dim contiguous.
template <typename S, typename V>
inline void proj_rows(V* const* base, const int64_t (*stride)[3], int64_t n, int64_t t, int64_t h, S** rows) {
    for (int i = 0; i < 8; ++i)
        rows[i] = static_cast<S*>(base[i]) + n * stride[i][0] + t * stride[i][1] + h * stride[i][2];
}

// 1 - done of (n, t): dones bool (read as bytes) or in the compute dtype, or none (Args of either library).
template <typename S, typename A>
inline S keep_at(const A& a, int64_t n, int64_t t) {
    if (a.dones == nullptr) return S(1);
    const int64_t at = n * a.dones_stride[0] + t * a.dones_stride[1];
    const S done =
        a.dones_bool ? S(static_cast<const uint8_t*>(a.dones)[at] != 0) : static_cast<const S*>(a.dones)[at];
    return S(1) - done;
}

inline int64_t floor_mod(int64_t a, int64_t p) {
    const int64_t m = a % p;
    return m < 0 ? m + p : m;
}

// Per-thread scratch that outlives calls. OpenMP's pool threads persist, so after the first call a
// kernel allocates nothing: fresh blocks of a few hundred KiB would come from mmap and be page-faulted
// in again on every call.
class Arena {
  public:
    void reset() { block_ = used_ = 0; }

    template <typename T>
    T* take(int64_t count) {
        const size_t bytes = (static_cast<size_t>(count) * sizeof(T) + 63) & ~size_t(63);
        for (;; ++block_, used_ = 0) {
            if (block_ == blocks_.size()) blocks_.emplace_back(std::max<size_t>(bytes, size_t(1) << 20) + 64);
            std::vector<unsigned char>& b = blocks_[block_];
            unsigned char* origin = b.data() + (64 - reinterpret_cast<uintptr_t>(b.data()) % 64) % 64;
            if (origin + used_ + bytes <= b.data() + b.size()) {
                T* p = reinterpret_cast<T*>(origin + used_);
                used_ += bytes;
                return p;
            }
        }
    }

  private:
    std::vector<std::vector<unsigned char>> blocks_;
    size_t block_ = 0, used_ = 0;
};

thread_local Arena tl_arena;

// float32 kernels run with subnormals flushed to zero (FTZ and DAZ, on the threads of the call, restored
// when it returns). A memory element that receives no input (its key feature is off) decays
// geometrically and reaches the subnormal range after a few hundred steps; x86 then takes a microcode
// assist on every operation that touches it (a one-step call measured 7x slower). Flushed, such an
// element is 0 instead of below 1.2e-38. The float64 kernels (the oracle dtype) keep subnormals.
template <typename S>
class FlushSubnormals {
  public:
#if defined(__SSE__)
    FlushSubnormals() : saved_(_mm_getcsr()) {
        if (sizeof(S) == 4) _mm_setcsr(saved_ | 0x8040);  // FTZ (bit 15) and DAZ (bit 6)
    }
    ~FlushSubnormals() { _mm_setcsr(saved_); }

  private:
    unsigned saved_;
#endif
};

}  // namespace
