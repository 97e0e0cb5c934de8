// The GaLiTe recurrence for CPU tensors as one pass per (environment, head): the eager reference's maths
// (agalite_triton/reference/galite_recurrence.py) with the (D, K) memory of one head (32 KiB at D = 64,
// nu = 2) kept in L1/L2 across the steps of a call, instead of scans over (B, T, H, D, K) temporaries.
//
// Built at first use by agalite_triton/reference/galite_cpu_fused.py (through cpp_library.py, as
// cpu_fused.cpp) and called through ctypes with raw pointers and element strides.
//
// Rounding follows the reference where it can (-ffp-contract=off; the reference's products and sums in its
// order and dtype). The differences, all at rounding level:
// * float32 sigmoid pairs come from one float exp (cpu_fused_common.h);
// * the read-out's dot products <C_j, Q>, <s, Q> are summed in double (the reference sums in float);
// * the decay keep (sigma(-beta_j) + sigma(beta_j) (1 - G_k)) is formed as keep sigma(-beta_j) +
//   (keep sigma(beta_j)) (1 - G_k): the same value for 0/1 dones;
// * float32 kernels flush subnormals to zero.
//
// Work items (n, h) are independent and each is computed by one thread in a fixed order, so results
// are bitwise the same whatever the thread count.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_fused_common.h"

namespace {

// Mirrors the ctypes.Structure in galite_cpu_fused.py field for field.
struct Args {
    const void* proj[8];  // keys, queries, values, beta, gamma: (N, T, H, D); p1, p2, p3: (N, T, H, nu)
    int64_t proj_stride[8][3];  // element strides of (n, t, h); the last dim is contiguous
    const void* dones;  // (N, T) bool (dones_bool) or in the compute dtype, or null
    int64_t dones_stride[2];
    int64_t dones_bool;
    const int64_t* slots;  // (N,) state row of each projection row, or null (row n)
    const void* state_in[2];  // c (B_s, H, D, K), s (B_s, H, K)
    int64_t state_in_stride[2];  // batch strides; the rest of each row is contiguous
    void* state_out[2];  // same layout; may alias state_in
    int64_t state_out_stride[2];
    void* out;  // (N, T, H, D)
    int64_t out_stride[3];
    void* ckpt;  // (N, C, H, W), W = D*K + K: the memory before steps 0, chunk, 2*chunk, ...; or null
    int64_t chunk;
    // (N, T, H, D + 1): <C_j, Q> and <s, Q> + eps of every step, written by the training forward and read
    // by the backward, which then recomputes the memories only; or null.
    void* readout;
    // Backward only.
    const void* grad_out;  // (N, T, H, D) contiguous
    const void* grad_final[2];  // memory-shaped, contiguous, each may be null (zero)
    void* grad_proj[8];  // shaped like the projections
    int64_t grad_proj_stride[8][3];
    void* grad_state[2];  // contiguous, memory-shaped
    // Restarts: where restart_index[n, t] = m >= 0 the memory before step t is row m of restart_state.
    const int64_t* restart_index;  // (N, T) contiguous, or null
    const void* restart_state[2];  // (N_r, H, D, K), (N_r, H, K); inner contiguous
    int64_t restart_stride[2];
    void* grad_restart[2];  // backward: (N_r, ...) contiguous, zero on entry, accumulated into
    int64_t n, t, h, d, nu;
    double eps;
    int64_t threads;
};

// Per-step factors of one (n, t, h): gates and feature factors ((D,) and (nu,) vectors), and the (K,)
// features they expand to, dim-major (k = i * nu + m).
template <typename S>
struct Gates {
    S *sg, *sng, *sb, *snb, *ka, *qa, *vin, *dca, *dcb;  // (D,): dca = keep sigma(-beta), dcb = keep sigma(beta)
    S *sp3, *snp3, *kb, *qb;  // (nu,)
    S *omg, *kg, *q, *ds;  // (K,): 1 - G, K G, Q, keep (1 - G)
    double* qd;  // (K,) Q in double, for the read-out's dot products
    S keep = S(1);

