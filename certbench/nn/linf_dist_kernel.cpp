// CPU kernels for the l_p-distance layer y[b,j] = ||x_b - w_j||_p (Zhang et al. 2021, eq. (1)).
//
// Built on first use by certbench/nn/linf_dist.py (plain C ABI, called through ctypes) and
// checked there against the pure-PyTorch path; without a C++ compiler that path is used instead.
// float32, row-major contiguous x (B, I), w (O, I). No B*O*I temporary: every difference is
// recomputed where it is needed. Finite p uses the scaled form m * (sum (|d|/m)^p)^(1/p) with
// m = max|d| so nothing overflows at large p (all powers are of numbers in [0, 1]).
//
// Compile with -ffast-math for the compile step only: linking with it would add crtfastmath.o,
// which switches the whole process to flush-to-zero when the library is loaded.

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>
#if defined(__SSE2__)
#include <xmmintrin.h>
#endif

namespace {

typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
constexpr int64_t V = 16;  // lanes per vector
constexpr int64_t R = 4;   // weight rows per micro-kernel call
constexpr int64_t TILE = 64;
constexpr int64_t WORK_PER_THREAD = 1 << 22;  // |x - w| evaluations below which a thread is not worth starting

inline vf loadu(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
inline vf vabs(vf d) { return (vf)((vi)d & 0x7fffffff); }

// Powers of numbers in [0, 1] underflow constantly; denormal arithmetic is ~100x slower on x86.
// Flushing them to zero changes each result by less than 1e-38; the calling thread's mode is restored.
struct FlushDenormals {
#if defined(__SSE2__)
    unsigned saved = _mm_getcsr();
    FlushDenormals() { _mm_setcsr(saved | 0x8040); }  // FTZ | DAZ
    ~FlushDenormals() { _mm_setcsr(saved); }
#endif
};

// f(begin, end, thread_id) over [0, n) split into contiguous ranges; at most one thread per
// WORK_PER_THREAD of the total work.
template <class F>
void parallel_for(int64_t n, int nthreads, int64_t work, F f) {
    int64_t t = std::max<int64_t>(1, std::min<int64_t>({(int64_t)nthreads, n, work / WORK_PER_THREAD}));
    auto run = [&f](int64_t lo, int64_t hi, int64_t k) { FlushDenormals guard; f(lo, hi, k); };
    std::vector<std::thread> pool;
    for (int64_t k = 1; k < t; ++k) pool.emplace_back([=, &run] { run(n * k / t, n * (k + 1) / t, k); });
    run(0, n / t, 0);
    for (auto& th : pool) th.join();
}

// m[k] = max_i |x_i - w[k]_i| for R rows, and the first argmax when IDX.
template <bool IDX>
void max_abs_diff(const float* x, const float* const* w, int64_t I, float* m_out, int64_t* i_out) {
    vf m[R] = {};
    vi id[R] = {};
    vi lane;
    for (int l = 0; l < V; ++l) lane[l] = l;
    int64_t i = 0;
    for (; i + V <= I; i += V, lane += (int32_t)V) {
        vf xv = loadu(x + i);
        for (int k = 0; k < R; ++k) {
            vf a = vabs(xv - loadu(w[k] + i));
            vi gt = a > m[k];
            if (IDX) id[k] = gt ? lane : id[k];
            m[k] = gt ? a : m[k];
        }
    }
    for (int k = 0; k < R; ++k) {
        float best = 0.f;
        int64_t arg = 0;
        for (int l = 0; l < V; ++l)
            if (m[k][l] > best || (m[k][l] == best && id[k][l] < arg)) { best = m[k][l]; arg = id[k][l]; }
        for (int64_t j = i; j < I; ++j) {
            float a = std::fabs(x[j] - w[k][j]);
            if (a > best) { best = a; arg = j; }
        }
        m_out[k] = best;
        if (IDX) i_out[k] = arg;
    }
}

// t^E for t in [0, 1]: integer exponents by unrolled squaring, others through exp2(E log2 t).
template <int E>
struct IntPow {
    static inline float f(float t) {
        if constexpr (E == 0) return 1.f;
        else if constexpr (E == 1) return t;
        else {
            float h = IntPow<E / 2>::f(t * t);
            if constexpr (E % 2) return h * t; else return h;
        }
    }
    inline float operator()(float t) const { return f(t); }
};

// Clamped to the normal range: out-of-range lanes would send libmvec to its scalar fallback.
// (fmaxf, not std::max: only the former keeps the loop vectorised.)
struct RealPow {
    float e;
    inline float operator()(float t) const { return exp2f(fmaxf(e * log2f(fmaxf(t, FLT_MIN)), -126.f)); }
};

template <int E = 0, class F>
void with_pow(double e, F&& f) {
    if constexpr (E <= 16) {
        if (e == E) { f(IntPow<E>{}); return; }
        with_pow<E + 1>(e, f);
    } else {
        f(RealPow{(float)e});
    }
}

// sum_i pw(|x_i - w_i| * inv)
template <class P>
float pow_sum(const float* x, const float* w, int64_t I, float inv, P pw) {
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < I; ++i) s += pw(std::fabs(x[i] - w[i]) * inv);
    return s;
}

// gx_i += v_i, gw_i -= v_i with v_i = g sign(d_i) pw(|d_i| * inv), d = x - w
template <class P>
void pow_grad(const float* x, const float* w, int64_t I, float inv, float g, P pw, float* gx, float* gw) {
#pragma omp simd
    for (int64_t i = 0; i < I; ++i) {
        float d = x[i] - w[i];
        float v = g * (float)((d > 0.f) - (d < 0.f)) * pw(std::fabs(d) * inv);
        gx[i] += v;
        gw[i] -= v;
    }
}

}  // namespace

