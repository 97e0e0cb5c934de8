// The AGaLiTe recurrence for CPU tensors as one pass per (environment, head): the reference's maths
// (agalite_triton/reference/recurrence.py), with the state of one head (R*E + R*D + E values, a few KiB)
// kept in L1 across the steps of a call instead of a dozen passes over (B, T, R, H, E) temporaries.
//
// Built at first use by agalite_triton/reference/cpu_fused.py (plain C++, no torch headers, so it
// compiles in about a second) and called through ctypes with raw pointers and element strides.
//
// Rounding follows the reference where it can: built with -ffp-contract=off (no fused multiply-adds),
// products and sums in the reference's order and dtype. The differences, all at rounding level:
// * float32 sigmoid pairs come from one float exp (see sigmoid_pair; within 2.7 ulp, torch's 2.5 ulp);
// * the read-out's dot products <tilde_k_j, Q>, <s, Q> are summed in double, per eta-row of qb then
//   times qa (the reference rounds Q = qa (x) qb to float and sums in float, in its own order);
// * float32 kernels flush subnormals to zero (see FlushSubnormals).
// The float64 kernels (the oracle dtype) use torch's sigmoid formula with the library exp, and keep
// subnormals.
//
// Work items (n, h) are independent and each is computed by one thread in a fixed order, so results
// are bitwise the same whatever the thread count.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <new>
#include <vector>

#include "cpu_fused_common.h"

namespace {

// How many heads ahead a one-step call prefetches the state (~3.5 KiB a head at the paper's size):
// far enough to cover DRAM latency once the state no longer fits in cache (measured best of 1, 4, 8, 16).
constexpr int64_t kPrefetchItems = 16;

// Mirrors the ctypes.Structure in cpu_fused.py field for field.
struct Args {
    const void* proj[8];  // keys, queries, values, beta, gamma: (N, T, H, D); p1, p2, p3: (N, T, H, eta)
    int64_t proj_stride[8][3];  // element strides of (n, t, h); the last dim is contiguous
    const void* dones;  // (N, T) bool (dones_bool) or in the compute dtype, or null
    int64_t dones_stride[2];
    int64_t dones_bool;
    const int64_t* tick;  // (B_s,) tick before the call
    int64_t tick_stride;
    const int64_t* slots;  // (N,) state row of each projection row, or null (row n)
    const float* table;  // (R, P) oscillator table: cos(residue * omega_j)
    int64_t period;
    const void* state_in[3];  // tilde_k (B_s, R, H, E), tilde_v (B_s, R, H, D), s (B_s, H, E)
    int64_t state_in_stride[3];  // batch strides; the rest of each row is contiguous
    void* state_out[3];  // same layout; may alias state_in
    int64_t state_out_stride[3];
    void* out;  // (N, T, H, D)
    int64_t out_stride[3];
    void* ckpt;  // (N, C, H, W), W = R*E + R*D + E: the state before steps 0, chunk, 2*chunk, ...; or null
    int64_t chunk;
    // Backward only.
    const void* grad_out;  // (N, T, H, D) contiguous
    const void* grad_final[3];  // state-shaped, contiguous, each may be null (zero)
    void* grad_proj[8];  // shaped like the projections
    int64_t grad_proj_stride[8][3];
    void* grad_state[3];  // contiguous, state-shaped
    // Restarts (TorchRL replay): where restart_index[n, t] = m >= 0 the memory before step t is row m of
    // restart_state instead of the carried one; residues[n, t] is then the oscillator residue of every step.
    const int64_t* restart_index;  // (N, T) contiguous, or null
    const int64_t* residues;  // (N, T) contiguous, or null (then tick + t + 1)
    const void* restart_state[3];  // (N_r, ...) shaped like the state rows; inner contiguous
    int64_t restart_stride[3];
    void* grad_restart[3];  // backward: (N_r, ...) contiguous, zero on entry, accumulated into
    int64_t n, t, h, d, eta, r;
    double eps;
    int64_t threads;
};

// Per-step factors of one (n, t, h): gates, feature factors and decays, all (eta,) or (D,) vectors.
template <typename S>
struct Gates {
    S *sp3, *snp3, *ka, *qa, *kp3, *knp3;  // (eta,)
    S *sg, *sng, *sb, *snb, *kb, *qb, *vin, *dv;  // (D,)
    double* qbd;  // (D,) qb in double, for the read-out's dot products
    S* osc;  // (R,)
    S keep = S(1);