    Gates(Arena& ar, int64_t d, int64_t nu) {
        for (S** v : {&sg, &sng, &sb, &snb, &ka, &qa, &vin, &dca, &dcb}) *v = ar.take<S>(d);
        for (S** v : {&sp3, &snp3, &kb, &qb}) *v = ar.take<S>(nu);
        for (S** v : {&omg, &kg, &q, &ds}) *v = ar.take<S>(d * nu);
        qd = ar.take<double>(d * nu);
    }

    void compute(const Args& a, int64_t n, int64_t t, int64_t h) {
        const int64_t d = a.d, nu = a.nu;
        const S* p[8];
        proj_rows(a.proj, a.proj_stride, n, t, h, p);
        keep = keep_at<S>(a, n, t);
        sigmoid_pair(p[4], sg, sng, d);
        sigmoid_pair(p[3], sb, snb, d);
        sigmoid_pair(p[7], sp3, snp3, nu);
        for (int64_t i = 0; i < d; ++i) {
            ka[i] = sg[i] * relu(p[0][i]);
            qa[i] = relu(p[1][i]);
            vin[i] = sb[i] * p[2][i];
            dca[i] = keep * snb[i];
            dcb[i] = keep * sb[i];
        }
        for (int64_t m = 0; m < nu; ++m) {
            kb[m] = sp3[m] * relu(p[5][m]);
            qb[m] = relu(p[6][m]);
        }
        // 1 - G = sigma(-gamma) + sigma(gamma) sigma(-p3): no cancellation as a gate nears 1.
        for (int64_t i = 0; i < d; ++i)
            for (int64_t m = 0; m < nu; ++m) {
                const int64_t k = i * nu + m;
                omg[k] = sng[i] + sg[i] * snp3[m];
                kg[k] = ka[i] * kb[m];
                q[k] = qa[i] * qb[m];
                qd[k] = q[k];
                ds[k] = keep * omg[k];
            }
    }
};

// One head's memory: row j of C at c + j * k, s at s.
template <typename S>
struct HeadMem {
    S* c;
    S* s;
};

template <typename S>
HeadMem<S> mem_of(const Args& a, void* const* base, const int64_t* stride, int64_t row, int64_t h) {
    const int64_t k = a.d * a.nu;
    return HeadMem<S>{static_cast<S*>(base[0]) + row * stride[0] + h * a.d * k,
                      static_cast<S*>(base[1]) + row * stride[1] + h * k};
}

// A head's memory packed contiguously (C, then s), as checkpoints store it.
template <typename S>
HeadMem<S> packed(S* p, int64_t d, int64_t k) {
    return HeadMem<S>{p, p + d * k};
}

template <typename S>
void copy_mem(const HeadMem<S>& from, const HeadMem<S>& to, int64_t d, int64_t k) {
    std::memcpy(to.c, from.c, d * k * sizeof(S));
    std::memcpy(to.s, from.s, k * sizeof(S));
}

inline int64_t restart_row(const Args& a, int64_t n, int64_t t) {
    return a.restart_index ? a.restart_index[n * a.t + t] : -1;
}

inline int64_t width(const Args& a) { return a.d * a.nu * (a.d + 1); }

inline int64_t chunks(const Args& a) { return (a.t + a.chunk - 1) / a.chunk; }

// Independent accumulators of a row's dot products: one 64-byte register of S.
template <typename S>
constexpr int lanes() {
    return 64 / sizeof(S);
}

// The lanes of an accumulator summed in a fixed order: halves added pairwise (vector adds, where a
// sequential sum over 16 lanes would cost as much as the row itself).
template <typename S>
inline S lane_sum(const S* acc) {
    S t[lanes<S>()];
    std::memcpy(t, acc, sizeof t);
    for (int w = lanes<S>() / 2; w >= 1; w /= 2)
        for (int l = 0; l < w; ++l) t[l] = t[l] + t[l + w];
    return t[0];
}

// Partial sums of a row's dot product: 16, so that the float update runs 16 lanes wide (two registers
// of double accumulators).
constexpr int kRowLanes = 16;

// dst[k] = x_scale * x[k] + (da + db * dc[k]) * src[k] over one K-row (dst may be src), and with kDot
// acc[l] += dst[k] * qd[k] for k = l mod kRowLanes, in double: one pass that updates a memory row and forms
// its part of <row, Q>. The s row is the same update with da = 0, db = 1, dc = keep (1 - G), x_scale = 1.
// Double sums keep <C_j, Q> and <s, Q> consistent to far below float rounding: the gradient of a factor
// that scales Q (p2 with nu = 1) is a cancellation of the two, and would otherwise be mostly rounding.
template <bool kDot, typename S>
inline void update_row(S* dst, const S* src, const S* __restrict x, const S* __restrict dc,
                       const double* __restrict qd, double* __restrict acc, S x_scale, S da, S db, int64_t len) {
    if (!kDot) {
        for (int64_t i = 0; i < len; ++i) dst[i] = x_scale * x[i] + (da + db * dc[i]) * src[i];
        return;
    }
    int64_t i = 0;
    for (; i + kRowLanes <= len; i += kRowLanes) {
        S v[kRowLanes];
        for (int l = 0; l < kRowLanes; ++l) v[l] = x_scale * x[i + l] + (da + db * dc[i + l]) * src[i + l];
        for (int l = 0; l < kRowLanes; ++l) {
            dst[i + l] = v[l];
            acc[l] += static_cast<double>(v[l]) * qd[i + l];
        }
    }
    for (int l = 0; i + l < len; ++l) {
        const S v = x_scale * x[i + l] + (da + db * dc[i + l]) * src[i + l];
        dst[i + l] = v;
        acc[l] += static_cast<double>(v) * qd[i + l];
    }
}

// The kRowLanes partial sums of a row's dot product, added pairwise.
inline double row_sum(const double* acc) {
    double t[kRowLanes];
    std::memcpy(t, acc, sizeof t);
    for (int w = kRowLanes / 2; w >= 1; w /= 2)
        for (int l = 0; l < w; ++l) t[l] = t[l] + t[l + w];
    return t[0];
}

// One step of one head: src -> dst (they may be the same memory). With kDot, num[0..D) and num[D] receive
// <C_j, Q> and <s, Q> + eps, and out (or null) the read-out num / den; without, only the memory moves (the
// backward's recompute, which reads the forward's num and den).
template <bool kDot, typename S>
void step(const Args& a, const Gates<S>& g, const HeadMem<S>& src, const HeadMem<S>& dst, S* num, S* out,
          const S* ahead = nullptr) {
    const int64_t d = a.d, k = a.d * a.nu;
    constexpr int64_t line = 64 / sizeof(S);
    double acc[kRowLanes];
    std::fill(acc, acc + kRowLanes, 0.0);
    // s_t = K G + keep (1 - G) s: the reference's x + a h with a = keep (1 - G) (da + db a = a exactly).
    update_row<kDot>(dst.s, src.s, g.kg, g.ds, g.qd, acc, S(1), S(0), S(1), k);
    if (kDot) num[d] = static_cast<S>(row_sum(acc)) + static_cast<S>(a.eps);
    for (int64_t j = 0; j < d; ++j) {
        if (kDot) std::fill(acc, acc + kRowLanes, 0.0);
        if (ahead != nullptr)
            for (int64_t x = 0; x < k; x += line) __builtin_prefetch(ahead + j * k + x, 1);
        update_row<kDot>(dst.c + j * k, src.c + j * k, g.kg, g.omg, g.qd, acc, g.vin[j], g.dca[j], g.dcb[j], k);
        if (kDot) num[j] = static_cast<S>(row_sum(acc));
    }
    if (!kDot || out == nullptr) return;
    for (int64_t j = 0; j < d; ++j) out[j] = num[j] / num[d];
}

template <typename S>
void forward(const Args& a) {
    const int64_t items = a.n * a.h, k = a.d * a.nu, wd = width(a);
    void* const in_base[2] = {const_cast<void*>(a.state_in[0]), const_cast<void*>(a.state_in[1])};
    void* const restart_base[2] = {const_cast<void*>(a.restart_state[0]), const_cast<void*>(a.restart_state[1])};
    // Tiny calls (one env, a few heads) run on the calling thread: a parallel region costs more.
#pragma omp parallel num_threads(a.threads) if (items * a.t * wd >= 32768 && a.threads > 1)
    {
        const FlushSubnormals<S> flush;
        Arena& ar = tl_arena;
        ar.reset();
        Gates<S> g(ar, a.d, a.nu);
        S* scratch = ar.take<S>(a.d + 1);
#pragma omp for schedule(static)
        for (int64_t item = 0; item < items; ++item) {
            const int64_t n = item / a.h, h = item % a.h;
            const int64_t row = a.slots ? a.slots[n] : n;
            const HeadMem<S> src = mem_of<S>(a, in_base, a.state_in_stride, row, h);
            const HeadMem<S> dst = mem_of<S>(a, a.state_out, a.state_out_stride, row, h);
            for (int64_t t = 0; t < a.t; ++t) {
                const HeadMem<S>& carried = t == 0 ? src : dst;
                if (a.ckpt != nullptr && t % a.chunk == 0) {
                    S* c = static_cast<S*>(a.ckpt) + ((n * chunks(a) + t / a.chunk) * a.h + h) * wd;
                    copy_mem(carried, packed(c, a.d, k), a.d, k);
                }
                const int64_t m = restart_row(a, n, t);
                const HeadMem<S> cur = m < 0 ? carried : mem_of<S>(a, restart_base, a.restart_stride, m, h);
                g.compute(a, n, t, h);
                S* out = static_cast<S*>(a.out) + n * a.out_stride[0] + t * a.out_stride[1] + h * a.out_stride[2];
                S* num = a.readout ? static_cast<S*>(a.readout) + ((n * a.t + t) * a.h + h) * (a.d + 1) : scratch;
                // A one-step call streams every head's memory once: fetch the next head's rows while this one
                // computes (the hardware prefetcher restarts at every head).
                const S* ahead = nullptr;
                if (a.t == 1 && item + 1 < items) {
                    const int64_t nn = (item + 1) / a.h, row_n = a.slots ? a.slots[nn] : nn;
                    ahead = mem_of<S>(a, in_base, a.state_in_stride, row_n, (item + 1) % a.h).c;
                }
                step<true>(a, g, cur, dst, num, out, ahead);
            }
        }
    }
}

// Reverse-mode through one memory row j of one step. In: g1 = dC_t[j] + gN_j Q (gc holds dC_t[j] and
// receives dC_{t-1}[j] = decay * g1). Accumulates over k the row sums
// racc[0] += g1 C_{t-1}[j, k] (d decay / d dca_j), racc[1] += g1 C_{t-1} (1 - G_k) (d / d dcb_j),
// racc[2] += g1 K G_k (d / d vin_j), and over rows the column sums gomg += g1 C_{t-1} dcb_j,
// gkg += g1 vin_j, gq += gN_j C_t[j].
// One 64-byte register of S (GCC / Clang vector extension: elementwise IEEE operations, so the same
// rounding as scalar code; loads and stores through memcpy are unaligned).
template <typename S>
struct Vec {
    typedef S type __attribute__((vector_size(64)));
};

template <typename S>
inline typename Vec<S>::type vload(const S* p) {
    typename Vec<S>::type v;
    std::memcpy(&v, p, sizeof v);
    return v;
}

template <typename S>
inline void vstore(S* p, typename Vec<S>::type v) {
    std::memcpy(p, &v, sizeof v);
}

template <typename S>
inline void bwd_row(S* __restrict gc, S* __restrict gomg, S* __restrict gkg, S* __restrict gq,
                    S* __restrict racc, const S* __restrict c0, const S* __restrict c1,
                    const S* __restrict q, const S* __restrict omg, const S* __restrict kg, S gn, S dca, S dcb,
                    S vin, int64_t len) {
    typedef typename Vec<S>::type V;
    constexpr int L = lanes<S>();
    V a0 = {}, a1 = {}, a2 = {};
    int64_t i = 0;
    for (; i + L <= len; i += L) {
        const V g1 = vload(gc + i) + gn * vload(q + i);
        const V gdc = g1 * vload(c0 + i);
        const V om = vload(omg + i);
        a0 += gdc;
        a1 += gdc * om;
        a2 += g1 * vload(kg + i);
        vstore(gomg + i, vload(gomg + i) + gdc * dcb);
        vstore(gkg + i, vload(gkg + i) + g1 * vin);
        vstore(gq + i, vload(gq + i) + gn * vload(c1 + i));
        vstore(gc + i, (dca + dcb * om) * g1);
    }
    for (int l = 0; i + l < len; ++l) {
        const int64_t x = i + l;
        const S g1 = gc[x] + gn * q[x];
        const S gdc = g1 * c0[x];
        a0[l] += gdc;
        a1[l] += gdc * omg[x];
        a2[l] += g1 * kg[x];
        gomg[x] = gomg[x] + gdc * dcb;
        gkg[x] = gkg[x] + g1 * vin;
        gq[x] = gq[x] + gn * c1[x];
        gc[x] = (dca + dcb * omg[x]) * g1;
    }
    vstore(racc, a0);
    vstore(racc + L, a1);
    vstore(racc + 2 * L, a2);
}

// Per-thread scratch of the backward.
template <typename S>
struct BackWork {
    S *gomg, *gkg, *gq;  // (K,)
    S *gsg, *gsng, *gsb, *gsnb, *gvin;  // (D,)
    S *gsp3, *gsnp3, *gkb, *gqb;  // (nu,)