extern "C" {

// y[b,j] = ||x_b - w_j||_p (p = inf when p_is_inf); idx (may be NULL) receives the argmax for p = inf.
void linf_dist_forward(const float* x, const float* w, int64_t B, int64_t O, int64_t I, double p, int p_is_inf,
                       float* y, int64_t* idx, int nthreads) {
    int64_t nj = (O + TILE - 1) / TILE, nb = (B + TILE - 1) / TILE;
    with_pow(p_is_inf ? 1.0 : p, [&](auto pw) {
        parallel_for(nj * nb, nthreads, B * O * I, [&](int64_t lo, int64_t hi, int64_t) {
            for (int64_t item = lo; item < hi; ++item) {
                int64_t j0 = (item % nj) * TILE, b0 = (item / nj) * TILE;
                int64_t j1 = std::min(O, j0 + TILE), b1 = std::min(B, b0 + TILE);
                for (int64_t b = b0; b < b1; ++b) {
                    const float* xb = x + b * I;
                    for (int64_t j = j0; j < j1; j += R) {
                        int64_t nr = std::min(R, j1 - j);
                        const float* wr[R];
                        for (int64_t k = 0; k < R; ++k) wr[k] = w + (j + std::min(k, nr - 1)) * I;
                        float m[R];
                        int64_t arg[R];
                        if (p_is_inf && idx) max_abs_diff<true>(xb, wr, I, m, arg);
                        else max_abs_diff<false>(xb, wr, I, m, arg);
                        for (int64_t k = 0; k < nr; ++k) {
                            float out = m[k];
                            if (!p_is_inf && m[k] > 0.f)
                                out = m[k] * powf(pow_sum(xb, wr[k], I, 1.f / m[k], pw), (float)(1.0 / p));
                            y[b * O + j + k] = out;
                            if (p_is_inf && idx) idx[b * O + j + k] = arg[k];
                        }
                    }
                }
            }
        });
    });
}

// Finite p: gx[b,i] = sum_j g[b,j] sign(d) (|d|/y[b,j])^(p-1) and gw[j,i] = -sum_b (same),
// d = x_b - w_j (zero where y = 0). Each thread owns a range of weight rows; partial input
// gradients of threads other than the first go to private buffers and are summed at the end.
void linf_dist_backward(const float* x, const float* w, const float* g, const float* y, int64_t B, int64_t O,
                        int64_t I, double p, float* gx, float* gw, int nthreads) {
    const int64_t JB = 16;
    int64_t nt = std::max<int64_t>(1, std::min<int64_t>({(int64_t)nthreads, O, B * O * I / WORK_PER_THREAD}));
    std::vector<float> priv((size_t)((nt - 1) * B * I), 0.f);
    std::memset(gx, 0, sizeof(float) * B * I);
    std::memset(gw, 0, sizeof(float) * O * I);
    with_pow(p - 1.0, [&](auto pw) {
        parallel_for(O, (int)nt, B * O * I, [&](int64_t lo, int64_t hi, int64_t tid) {
            float* gxt = tid == 0 ? gx : priv.data() + (tid - 1) * B * I;
            for (int64_t j0 = lo; j0 < hi; j0 += JB) {
                int64_t j1 = std::min(hi, j0 + JB);
                for (int64_t b = 0; b < B; ++b) {
                    for (int64_t j = j0; j < j1; ++j) {
                        float yb = y[b * O + j], gb = g[b * O + j];
                        if (!(yb > 0.f) || gb == 0.f) continue;
                        pow_grad(x + b * I, w + j * I, I, 1.f / yb, gb, pw, gxt + b * I, gw + j * I);
                    }
                }
            }
        });
    });
    for (int64_t k = 1; k < nt; ++k) {
        const float* src = priv.data() + (k - 1) * B * I;
        for (int64_t e = 0; e < B * I; ++e) gx[e] += src[e];
    }
}

}  // extern "C"