    Gates() = default;
    Gates(Arena& ar, int64_t eta, int64_t d, int64_t r) {
        for (S** v : {&sp3, &snp3, &ka, &qa, &kp3, &knp3}) *v = ar.take<S>(eta);
        for (S** v : {&sg, &sng, &sb, &snb, &kb, &qb, &vin, &dv}) *v = ar.take<S>(d);
        qbd = ar.take<double>(d);
        osc = ar.take<S>(r);
    }

    void compute(const Args& a, int64_t n, int64_t t, int64_t h, int64_t residue0) {
        const int64_t residue = a.residues ? a.residues[n * a.t + t] : (residue0 + t + 1) % a.period;
        const int64_t d = a.d, eta = a.eta;
        const S* p[8];
        proj_rows(a.proj, a.proj_stride, n, t, h, p);
        keep = keep_at<S>(a, n, t);
        sigmoid_pair(p[4], sg, sng, d);
        sigmoid_pair(p[3], sb, snb, d);
        sigmoid_pair(p[7], sp3, snp3, eta);
        {
            S* __restrict kb_ = kb;
            S* __restrict qb_ = qb;
            S* __restrict vin_ = vin;
            S* __restrict dv_ = dv;
            const S* __restrict sg_ = sg;
            const S* __restrict sb_ = sb;
            const S* __restrict snb_ = snb;
            double* __restrict qbd_ = qbd;
            for (int64_t i = 0; i < d; ++i) {
                kb_[i] = sg_[i] * relu(p[0][i]);
                qb_[i] = relu(p[1][i]);
                qbd_[i] = qb_[i];
                vin_[i] = sb_[i] * p[2][i];
                dv_[i] = keep * snb_[i];
            }
        }
        for (int64_t m = 0; m < eta; ++m) {
            ka[m] = sp3[m] * relu(p[5][m]);
            qa[m] = relu(p[6][m]);
            kp3[m] = keep * sp3[m];
            knp3[m] = keep * snp3[m];
        }
        for (int64_t j = 0; j < a.r; ++j) osc[j] = static_cast<S>(a.table[j * a.period + residue]);
    }
};

// Pointers to one head's state: tilde_k_j at tk + j * tk_js, tilde_v_j at tv + j * tv_js, s at s.
template <typename S>
struct HeadState {
    S* tk;
    S* tv;
    S* s;
    int64_t tk_js, tv_js;
};

// Scratch of one thread: per-row factors and one step's read-out quantities.
template <typename S>
struct StepWork {
    S *dk, *kin;  // (D,) one eta-row of the decay and key features
    double* acc;  // (R + 1) * (kLanes + 1): lanes of <tilde_k_j, Q> and <s, Q> over a row, then totals
    S* sc;  // (R,)
    S nrm = S(0), den = S(1);