    BackWork(Arena& ar, int64_t d, int64_t nu) {
        for (S** v : {&gomg, &gkg, &gq}) *v = ar.take<S>(d * nu);
        for (S** v : {&gsg, &gsng, &gsb, &gsnb, &gvin}) *v = ar.take<S>(d);
        for (S** v : {&gsp3, &gsnp3, &gkb, &gqb}) *v = ar.take<S>(nu);
    }
};

// The gradients of one step's eight projections from those of its (K,) features and (D,) factors
// (sigma' = sigma(x) sigma(-x), as the reference's sigmoid_pair).
template <typename S>
void bwd_projections(const Args& a, const Gates<S>& g, BackWork<S>& w, int64_t n, int64_t t, int64_t h) {
    const int64_t d = a.d, nu = a.nu;
    const S* p[8];
    S* gp[8];
    proj_rows(a.proj, a.proj_stride, n, t, h, p);
    proj_rows(a.grad_proj, a.grad_proj_stride, n, t, h, gp);
    std::fill(w.gsp3, w.gsp3 + nu, S(0));
    std::fill(w.gsnp3, w.gsnp3 + nu, S(0));
    std::fill(w.gkb, w.gkb + nu, S(0));
    std::fill(w.gqb, w.gqb + nu, S(0));
    // omg[i, m] = sng_i + sg_i snp3_m, kg[i, m] = ka_i kb_m, q[i, m] = qa_i qb_m.
    for (int64_t i = 0; i < d; ++i) {
        S gsng = S(0), gsg = S(0), gka = S(0), gqa = S(0);
        for (int64_t m = 0; m < nu; ++m) {
            const int64_t k = i * nu + m;
            gsng = gsng + w.gomg[k];
            gsg = gsg + w.gomg[k] * g.snp3[m];
            gka = gka + w.gkg[k] * g.kb[m];
            gqa = gqa + w.gq[k] * g.qb[m];
            w.gsnp3[m] = w.gsnp3[m] + w.gomg[k] * g.sg[i];
            w.gkb[m] = w.gkb[m] + w.gkg[k] * g.ka[i];
            w.gqb[m] = w.gqb[m] + w.gq[k] * g.qa[i];
        }
        const S k_ = p[0][i], q_ = p[1][i], v_ = p[2][i];
        gsg = gsg + gka * relu(k_);
        gp[0][i] = k_ > S(0) ? gka * g.sg[i] : S(0);
        gp[1][i] = q_ > S(0) ? gqa : S(0);
        gp[2][i] = w.gvin[i] * g.sb[i];
        const S gsb = w.gsb[i] + w.gvin[i] * v_;
        gp[3][i] = (gsb - w.gsnb[i]) * (g.sb[i] * g.snb[i]);
        gp[4][i] = (gsg - gsng) * (g.sg[i] * g.sng[i]);
    }
    for (int64_t m = 0; m < nu; ++m) {
        const S p1 = p[5][m];
        gp[5][m] = p1 > S(0) ? w.gkb[m] * g.sp3[m] : S(0);
        gp[6][m] = p[6][m] > S(0) ? w.gqb[m] : S(0);
        const S gsp3 = w.gkb[m] * relu(p1);
        gp[7][m] = (gsp3 - w.gsnp3[m]) * (g.sp3[m] * g.snp3[m]);
    }
}

// Reverse-mode through one call, per head: each chunk of steps is recomputed from its checkpoint into
// a thread-local buffer (the memory before each step: (chunk + 1) x 33 KiB at the tmaze size, so it stays
// in L2), then walked backwards; the gradient of the carried memory (gc, gs) flows from the last step to
// the first and ends in grad_state.
template <typename S>
void backward(const Args& a) {
    const int64_t items = a.n * a.h, d = a.d, nu = a.nu, k = d * nu, wd = width(a);
    const int64_t nch = chunks(a);
    void* const restart_base[2] = {const_cast<void*>(a.restart_state[0]), const_cast<void*>(a.restart_state[1])};
#pragma omp parallel num_threads(a.threads) if (items * a.t * wd >= 32768 && a.threads > 1)
    {
        const FlushSubnormals<S> flush;
        Arena& ar = tl_arena;
        ar.reset();
        Gates<S> g(ar, d, nu);
        BackWork<S> w(ar, d, nu);
        S* states = ar.take<S>((a.chunk + 1) * wd);  // the memory before each step of a chunk, and after its last
        S* rbuf = ar.take<S>(wd);  // a restart memory, packed, when a step starts from one
        S* gc = ar.take<S>(d * k);
        S* gs = ar.take<S>(k);
        constexpr int L = lanes<S>();
        S racc[3 * L];
#pragma omp for schedule(static)
        for (int64_t item = 0; item < items; ++item) {
            const int64_t n = item / a.h, h = item % a.h;
            const S* fc = static_cast<const S*>(a.grad_final[0]);
            const S* fs = static_cast<const S*>(a.grad_final[1]);
            for (int64_t x = 0; x < d * k; ++x) gc[x] = fc ? fc[(n * a.h + h) * d * k + x] : S(0);
            for (int64_t x = 0; x < k; ++x) gs[x] = fs ? fs[(n * a.h + h) * k + x] : S(0);
            for (int64_t c = nch - 1; c >= 0; --c) {
                const int64_t t0 = c * a.chunk, t1 = std::min(a.t, t0 + a.chunk);
                const S* ck = static_cast<const S*>(a.ckpt) + ((n * nch + c) * a.h + h) * wd;
                std::memcpy(states, ck, wd * sizeof(S));
                for (int64_t t = t0; t < t1; ++t) {
                    g.compute(a, n, t, h);
                    HeadMem<S> prev = packed(states + (t - t0) * wd, d, k);
                    const int64_t m = restart_row(a, n, t);
                    if (m >= 0) {  // the step starts from the restart memory; the slot keeps step t - 1's memory
                        prev = packed(rbuf, d, k);
                        copy_mem(mem_of<S>(a, restart_base, a.restart_stride, m, h), prev, d, k);
                    }
                    step<false>(a, g, prev, packed(states + (t - t0 + 1) * wd, d, k), static_cast<S*>(nullptr),
                                static_cast<S*>(nullptr));
                }
                for (int64_t t = t1 - 1; t >= t0; --t) {
                    g.compute(a, n, t, h);
                    const int64_t rr = restart_row(a, n, t);
                    HeadMem<S> prev = packed(states + (t - t0) * wd, d, k);
                    if (rr >= 0) {
                        prev = packed(rbuf, d, k);
                        copy_mem(mem_of<S>(a, restart_base, a.restart_stride, rr, h), prev, d, k);
                    }
                    const HeadMem<S> cur = packed(states + (t - t0 + 1) * wd, d, k);
                    const S* num = static_cast<const S*>(a.readout) + ((n * a.t + t) * a.h + h) * (d + 1);
                    const S den = num[d];
                    const S* go = static_cast<const S*>(a.grad_out) + ((n * a.t + t) * a.h + h) * d;
                    // out = num / den: d num = go / den, d den = -sum go num / den^2 (the forward's out).
                    double dot = 0.0;
                    for (int64_t j = 0; j < d; ++j) dot += static_cast<double>(go[j]) * static_cast<double>(num[j] / den);
                    const S gden = static_cast<S>(-dot / static_cast<double>(den));
                    // s_t = K G + ds s_{t-1}, den = <s_t, Q> + eps.
                    for (int64_t x = 0; x < k; ++x) {
                        const S g1 = gs[x] + gden * g.q[x];
                        w.gkg[x] = g1;
                        w.gomg[x] = g.keep * (g1 * prev.s[x]);
                        w.gq[x] = gden * cur.s[x];
                        gs[x] = g.ds[x] * g1;
                    }
                    for (int64_t j = 0; j < d; ++j) {
                        bwd_row(gc + j * k, w.gomg, w.gkg, w.gq, racc, prev.c + j * k, cur.c + j * k, g.q, g.omg,
                                g.kg, go[j] / den, g.dca[j], g.dcb[j], g.vin[j], k);
                        w.gsnb[j] = g.keep * lane_sum(racc);
                        w.gsb[j] = g.keep * lane_sum(racc + L);
                        w.gvin[j] = lane_sum(racc + 2 * L);
                    }
                    bwd_projections(a, g, w, n, t, h);
                    // A restart before step t: the gradient of the memory it started from goes to that restart
                    // row (rows are used by one batch row only, so no other thread adds here), and nothing
                    // flows to what was carried in.
                    if (rr >= 0) {
                        S* rc = static_cast<S*>(a.grad_restart[0]) + (rr * a.h + h) * d * k;
                        S* rs = static_cast<S*>(a.grad_restart[1]) + (rr * a.h + h) * k;
                        for (int64_t x = 0; x < d * k; ++x) rc[x] += gc[x];
                        for (int64_t x = 0; x < k; ++x) rs[x] += gs[x];
                        std::fill(gc, gc + d * k, S(0));
                        std::fill(gs, gs + k, S(0));
                    }
                }
            }
            std::memcpy(static_cast<S*>(a.grad_state[0]) + (n * a.h + h) * d * k, gc, d * k * sizeof(S));
            std::memcpy(static_cast<S*>(a.grad_state[1]) + (n * a.h + h) * k, gs, k * sizeof(S));
        }
    }
}

}  // namespace

extern "C" {
int galite_abi_version() { return 2; }
void galite_forward_f32(const Args* a) { forward<float>(*a); }
void galite_forward_f64(const Args* a) { forward<double>(*a); }
void galite_backward_f32(const Args* a) { backward<float>(*a); }
void galite_backward_f64(const Args* a) { backward<double>(*a); }
}