    StepWork(Arena& ar, int64_t d, int64_t r)
        : dk(ar.take<S>(d)), kin(ar.take<S>(d)), acc(ar.take<double>((r + 1) * (kLanes + 1))),
          sc(ar.take<S>(r)) {}
};

// dst = c * kin + dk * src over one D-row (dst may be src), and acc[l] += dst[i] * qb[i] for
// i = l mod kLanes, in double: one pass that updates a memory row and forms its part of <row, Q>.
template <typename S>
inline void update_row(S* dst, const S* src, const S* __restrict kin, const S* __restrict dk,
                       const double* __restrict qb, double* __restrict acc, S c, bool scaled, int64_t d) {
    int64_t i = 0;
    for (; i + kLanes <= d; i += kLanes) {
        S v[kLanes];
        for (int l = 0; l < kLanes; ++l) v[l] = (scaled ? c * kin[i + l] : kin[i + l]) + dk[i + l] * src[i + l];
        for (int l = 0; l < kLanes; ++l) {
            dst[i + l] = v[l];
            acc[l] += static_cast<double>(v[l]) * qb[i + l];
        }
    }
    for (int l = 0; i + l < d; ++l) {
        const S v = (scaled ? c * kin[i + l] : kin[i + l]) + dk[i + l] * src[i + l];
        dst[i + l] = v;
        acc[l] += static_cast<double>(v) * qb[i + l];
    }
}

// One step of one head: src -> dst (they may be the same memory), read-out into out (or skipped).
// <tilde_k_j, Q> = sum_m qa[m] sum_i tilde_k_j[m, i] qb[i], summed in double from the exact products
// (the reference rounds Q = qa (x) qb to float first: a rounding-level difference).
template <typename S>
void step(const Args& a, const Gates<S>& g, StepWork<S>& w, const HeadState<S>& src, const HeadState<S>& dst,
          S* out) {
    const int64_t d = a.d, eta = a.eta, r = a.r;
    double* total = w.acc + (r + 1) * kLanes;  // (R + 1,) sums over the rows
    std::fill(total, total + r + 1, 0.0);
    for (int64_t m = 0; m < eta; ++m) {
        const int64_t e0 = m * d;
        {
            S* __restrict dk = w.dk;
            S* __restrict kin = w.kin;
            const S* __restrict sng = g.sng;
            const S* __restrict kb = g.kb;
            const S kp3 = g.kp3[m], knp3 = g.knp3[m], ka = g.ka[m];
            for (int64_t i = 0; i < d; ++i) {
                dk[i] = kp3 * sng[i] + knp3;
                kin[i] = ka * kb[i];
            }
        }
        std::fill(w.acc, w.acc + (r + 1) * kLanes, 0.0);
        update_row(dst.s + e0, src.s + e0, w.kin, w.dk, g.qbd, w.acc + r * kLanes, S(1), false, d);
        for (int64_t j = 0; j < r; ++j)
            update_row(dst.tk + j * dst.tk_js + e0, src.tk + j * src.tk_js + e0, w.kin, w.dk, g.qbd,
                       w.acc + j * kLanes, g.osc[j], true, d);
        const double qa = g.qa[m];
        for (int64_t j = 0; j <= r; ++j) total[j] += qa * hsum(w.acc + j * kLanes);
    }
    for (int64_t j = 0; j < r; ++j) w.sc[j] = static_cast<S>(total[j]);
    w.nrm = static_cast<S>(total[r]);
    // 2 R <s, Q> + eps, as the reference: the integer 2R times the rounded norm, then eps in the dtype.
    w.den = w.nrm * static_cast<S>(2 * r) + static_cast<S>(a.eps);
    for (int64_t j = 0; j < r; ++j) {
        const S* v0 = src.tv + j * src.tv_js;
        S* v1 = dst.tv + j * dst.tv_js;
        const S c = g.osc[j];
        for (int64_t i = 0; i < d; ++i) v1[i] = c * g.vin[i] + g.dv[i] * v0[i];
    }
    if (out == nullptr) return;
    for (int64_t i = 0; i < d; ++i) {
        S kv = S(0);
        for (int64_t j = 0; j < r; ++j) kv = kv + dst.tv[j * dst.tv_js + i] * w.sc[j];
        out[i] = kv / w.den;
    }
}

template <typename S>
HeadState<S> state_of(const Args& a, void* const* base, const int64_t* stride, int64_t row, int64_t h) {
    const int64_t e = a.eta * a.d;
    return HeadState<S>{static_cast<S*>(base[0]) + row * stride[0] + h * e,
                        static_cast<S*>(base[1]) + row * stride[1] + h * a.d,
                        static_cast<S*>(base[2]) + row * stride[2] + h * e, a.h * e, a.h * a.d};
}

// A head's state packed contiguously (tilde_k rows, tilde_v rows, s), as checkpoints store it.
template <typename S>
HeadState<S> packed(S* p, int64_t r, int64_t d, int64_t e) {
    return HeadState<S>{p, p + r * e, p + r * e + r * d, e, d};
}

template <typename S>
void copy_state(const HeadState<S>& from, const HeadState<S>& to, int64_t r, int64_t d, int64_t e) {
    for (int64_t j = 0; j < r; ++j) {
        std::memcpy(to.tk + j * to.tk_js, from.tk + j * from.tk_js, e * sizeof(S));
        std::memcpy(to.tv + j * to.tv_js, from.tv + j * from.tv_js, d * sizeof(S));
    }
    std::memcpy(to.s, from.s, e * sizeof(S));
}

// The restart row that replaces the memory before step t of projection row n, or -1.
inline int64_t restart_row(const Args& a, int64_t n, int64_t t) {
    return a.restart_index ? a.restart_index[n * a.t + t] : -1;
}

inline int64_t width(const Args& a) { return a.r * a.eta * a.d + a.r * a.d + a.eta * a.d; }

inline int64_t chunks(const Args& a) { return (a.t + a.chunk - 1) / a.chunk; }

// A one-step call streams every head's state from memory once: ask for the next head's lines while
// this one computes (each head is a few short rows, too short for the hardware prefetcher to ramp up).
template <typename S>
void prefetch_item(const Args& a, void* const* base, int64_t item) {
    const int64_t n = item / a.h, h = item % a.h, e = a.eta * a.d;
    const int64_t row = a.slots ? a.slots[n] : n;
    const HeadState<S> st = state_of<S>(a, base, a.state_in_stride, row, h);
    constexpr int64_t line = 64 / sizeof(S);
    for (int64_t j = 0; j < a.r; ++j) {
        for (int64_t x = 0; x < e; x += line) __builtin_prefetch(st.tk + j * st.tk_js + x, 1);
        for (int64_t x = 0; x < a.d; x += line) __builtin_prefetch(st.tv + j * st.tv_js + x, 1);
    }
    for (int64_t x = 0; x < e; x += line) __builtin_prefetch(st.s + x, 1);
    for (int i = 0; i < 8; ++i) {
        const S* p = static_cast<const S*>(a.proj[i]) + n * a.proj_stride[i][0] + h * a.proj_stride[i][2];
        for (int64_t x = 0; x < (i < 5 ? a.d : a.eta); x += line) __builtin_prefetch(p + x, 0);
    }
}

template <typename S>
void forward(const Args& a) {
    const int64_t items = a.n * a.h, e = a.eta * a.d, wd = width(a);
    void* const in_base[3] = {const_cast<void*>(a.state_in[0]), const_cast<void*>(a.state_in[1]),
                              const_cast<void*>(a.state_in[2])};
    // Tiny calls (one env, a few heads) run on the calling thread: a parallel region costs more.
#pragma omp parallel num_threads(a.threads) if (items * a.t * wd >= 32768 && a.threads > 1)
    {
        const FlushSubnormals<S> flush;
        Arena& ar = tl_arena;
        ar.reset();
        Gates<S> g(ar, a.eta, a.d, a.r);
        StepWork<S> w(ar, a.d, a.r);
#pragma omp for schedule(static)
        for (int64_t item = 0; item < items; ++item) {
            const int64_t n = item / a.h, h = item % a.h;
            const int64_t row = a.slots ? a.slots[n] : n;
            const HeadState<S> src = state_of<S>(a, in_base, a.state_in_stride, row, h);
            const HeadState<S> dst = state_of<S>(a, a.state_out, a.state_out_stride, row, h);
            const int64_t residue0 = floor_mod(a.tick[row * a.tick_stride], a.period);
            if (a.t == 1 && item + kPrefetchItems < items) prefetch_item<S>(a, in_base, item + kPrefetchItems);
            void* const restart_base[3] = {const_cast<void*>(a.restart_state[0]),
                                           const_cast<void*>(a.restart_state[1]),
                                           const_cast<void*>(a.restart_state[2])};
            for (int64_t t = 0; t < a.t; ++t) {
                const HeadState<S>& carried = t == 0 ? src : dst;
                if (a.ckpt != nullptr && t % a.chunk == 0) {
                    S* c = static_cast<S*>(a.ckpt) + ((n * chunks(a) + t / a.chunk) * a.h + h) * wd;
                    copy_state(carried, packed(c, a.r, a.d, e), a.r, a.d, e);
                }
                const int64_t m = restart_row(a, n, t);
                const HeadState<S> cur = m < 0 ? carried : state_of<S>(a, restart_base, a.restart_stride, m, h);
                g.compute(a, n, t, h, residue0);
                S* out = static_cast<S*>(a.out) + n * a.out_stride[0] + t * a.out_stride[1] + h * a.out_stride[2];
                step(a, g, w, cur, dst, out);
            }
        }
    }
}

// The backward's row loops, as functions of restrict pointers so that they vectorise.
template <typename S>
void bwd_value_row(S* __restrict gtv, S* __restrict gvin, S* __restrict gdv, const S* __restrict gkv,
                   const S* __restrict tv0, const S* __restrict dv, S scj, S oj, int64_t d) {
    for (int64_t i = 0; i < d; ++i) {
        const S gt = gtv[i] + gkv[i] * scj;
        gvin[i] = gvin[i] + oj * gt;
        gdv[i] = gdv[i] + gt * tv0[i];
        gtv[i] = dv[i] * gt;
    }
}

template <typename S>
void bwd_norm_row(S* __restrict gs, S* __restrict q, S* __restrict dk, S* __restrict gq, S* __restrict gkin,
                  S* __restrict gdk, const S* __restrict s1, const S* __restrict s0, const S* __restrict qb,
                  const S* __restrict sng, S qa, S kp3, S knp3, S gnrm, int64_t d) {
    for (int64_t i = 0; i < d; ++i) {
        q[i] = qa * qb[i];
        dk[i] = kp3 * sng[i] + knp3;
        const S gse = gs[i] + gnrm * q[i];
        gq[i] = gnrm * s1[i];
        gkin[i] = gse;
        gdk[i] = gse * s0[i];
        gs[i] = dk[i] * gse;
    }
}

template <typename S>
void bwd_key_row(S* __restrict gtk, S* __restrict gq, S* __restrict gkin, S* __restrict gdk, const S* __restrict q,
                 const S* __restrict dk, const S* __restrict k1, const S* __restrict k0, S gscj, S oj, int64_t d) {
    for (int64_t i = 0; i < d; ++i) {
        const S gt = gtk[i] + gscj * q[i];
        gq[i] = gq[i] + gscj * k1[i];
        gkin[i] = gkin[i] + oj * gt;
        gdk[i] = gdk[i] + gt * k0[i];
        gtk[i] = dk[i] * gt;
    }
}

template <typename S>
void bwd_factor_row(S* __restrict gqb, S* __restrict gkb, S* __restrict gsng, const S* __restrict gq,
                    const S* __restrict gkin, const S* __restrict gdk, S qa, S ka, S sp3, int64_t d) {
    for (int64_t i = 0; i < d; ++i) {
        gqb[i] = gqb[i] + gq[i] * qa;
        gkb[i] = gkb[i] + gkin[i] * ka;
        gsng[i] = gsng[i] + gdk[i] * sp3;
    }
}

// Gradients of keys, queries, values, beta, gamma for one (n, t, h).
template <typename S>
void bwd_head_inputs(S* __restrict gk, S* __restrict gq, S* __restrict gv, S* __restrict gb, S* __restrict gg,
                     const S* __restrict k, const S* __restrict q, const S* __restrict v, const S* __restrict gkb,
                     const S* __restrict gqb, const S* __restrict gvin, const S* __restrict gdv,
                     const S* __restrict gsng, const S* __restrict sg, const S* __restrict sng,
                     const S* __restrict sb, const S* __restrict snb, S keep, int64_t d) {
    for (int64_t i = 0; i < d; ++i) {
        gk[i] = k[i] > S(0) ? gkb[i] * sg[i] : S(0);
        gq[i] = q[i] > S(0) ? gqb[i] : S(0);
        gv[i] = gvin[i] * sb[i];
        gb[i] = (gvin[i] * v[i] - keep * gdv[i]) * (sb[i] * snb[i]);
        gg[i] = (gkb[i] * relu(k[i]) - keep * gsng[i]) * (sg[i] * sng[i]);
    }
}

// Reverse-mode through one call, per head: each chunk of steps is recomputed from its checkpoint into
// a thread-local buffer (states and gates: a few hundred KiB, so it stays in L2), then walked
// backwards. Gradients of the carried state (gtk, gs, gtv) flow from the last step to the first and end
// in grad_state. Every loop runs over a contiguous D-row, so it vectorises.
template <typename S>
void backward(const Args& a) {
    const int64_t items = a.n * a.h, e = a.eta * a.d, wd = width(a), d = a.d, eta = a.eta, r = a.r;
    const int64_t nch = chunks(a);
#pragma omp parallel num_threads(a.threads) if (items * a.t * wd >= 32768 && a.threads > 1)
    {
        const FlushSubnormals<S> flush;
        Arena& ar = tl_arena;
        ar.reset();
        Gates<S>* gates = ar.take<Gates<S>>(a.chunk);
        for (int64_t c = 0; c < a.chunk; ++c) new (gates + c) Gates<S>(ar, eta, d, r);
        StepWork<S> w(ar, d, r);
        S* states = ar.take<S>((a.chunk + 1) * wd);  // the state before each step of a chunk, and after its last
        S* rbuf = ar.take<S>(wd);  // a restart memory, packed, when a step starts from one
        S* sc_t = ar.take<S>(a.chunk * r);
        S* den_t = ar.take<S>(a.chunk);
        S* gtk = ar.take<S>(r * e);
        S* gs = ar.take<S>(e);
        S* gtv = ar.take<S>(r * d);
        S *kv = ar.take<S>(d), *gkv = ar.take<S>(d), *gvin = ar.take<S>(d), *gdv = ar.take<S>(d);
        S *gsng = ar.take<S>(d), *gqb = ar.take<S>(d), *gkb = ar.take<S>(d), *q = ar.take<S>(d);
        S *dk = ar.take<S>(d), *gq = ar.take<S>(d), *gkin = ar.take<S>(d), *gdk = ar.take<S>(d);
        S* ones = ar.take<S>(d);
        std::fill(ones, ones + d, S(1));
        double *gqa = ar.take<double>(eta), *gka = ar.take<double>(eta);
        double *gsp3dk = ar.take<double>(eta), *gsnp3 = ar.take<double>(eta);
        S* gsc = ar.take<S>(r);
        double acc[4 * kLanes];
#pragma omp for schedule(static)
        for (int64_t item = 0; item < items; ++item) {
            const int64_t n = item / a.h, h = item % a.h;
            const int64_t residue0 = floor_mod(a.tick[n * a.tick_stride], a.period);
            void* const restart_base[3] = {const_cast<void*>(a.restart_state[0]),
                                           const_cast<void*>(a.restart_state[1]),
                                           const_cast<void*>(a.restart_state[2])};
            const S* fk = static_cast<const S*>(a.grad_final[0]);
            const S* fv = static_cast<const S*>(a.grad_final[1]);
            const S* fs = static_cast<const S*>(a.grad_final[2]);
            for (int64_t j = 0; j < r; ++j) {
                for (int64_t x = 0; x < e; ++x) gtk[j * e + x] = fk ? fk[((n * r + j) * a.h + h) * e + x] : S(0);
                for (int64_t x = 0; x < d; ++x) gtv[j * d + x] = fv ? fv[((n * r + j) * a.h + h) * d + x] : S(0);
            }
            for (int64_t x = 0; x < e; ++x) gs[x] = fs ? fs[(n * a.h + h) * e + x] : S(0);
            for (int64_t c = nch - 1; c >= 0; --c) {
                const int64_t t0 = c * a.chunk, t1 = std::min(a.t, t0 + a.chunk);
                const S* ck = static_cast<const S*>(a.ckpt) + ((n * nch + c) * a.h + h) * wd;
                std::memcpy(states, ck, wd * sizeof(S));
                for (int64_t t = t0; t < t1; ++t) {
                    Gates<S>& g = gates[t - t0];
                    g.compute(a, n, t, h, residue0);
                    HeadState<S> prev = packed(states + (t - t0) * wd, r, d, e);
                    const int64_t m = restart_row(a, n, t);
                    if (m >= 0) {  // the step starts from the restart memory; the slot keeps step t - 1's state
                        prev = packed(rbuf, r, d, e);
                        copy_state(state_of<S>(a, restart_base, a.restart_stride, m, h), prev, r, d, e);
                    }
                    const HeadState<S> cur = packed(states + (t - t0 + 1) * wd, r, d, e);
                    step(a, g, w, prev, cur, static_cast<S*>(nullptr));
                    for (int64_t j = 0; j < r; ++j) sc_t[(t - t0) * r + j] = w.sc[j];
                    den_t[t - t0] = w.den;
                }
                for (int64_t t = t1 - 1; t >= t0; --t) {
                    const Gates<S>& g = gates[t - t0];
                    const int64_t rr = restart_row(a, n, t);
                    HeadState<S> prev = packed(states + (t - t0) * wd, r, d, e);
                    if (rr >= 0) {
                        prev = packed(rbuf, r, d, e);
                        copy_state(state_of<S>(a, restart_base, a.restart_stride, rr, h), prev, r, d, e);
                    }
                    const HeadState<S> cur = packed(states + (t - t0 + 1) * wd, r, d, e);
                    const S* sc = &sc_t[(t - t0) * r];
                    const S den = den_t[t - t0];
                    const S* go = static_cast<const S*>(a.grad_out) + ((n * a.t + t) * a.h + h) * d;
                    // out = kv / den, recomputed as the forward did: d kv = g / den, d den = -sum g * out / den.
                    {
                        S* __restrict kv_ = kv;
                        S* __restrict gkv_ = gkv;
                        for (int64_t i = 0; i < d; ++i) kv_[i] = S(0);
                        for (int64_t j = 0; j < r; ++j) {
                            const S* __restrict tv = cur.tv + j * d;
                            const S scj = sc[j];
                            for (int64_t i = 0; i < d; ++i) kv_[i] = kv_[i] + tv[i] * scj;
                        }
                        for (int64_t i = 0; i < d; ++i) {
                            kv_[i] = kv_[i] / den;
                            gkv_[i] = go[i] / den;
                        }
                    }
                    std::fill(acc, acc + kLanes, 0.0);
                    dot_acc(acc, go, kv, d);
                    const S gnrm = static_cast<S>(-hsum(acc) / static_cast<double>(den) * (2.0 * r));
                    for (int64_t j = 0; j < r; ++j) {
                        std::fill(acc, acc + kLanes, 0.0);
                        dot_acc(acc, gkv, cur.tv + j * d, d);
                        gsc[j] = static_cast<S>(hsum(acc));
                    }
                    // tilde_v_j = osc_j vin + dv tilde_v_j(prev).
                    std::fill(gvin, gvin + d, S(0));
                    std::fill(gdv, gdv + d, S(0));
                    for (int64_t j = 0; j < r; ++j)
                        bwd_value_row(gtv + j * d, gvin, gdv, gkv, prev.tv + j * d,
                                      g.dv, sc[j], g.osc[j], d);
                    // The feature rows: tilde_k_j, s, Q and their eta x D factors.
                    std::fill(gsng, gsng + d, S(0));
                    std::fill(gqb, gqb + d, S(0));
                    std::fill(gkb, gkb + d, S(0));
                    for (int64_t m = 0; m < eta; ++m) {
                        const int64_t e0 = m * d;
                        bwd_norm_row(gs + e0, q, dk, gq, gkin, gdk,
                                     cur.s + e0, prev.s + e0, g.qb, g.sng, g.qa[m], g.kp3[m],
                                     g.knp3[m], gnrm, d);
                        for (int64_t j = 0; j < r; ++j)
                            bwd_key_row(gtk + j * e + e0, gq, gkin, gdk, q,
                                        dk, cur.tk + j * e + e0, prev.tk + j * e + e0, gsc[j], g.osc[j], d);
                        std::fill(acc, acc + 4 * kLanes, 0.0);
                        dot_acc(acc, gq, g.qb, d);
                        dot_acc(acc + kLanes, gkin, g.kb, d);
                        dot_acc(acc + 2 * kLanes, gdk, g.sng, d);
                        dot_acc(acc + 3 * kLanes, gdk, ones, d);
                        gqa[m] = hsum(acc);
                        gka[m] = hsum(acc + kLanes);
                        gsp3dk[m] = hsum(acc + 2 * kLanes);
                        gsnp3[m] = hsum(acc + 3 * kLanes);
                        bwd_factor_row(gqb, gkb, gsng, gq, gkin, gdk,
                                       g.qa[m], g.ka[m], g.sp3[m], d);
                    }
                    // Factor gradients into the projections (sigma' = sigma(x) sigma(-x), as the reference).
                    const S* p[8];
                    S* gp[8];
                    proj_rows(a.proj, a.proj_stride, n, t, h, p);
                    proj_rows(a.grad_proj, a.grad_proj_stride, n, t, h, gp);
                    const S keep = g.keep;
                    bwd_head_inputs(gp[0], gp[1], gp[2], gp[3], gp[4], p[0], p[1], p[2], gkb, gqb,
                                    gvin, gdv, gsng, g.sg, g.sng, g.sb,
                                    g.snb, keep, d);
                    for (int64_t m = 0; m < eta; ++m) {
                        const S gka_m = static_cast<S>(gka[m]);
                        gp[5][m] = p[5][m] > S(0) ? gka_m * g.sp3[m] : S(0);
                        gp[6][m] = p[6][m] > S(0) ? static_cast<S>(gqa[m]) : S(0);
                        const S gsp3 = gka_m * relu(p[5][m]) + keep * static_cast<S>(gsp3dk[m]);
                        gp[7][m] = (gsp3 - keep * static_cast<S>(gsnp3[m])) * (g.sp3[m] * g.snp3[m]);
                    }
                    // A restart before step t: the gradient of the memory it started from goes to that
                    // restart row (rows are used by one batch row only, so no other thread adds here), and
                    // nothing flows to what was carried in.
                    if (rr >= 0) {
                        S* rk = static_cast<S*>(a.grad_restart[0]);
                        S* rv = static_cast<S*>(a.grad_restart[1]);
                        S* rs = static_cast<S*>(a.grad_restart[2]) + (rr * a.h + h) * e;
                        for (int64_t j = 0; j < r; ++j) {
                            S* k = rk + ((rr * r + j) * a.h + h) * e;
                            S* v = rv + ((rr * r + j) * a.h + h) * d;
                            for (int64_t x = 0; x < e; ++x) k[x] += gtk[j * e + x];
                            for (int64_t x = 0; x < d; ++x) v[x] += gtv[j * d + x];
                        }
                        for (int64_t x = 0; x < e; ++x) rs[x] += gs[x];
                        std::fill(gtk, gtk + r * e, S(0));
                        std::fill(gtv, gtv + r * d, S(0));
                        std::fill(gs, gs + e, S(0));
                    }
                }
            }
            S* gk = static_cast<S*>(a.grad_state[0]);
            S* gv = static_cast<S*>(a.grad_state[1]);
            S* gsn = static_cast<S*>(a.grad_state[2]);
            for (int64_t j = 0; j < r; ++j) {
                std::memcpy(gk + ((n * r + j) * a.h + h) * e, &gtk[j * e], e * sizeof(S));
                std::memcpy(gv + ((n * r + j) * a.h + h) * d, &gtv[j * d], d * sizeof(S));
            }
            std::memcpy(gsn + (n * a.h + h) * e, gs, e * sizeof(S));
        }
    }
}

}  // namespace

extern "C" {
int agalite_abi_version() { return 4; }
void agalite_forward_f32(const Args* a) { forward<float>(*a); }
void agalite_forward_f64(const Args* a) { forward<double>(*a); }
void agalite_backward_f32(const Args* a) { backward<float>(*a); }
void agalite_backward_f64(const Args* a) { backward<double>(*a); }
}
