// Exact proximal operator of the 2:4 regularizer (ProxSparse / Kuebler et al. 2025), CPU kernel.
//
// For every group of four consecutive weights y it returns
//
//     argmin_x 0.5 ||x - y||^2 + lam * (|x1 x2 x3| + |x1 x2 x4| + |x1 x3 x4| + |x2 x3 x4|).
//
// Plain C++ (no torch headers) loaded with ctypes by minisparse/prox.py; the derivation of every step
// is in the docstring of minisparse/prox.py.  Work per group is done in float64 after normalising the
// group by its largest magnitude (the problem is scale invariant: (z, lam) ~ (c z, lam / c)), so
// float32 and float64 inputs of any magnitude are handled alike.  Groups are independent; OpenMP
// splits them over threads.
//
// Summary of the algorithm, for z = sorted |y| (z1 >= z2 >= z3 >= z4 >= 0):
//   * 2-sparse candidate (z1, z2, 0, 0);
//   * 3-sparse candidate: the unique interior critical point of
//         g3(w) = 0.5 ||w - z_{1:3}||^2 + lam w1 w2 w3
//     with a positive semidefinite Hessian.  With s = lam * w3 the stationarity conditions of w1, w2
//     are linear and give w1 = m/(1+s) + d/(1-s), w2 = m/(1+s) - d/(1-s) (m, d = half sum and half
//     difference of z1, z2); the remaining condition is G(s) = s - lam z3 + lam^2 W(s) = 0 with
//     W(s) = m^2/(1+s)^2 - d^2/(1-s)^2.  G is convex then concave (inflection at
//     (1-k)/(1+k), k = sqrt(d/m)), the wanted root is its unique upward crossing, and Newton's method
//     started at the inflection point converges to it monotonically (or proves there is none).
//   * dense candidate: with t = w4 fixed, the remaining three coordinates solve a 3-sparse problem in
//     u = w_{1:3} + t with data z_{1:3} + t + lam t^2.  The dense critical point is the upward
//     crossing of R(t) = t - z4 + lam * e2(w_{1:3}(t)) (the derivative of the partial minimum D(t)).
//     R(0) < 0: Newton's method on (s, t), verified (positive, sorted, PSD Hessian).  R(0) >= 0 and
//     R'(0) >= 0: the 3-sparse point lies in the convex region of g, so the dense point cannot beat
//     it.  Otherwise: interval certificate, then a certified walk along t (e2(w(t)) non-increasing and
//     R' <= 1 give lower bounds of D on intervals) that brackets the crossing or proves that nothing on
//     the path beats the best candidate.
//   * the candidate of least objective wins (ties go to the sparser one); order and signs restored.
//
// Driver: chunks of 256 groups per OpenMP thread go through stages that work on full SIMD blocks
// (GCC/Clang vector extensions, 4 doubles a register with AVX2 and 8 with AVX-512; plain loops
// otherwise): sort + certificates for all groups, which
// also writes the output of every group they settle (most of them at large lam); the 3-sparse
// Newton iteration for the rest; the dense Newton iteration for those with R(0) < 0; the scalar
// certified path for the few left; then unsort/signs/scale for the groups past stage 1.

#include <algorithm>
#include <cmath>
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
#include <cstdint>
#include <cstring>
#ifdef _OPENMP
#include <omp.h>
#endif
// AVX-512 with VL and DQ and a compiler with __builtin_shufflevector (GCC 12, Clang): stage 1 takes
// eight groups a step and compresses the data of the groups it lists into their slots
#if defined(__AVX512F__) && defined(__AVX512VL__) && defined(__AVX512DQ__) && (defined(__clang__) || __GNUC__ >= 12)
#define MS_L8 1
#include <immintrin.h>
#endif

namespace {

constexpr double IDENT_REL = 5.551115123125783e-17;  // 2^-54: below half an ulp of a double, relative

struct Cfg {
    double tol;   // relative change that ends a Newton iteration
    int maxit;    // cap on the iterations of any one Newton iteration
};

struct Stats {
    int64_t n2 = 0, n3 = 0, n4 = 0;  // winners
    int64_t fallback = 0;            // groups that needed the dense branch-and-bound
    int64_t capped = 0;              // Newton iterations that hit maxit
};

// ---------------------------------------------------------------------------------------------
// 3-sparse problem: interior PSD critical point of 0.5||u - z||^2 + lam u1 u2 u3, z1 >= z2 >= z3.
// Returns false when there is none (then the 3-sparse optimum lies on the boundary u3 = 0 or
// u2 = 0, i.e. it is 2-sparse, and the 2-sparse candidate dominates it).
// On success: s = lam u3, u1, u2, u3, and Gp = dG/ds > 0 at the root (used by callers for
// derivatives).
struct Sp3 {
    double s, u1, u2, u3, r1, r2, gp;
};

inline void g_eval(double s, double m, double d, double lam, double lam2, double z3, double& G,
                   double& Gp, double& r1, double& r2) {
    r1 = 1.0 / (1.0 + s);
    r2 = d > 0.0 ? 1.0 / (1.0 - s) : 0.0;
    const double a = m * r1, b = d * r2;
    G = s - lam * z3 + lam2 * (a * a - b * b);
    Gp = 1.0 - 2.0 * lam2 * (a * a * r1 + b * b * r2);
}

inline bool sp3(double z1, double z2, double z3, double lam, const Cfg& cfg, Stats& st, Sp3& out) {
    if (!(z3 > 0.0) || !(lam > 0.0)) return false;
    const double m = 0.5 * (z1 + z2), d = 0.5 * (z1 - z2);
    const double lam2 = lam * lam;
    const double se = std::min(lam * z3, z2 / z1);
    const double k = std::sqrt(d / m);
    double s = std::min(std::max((1.0 - k) / (1.0 + k), 0.0), se);
    double G, Gp, r1, r2;
    g_eval(s, m, d, lam, lam2, z3, G, Gp, r1, r2);
    if (!(Gp > 0.0)) return false;  // G' is largest here: G never increases, no upward crossing
    if (G != 0.0) {
        const bool right = G < 0.0;  // concave part (move right) or convex part (move left)
        int it = 0;
        for (;;) {
            if (++it > cfg.maxit) {
                st.capped++;
                break;
            }
            const double ns = s - G / Gp;
            if (right ? !(ns <= se) : !(ns >= 0.0)) return false;  // left the domain: no crossing
            if (right ? !(ns > s) : !(ns < s)) break;                // no progress: converged
            const bool done = std::fabs(ns - s) <= cfg.tol * ns;
            s = ns;
            g_eval(s, m, d, lam, lam2, z3, G, Gp, r1, r2);
            if (!(Gp > 0.0)) return false;  // passed the extremum of G without a root
            if (done || G == 0.0) break;
        }
    }
    const double a = m * r1, b = d * r2;
    out.s = s;
    out.u1 = a + b;
    out.u2 = a - b;
    out.u3 = s / lam;
    out.r1 = r1;
    out.r2 = r2;
    out.gp = Gp;
    return out.u2 > 0.0 && out.u3 > 0.0;
}

// Newton's method on G from a guess s0 (no safeguards).  Any root of G in [0, se] with G' > 0 is
// the unique upward crossing, so a converged iterate that passes this check is the answer;
// otherwise the safeguarded sp3 decides.
inline bool sp3_warm(double z1, double z2, double z3, double lam, double s0, const Cfg& cfg, Stats& st, Sp3& out) {
    if (!(z3 > 0.0) || !(lam > 0.0)) return false;
    const double m = 0.5 * (z1 + z2), d = 0.5 * (z1 - z2);
    const double lam2 = lam * lam;
    const double se = std::min(lam * z3, z2 / z1);
    // G' is largest at the inflection point: if it is not positive there, there is no crossing
    const double k = std::sqrt(d / m);
    const double sc = std::min(std::max((1.0 - k) / (1.0 + k), 0.0), se);
    double G, Gp, r1, r2;
    g_eval(sc, m, d, lam, lam2, z3, G, Gp, r1, r2);
    if (!(Gp > 0.0)) return false;
    double s = s0;
    bool conv = false;
    if (s > 0.0 && s < se) {
        g_eval(s, m, d, lam, lam2, z3, G, Gp, r1, r2);
        for (int it = 0; it < 6 && Gp > 0.0; ++it) {
            const double ns = s - G / Gp;
            if (!(ns > 0.0 && ns <= se)) break;
            const bool done = std::fabs(ns - s) <= cfg.tol * ns;
            s = ns;
            g_eval(s, m, d, lam, lam2, z3, G, Gp, r1, r2);
            if (done) {
                conv = Gp > 0.0;
                break;
            }
        }
    }
    if (!conv) return sp3(z1, z2, z3, lam, cfg, st, out);
    const double a = m * r1, b = d * r2;
    out.s = s;
    out.u1 = a + b;
    out.u2 = a - b;
    out.u3 = s / lam;
    out.r1 = r1;
    out.r2 = r2;
    out.gp = Gp;
    return out.u2 > 0.0 && out.u3 > 0.0;
}

// ---------------------------------------------------------------------------------------------
// Dense problem, nested form.  For t = w4 >= 0 the inner problem over w_{1:3} is the 3-sparse
// problem in u = w + t with data z_{1:3} + c, c = t + lam t^2.
struct Pt {
    bool ok;            // inner PSD critical point exists
    double t, s, sp, w1, w2, w3;  // sp = ds/dt
    double E, R, Rp;    // e2(w_{1:3}), R = t - z4 + lam E, dR/dt along the inner solution
    double D;           // objective of the point (w1, w2, w3, t) (a feasible point if w3 >= 0)
};

inline double obj4(const double* z, double w1, double w2, double w3, double w4, double lam) {
    const double a = w1 - z[0], b = w2 - z[1], c = w3 - z[2], e = w4 - z[3];
    const double e3 = w1 * w2 * (w3 + w4) + w3 * w4 * (w1 + w2);
    return 0.5 * (a * a + b * b + c * c + e * e) + lam * e3;
}

// Fill a Pt from the inner solution q at t (shift c = t + lam t^2).
inline void make_pt(const double* z, double lam, double t, const Sp3& q, Pt& p) {
    const double c = t + lam * t * t;
    p.ok = true;
    p.t = t;
    p.s = q.s;
    p.w1 = q.u1 - t;
    p.w2 = q.u2 - t;
    p.w3 = q.u3 - t;
    p.E = p.w1 * p.w2 + p.w1 * p.w3 + p.w2 * p.w3;
    p.R = t - z[3] + lam * p.E;
    // derivatives through c: G(s; c) = s - lam (z3 + c) + lam^2 ((m + c)^2 r1^2 - d^2 r2^2)
    const double mc = 0.5 * (z[0] + z[1]) + c, d = 0.5 * (z[0] - z[1]);
    const double dGdc = -lam + 2.0 * lam * lam * mc * q.r1 * q.r1;
    const double dsdc = -dGdc / q.gp;
    const double du1 = q.r1 + (-mc * q.r1 * q.r1 + d * q.r2 * q.r2) * dsdc;
    const double du2 = q.r1 + (-mc * q.r1 * q.r1 - d * q.r2 * q.r2) * dsdc;
    const double du3 = dsdc / lam;
    const double dcdt = 1.0 + 2.0 * lam * t;
    p.sp = dsdc * dcdt;
    const double dw1 = du1 * dcdt - 1.0, dw2 = du2 * dcdt - 1.0, dw3 = du3 * dcdt - 1.0;
    const double dE = dw1 * (p.w2 + p.w3) + dw2 * (p.w1 + p.w3) + dw3 * (p.w1 + p.w2);
    p.Rp = 1.0 + lam * dE;
    p.D = obj4(z, p.w1, p.w2, p.w3, t, lam);
}

inline Pt inner(const double* z, double lam, double t, const Cfg& cfg, Stats& st, double s0 = -1.0) {
    Pt p;
    p.ok = false;
    p.t = t;
    const double c = t + lam * t * t;
    Sp3 q;
    const bool ok = s0 > 0.0 ? sp3_warm(z[0] + c, z[1] + c, z[2] + c, lam, s0, cfg, st, q)
                             : sp3(z[0] + c, z[1] + c, z[2] + c, lam, cfg, st, q);
    if (!ok) return p;
    make_pt(z, lam, t, q, p);
    return p;
}

// A valid dense point: inner exists, sorted (w3 >= t > 0) and the full Hessian is PSD (R' >= 0).
inline bool dense_ok(const Pt& p) {
    return p.ok && p.t > 0.0 && p.w3 >= p.t * (1.0 - 1e-12) && p.Rp >= -1e-10;
}

// Joint Newton iteration on (s, t) for the two remaining stationarity conditions
//   F1 = G(s; c(t)) = 0 (inner) and F2 = R = t - z4 + lam e2(w_{1:3}) = 0 (outer),
// started from (s, t).  On success p holds a verified dense critical point: positive, sorted,
// inner Hessian positive definite (G_s > 0) and full Hessian PSD (dR/dt >= 0), which makes it
// the unique PSD critical point of the dense problem.
inline bool dense_newton(const double* z, double lam, double s, double t, const Cfg& cfg, Stats& st, Pt& p) {
    const double m = 0.5 * (z[0] + z[1]), d = 0.5 * (z[0] - z[1]);
    const double lam2 = lam * lam, il = 1.0 / lam;
    double F1, F2, Gs, F1t, F2s, F2t, w1, w2, w3, r1, r2;
    bool done = false;
    for (int it = 0;; ++it) {
        const double c = t + lam * t * t, mc = m + c, cp = 1.0 + 2.0 * lam * t;
        r1 = 1.0 / (1.0 + s);
        r2 = d > 0.0 ? 1.0 / (1.0 - s) : 0.0;
        const double a = mc * r1, b = d * r2;
        F1 = s - lam * (z[2] + c) + lam2 * (a * a - b * b);
        Gs = 1.0 - 2.0 * lam2 * (a * a * r1 + b * b * r2);
        F1t = (-lam + 2.0 * lam2 * mc * r1 * r1) * cp;
        w1 = a + b - t;
        w2 = a - b - t;
        w3 = s * il - t;
        const double S1 = w2 + w3, S2 = w1 + w3, S3 = w1 + w2;
        F2 = t - z[3] + lam * (w1 * w2 + w1 * w3 + w2 * w3);
        const double w1s = -mc * r1 * r1 + d * r2 * r2, w2s = -mc * r1 * r1 - d * r2 * r2;
        F2s = lam * (w1s * S1 + w2s * S2 + il * S3);
        F2t = 1.0 + lam * ((r1 * cp - 1.0) * (S1 + S2) - S3);
        if (done) break;
        if (it >= cfg.maxit) {
            st.capped++;
            return false;
        }
        const double det = Gs * F2t - F1t * F2s;
        if (!(std::fabs(det) > 0.0)) return false;
        const double ds = (-F1 * F2t + F1t * F2) / det;
        const double dt = (-Gs * F2 + F2s * F1) / det;
        if (!std::isfinite(ds) || !std::isfinite(dt)) return false;
        s += ds;
        t += dt;
        if (!(s > 0.0 && s < 1.0 && t > 0.0)) return false;
        done = std::fabs(ds) <= cfg.tol * s && std::fabs(dt) <= cfg.tol * t;
    }
    if (!(Gs > 0.0)) return false;
    p.ok = true;
    p.t = t;
    p.s = s;
    p.w1 = w1;
    p.w2 = w2;
    p.w3 = w3;
    p.E = w1 * w2 + w1 * w3 + w2 * w3;
    p.R = F2;
    p.Rp = F2t - F2s * F1t / Gs;
    p.D = obj4(z, w1, w2, w3, t, lam);
    return w2 > 0.0 && dense_ok(p);
}

// Safeguarded Newton on R over the bracket [a, b] with R(a) < 0 <= R(b).
inline bool solve_bracket(const double* z, double lam, Pt a, Pt b, const Cfg& cfg, Stats& st, Pt& out) {
    Pt p = (-a.R < b.R) ? a : b;
    double t = p.t - p.R / p.Rp;
    if (!(p.Rp > 0.0) || !(t > a.t && t < b.t)) t = 0.5 * (a.t + b.t);
    for (int it = 0;; ++it) {
        if (it > cfg.maxit) {
            st.capped++;
            break;
        }
        p = inner(z, lam, t, cfg, st, p.s + p.sp * (t - p.t));
        if (!p.ok) return false;  // hole in the domain of the inner solution: let the caller fall back
        if (p.R < 0.0) a = p; else b = p;
        if (p.R == 0.0) break;
        double tn = t - p.R / p.Rp;
        if (!(p.Rp > 0.0) || !(tn > a.t && tn < b.t)) tn = 0.5 * (a.t + b.t);
        const bool done = std::fabs(tn - t) <= cfg.tol * tn || (b.t - a.t) <= cfg.tol * b.t;
        t = tn;
        if (done) {
            p = inner(z, lam, t, cfg, st);
            if (!p.ok) p = (-a.R < b.R) ? a : b;
            break;
        }
    }
    out = p;
    return true;
}

struct Best {
    double v, w[4];
    int kind;
};

inline void offer(Best& best, const Pt& p) {
    if (p.ok && p.w2 >= 0.0 && p.w3 >= 0.0 && p.D < best.v) {
        best.v = p.D;
        best.w[0] = p.w1;
        best.w[1] = p.w2;
        best.w[2] = p.w3;
        best.w[3] = p.t;
        best.kind = 4;
    }
}

// screen_dense: no dense PSD critical point.  Every interior critical point is a fixed point of
// the antitone map T_i(w) = z_i - lam e2(w without i); the PSD one is sorted like z and has
// lam (w1 + w2) <= 1 (a 2x2 principal minor of the Hessian).  Alternating interval bounds
// L <= w <= U, tightened with these facts, prove there is none when U4 <= 0 or the box is empty.
inline bool screen_dense(const double* z, double lam, int rounds, double t_lo = 0.0) {
    double L0 = t_lo, L1 = t_lo, L2 = t_lo, L3 = t_lo;
    double U0 = z[0], U1 = z[1], U2 = z[2], U3 = z[3];
    const double il = 1.0 / lam;
    double prev = 1e300;
    for (int r = 0; r < rounds; ++r) {
        U0 = std::min(U0, z[0] - lam * (L1 * L2 + L1 * L3 + L2 * L3));
        U0 = std::min(U0, il - L1);
        U1 = std::min(std::min(U1, U0), z[1] - lam * (L0 * L2 + L0 * L3 + L2 * L3));
        U1 = std::min(U1, 0.5 * il);
        U2 = std::min(std::min(U2, U1), z[2] - lam * (L0 * L1 + L0 * L3 + L1 * L3));
        U3 = std::min(std::min(U3, U2), z[3] - lam * (L0 * L1 + L0 * L2 + L1 * L2));
        if (!(U3 > 0.0) || U0 < L0 || U1 < L1 || U2 < L2 || U3 < L3) return true;
        // z_i - w_i = lam e2(w without i) does not decrease with i at a sorted critical point
        // (dropping a smaller coordinate leaves a larger e2), so w_j - w_i <= z_j - z_i for i < j
        U3 = std::min(U3, std::min(U2 - (z[2] - z[3]), std::min(U1 - (z[1] - z[3]), U0 - (z[0] - z[3]))));
        U2 = std::min(U2, std::min(U1 - (z[1] - z[2]), U0 - (z[0] - z[2])));
        U1 = std::min(U1, U0 - (z[0] - z[1]));
        if (!(U3 > 0.0) || U0 < L0 || U1 < L1 || U2 < L2 || U3 < L3) return true;
        L3 = std::max(L3, z[3] - lam * (U0 * U1 + U0 * U2 + U1 * U2));
        L2 = std::max(std::max(L2, L3), z[2] - lam * (U0 * U1 + U0 * U3 + U1 * U3));
        L1 = std::max(std::max(L1, L2), z[1] - lam * (U0 * U2 + U0 * U3 + U2 * U3));
        L0 = std::max(std::max(L0, L1), z[0] - lam * (U1 * U2 + U1 * U3 + U2 * U3));
        L2 = std::max(L2, L3 + (z[2] - z[3]));
        L1 = std::max(L1, std::max(L2 + (z[1] - z[2]), L3 + (z[1] - z[3])));
        L0 = std::max(L0, std::max(L1 + (z[0] - z[1]), std::max(L2 + (z[0] - z[2]), L3 + (z[0] - z[3]))));
        if (lam * (L0 + L1) > 1.0 || U0 < L0 || U1 < L1 || U2 < L2 || U3 < L3) return true;
        const double width = (U0 - L0) + (U1 - L1) + (U2 - L2) + (U3 - L3);
        if (width > 0.99 * prev) return false;  // stalled: the bounds shrink by less than 1% a round
        prev = width;
    }
    return false;
}

// Fallback for the dense candidate: a walk along the inner solution t -> (w_{1:3}(t), t) over
// [0, tb] that either brackets the upward crossing of R (then solved and verified) or certifies,
// interval by interval, that no point of the path is better than the best candidate v* so far.
// With D the objective along the path (D' = R) and E = e2(w_{1:3}) >= 0 non-increasing in t:
//   * R >= ta - z4 on [ta, ...) while w >= 0, so D(t) >= D(ta) - (z4 - ta)(t - ta): the interval
//     [ta, ta + (D(ta) - v*) / (z4 - ta)] is certified without further evaluations (this also
//     covers the end of the domain of the inner solution, a fold);
//   * on [ta, tc] with both ends evaluated, R >= ta - z4 + lam E(tc) and R <= R(ta) + (tc - ta)
//     (R' <= 1), so D(t) >= max(D(ta) - A (t - ta), D(tc) - B (tc - t)) with
//     A = max(0, -(ta - z4 + lam E(tc))), B = max(0, R(ta) + tc - ta).
// Steps follow the prediction R(t + h) ~ R + R' h >= h of the second certificate; a step that
// fails to certify is halved.  Every evaluated feasible point is offered as a candidate.
void dense_walk(const double* z, double lam, const Pt& p0, double tb, const Cfg& cfg, Stats& st, Best& best) {
    st.fallback++;
    const double z4 = z[3];
    const double eps = 1e-16;  // objective slack (z1 = 1)
    int evals = 0, hunts = 0;
    // From a point a with R(a) < 0, look to the right for R >= 0 and solve the bracket; a verified
    // dense point ends the whole search (it is the only candidate on the path).
    auto hunt = [&](Pt a) -> bool {
        ++hunts;
        for (int j = 0; j < 16 && a.ok && a.R < 0.0 && a.t < tb; ++j) {
            double t2 = a.Rp > 0.0 ? a.t - 1.25 * a.R / a.Rp : a.t + 0.25 * (tb - a.t);
            t2 = std::min(t2, tb);
            if (!(t2 > a.t)) break;
            const Pt b = inner(z, lam, t2, cfg, st, a.s + a.sp * (t2 - a.t));
            ++evals;
            if (!b.ok) break;
            offer(best, b);
            if (b.R >= 0.0) {
                Pt r;
                if (solve_bracket(z, lam, a, b, cfg, st, r)) {
                    offer(best, r);
                    if (dense_ok(r)) return true;
                }
                break;
            }
            a = b;
        }
        return false;
    };
    Pt k = p0;
    double h = 0.25 * tb;
    bool fresh = true;  // k just changed: predict the next step
    double screened = -1.0;  // k.t of the last failed interval screen at a fold
    bool at_hD = false;      // the step tried ends where the certified interval [k.t, k.t + hD] ends
    if (k.R < 0.0 && hunt(k)) return;
    for (; evals < 4000 && k.t < tb; ++evals) {
        // R(t) >= t - z4 gives D(ta + x) >= D(ta) - c x + x^2 / 2 (c = z4 - ta): certified while that
        // stays above v*, i.e. for x <= c - sqrt(c^2 - 2 delta) (everything when c^2 <= 2 delta)
        const double dl = std::max(0.0, k.D - best.v + eps), cz = std::max(z4 - k.t, 1e-300);
        const double disc = cz * cz - 2.0 * dl;
        const double hD = disc <= 0.0 ? 2.0 * tb : 2.0 * dl / (cz + std::sqrt(disc));
        if (k.t + hD >= tb) return;
        if (fresh) {
            if (k.R > 0.0) h = std::max(h, 0.9 * k.R / std::max(1.0 - k.Rp, 1e-300));
            h = std::max(h, 1.5 * hD);
            fresh = false;
            if (hunts < 2 && k.R > 0.0 && k.Rp < 0.0) {
                // R is falling: probe past its predicted zero and hunt from there
                const double tx = k.t + 1.25 * k.R / -k.Rp;
                if (tx < tb) {
                    const Pt a = inner(z, lam, tx, cfg, st, k.s + k.sp * (tx - k.t));
                    ++evals;
                    if (a.ok) {
                        offer(best, a);
                        if (a.R < 0.0 && hunt(a)) return;
                    }
                }
            }
        }
        const double tn = std::min(tb, k.t + h);
        const double H = tn - k.t;
        if (!(H > 1e-17 * tb)) break;  // nothing left that could matter
        const Pt q = inner(z, lam, tn, cfg, st, k.s + k.sp * H);
        const bool tried_hD = at_hD;
        at_hD = false;
        if (!q.ok) {
            if (hD >= H || tried_hD) return;  // the domain ends inside a certified interval
            // [0, k.t] is certified: no dense critical point with w4 >= k.t ends the search
            if (screened != k.t) {
                if (screen_dense(z, lam, 8, k.t)) return;
                screened = k.t;
            }
            // halve, or try the end of the certified interval (failing there ends the walk)
            at_hD = hD >= 0.5 * H;
            h = at_hD ? hD : 0.5 * H;
            continue;
        }
        offer(best, q);
        if (k.R < 0.0 && q.R >= 0.0) {
            Pt r;
            if (solve_bracket(z, lam, k, q, cfg, st, r)) {
                offer(best, r);
                if (dense_ok(r)) return;  // the dense critical point is unique
            }
        }
        if (hunts < 2 && q.R < 0.0 && hunt(q)) return;
        // On [ta, tc] (x = t - ta, H = tc - ta): R(t) >= t - z4 + lam E(tc) and R(t) <= R(ta) + x give
        //   D >= f1(x) = D(ta) + lbR x + x^2 / 2,  lbR = ta - z4 + lam E(tc),
        //   D >= f2(x) = D(tc) - R(ta) (H - x) - (H^2 - x^2) / 2;
        // f1 - f2 is linear and non-increasing (lbR <= R(ta)), so max(f1, f2) is f1 left of their
        // crossing x* and f2 right of it; lb is its minimum over [0, H] (both are convex).
        const double lbR = k.t - z4 + lam * q.E;
        const double C = k.D - q.D + k.R * H + 0.5 * H * H, slope = k.R - lbR;
        double xs = slope > 0.0 ? C / slope : (C >= 0.0 ? H : 0.0);
        xs = std::min(std::max(xs, 0.0), H);
        const double xa = std::min(std::max(-lbR, 0.0), xs), xb = std::min(std::max(-k.R, xs), H);
        const double lb = std::min(k.D + (lbR + 0.5 * xa) * xa,
                                   q.D - k.R * (H - xb) - 0.5 * (H * H - xb * xb));
        if (lbR >= 0.0 || lb >= best.v - eps || hD >= H || H <= 1e-15 * tb) {
            k = q;
            h = 2.0 * H;  // accepted: try a longer step next
            fresh = true;
            if (q.w3 < q.t) return;  // past the sorted region: w3(t) does not increase
        } else {
            h = 0.5 * H;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Cheap certificates (no divisions in the loops).
//
// screen2: no point beats the 2-sparse candidate.  For w <= z (clipping to z only lowers the
// objective) write r = ||(z1 - w1, z2 - w2)||; then w1 w2 >= (z1 - r)(z2 - r) =: k(r)/lam for r <= z2
// and, minimising over w3, w4 >= 0 with w1 w2 fixed,
//   g(w) - g(z1, z2, 0, 0) >= 0.5 (r^2 - (z3 - k)_+^2 - (z4 - k)_+^2) >= 0.5 (r^2 - 2 (z3 - k)_+^2),
// which is >= 0 for r >= sqrt(z3^2 + z4^2) and, for smaller r, if q(r) = lam (z1 - r)(z2 - r) - z3 +
// r / sqrt(2) >= 0: a quadratic in r whose minimum over the interval is checked.
inline bool screen2(const double* z, double lam) {
    const double rmax2 = z[2] * z[2] + z[3] * z[3];
    if (rmax2 > z[1] * z[1]) return false;
    const double rmax = std::sqrt(rmax2);
    const double b = lam * (z[0] + z[1]) - 0.7071067811865476;
    const double r = std::min(std::max(b / (2.0 * lam), 0.0), rmax);
    return lam * r * r - b * r + (lam * z[0] * z[1] - z[2]) >= 0.0;
}

// screen3: no 3-sparse point beats the 2-sparse candidate (same argument without w4).
inline bool screen3(const double* z, double lam) {
    const double rmax = z[2];
    const double b = lam * (z[0] + z[1]) - 1.0;
    const double r = std::min(std::max(b / (2.0 * lam), 0.0), rmax);
    return lam * r * r - b * r + (lam * z[0] * z[1] - z[2]) >= 0.0;
}

// ---------------------------------------------------------------------------------------------
// One sorted, normalised group: z1 = 1 >= z2 >= z3 >= z4 >= 0, lam > 0.  Writes w (sorted order).
inline void solve_sorted(const double* z, double lam, const Cfg& cfg, Stats& st, double* w) {
    Best best;
    best.v = 0.5 * (z[2] * z[2] + z[3] * z[3]);
    best.w[0] = z[0];
    best.w[1] = z[1];
    best.w[2] = 0.0;
    best.w[3] = 0.0;
    best.kind = 2;
    do {
        if (!(z[2] > 0.0) || screen2(z, lam)) break;
        const bool dense_possible = z[3] > 0.0;
        if (!dense_possible && screen3(z, lam)) break;
        Sp3 q;
        // no interior 3-sparse point: then there is no dense one either
        if (!sp3(z[0], z[1], z[2], lam, cfg, st, q)) break;
        {
            const double a = q.u1 - z[0], b = q.u2 - z[1], c = q.u3 - z[2];
            const double v = 0.5 * (a * a + b * b + c * c + z[3] * z[3]) + lam * q.u1 * q.u2 * q.u3;
            if (v < best.v) {
                best.v = v;
                best.w[0] = q.u1;
                best.w[1] = q.u2;
                best.w[2] = q.u3;
                best.w[3] = 0.0;
                best.kind = 3;
            }
        }
        if (!dense_possible) break;
        Pt p0;
        make_pt(z, lam, 0.0, q, p0);  // R(0) = lam e2(3-sparse point) - z4
        if (p0.R < 0.0) {
            // the 3-sparse point is not a local minimum: a dense one exists below it.  Newton's
            // method on (s, t) from the tangent prediction; the bracketed iteration and the walk
            // are safety nets.
            Pt r;
            double t1 = p0.Rp > 0.0 ? -p0.R / p0.Rp : 0.5 * z[3];
            if (!(t1 < z[3])) t1 = z[3];
            const double m = 0.5 * (z[0] + z[1]);
            const double dGdc = -lam + 2.0 * lam * lam * m * q.r1 * q.r1;
            double s1 = q.s - dGdc / q.gp * t1;
            if (!(s1 > 0.0 && s1 < 1.0)) s1 = q.s;
            if (dense_newton(z, lam, s1, t1, cfg, st, r)) {
                offer(best, r);
                break;
            }
            const Pt p1 = inner(z, lam, z[3], cfg, st);
            if (p1.ok && p1.R > 0.0 && solve_bracket(z, lam, p0, p1, cfg, st, r) && dense_ok(r)) {
                offer(best, r);
                break;
            }
            dense_walk(z, lam, p0, std::min(z[3], q.u3), cfg, st, best);
            break;
        }
        // R(0) >= 0 and R'(0) >= 0: the 4x4 Hessian at the 3-sparse point p3 is PSD (R'(0) is the
        // Schur complement of its positive definite 3x3 block), so p3 lies in the convex set C4
        // where g4 is convex, and for the dense critical point w* (also in C4)
        //   g4(w*) >= g4(p3) + grad g4(p3) . (w* - p3) = g4(p3) + R(0) w*_4 >= g4(p3).
        if (p0.Rp >= 0.0) break;
        if (screen_dense(z, lam, 8)) break;
        // The dense point is sorted, t* <= w3(t*) <= w3(0) (w3 does not increase along the inner
        // solution): walk over [0, min(z4, w3(0))].
        dense_walk(z, lam, p0, std::min(z[3], q.u3), cfg, st, best);
    } while (false);
    for (int i = 0; i < 4; ++i) w[i] = best.w[i];
}

// ---------------------------------------------------------------------------------------------
// Blocked driver.  The common paths run as branch-free loops over vectors of VB lanes (AVX2: 4
// doubles, AVX-512: 8); groups move between stages through index lists, so every stage works on full
// blocks:
//   1. all groups: sort, normalise, the certificates of a 2-sparse answer (screen2, screen3, no
//      3-sparse critical point, identity), and the output of the groups they settle; the groups
//      left get consecutive slots of the list, with their data stored per slot (with AVX-512 by
//      compressing the vector lanes, else gathered afterwards);
//   2. the rest: 3-sparse candidate (safeguarded Newton on G), R(0) and R'(0);
//   3. R(0) < 0: dense candidate (Newton on (s, t), verified);
//   4. the few groups left (R(0) >= 0 > R'(0), or a Newton iteration that did not verify): the
//      scalar path solve_sorted (screens, bracketed iteration, certified walk);
//   5. the groups past stage 1: restore order, signs and scale.
constexpr int CH = 256;   // groups per chunk (the chunk's work arrays stay in the L1/L2 caches)
#ifdef __AVX512F__
constexpr int VB = 8;     // lanes per block (one AVX-512 register of doubles)
#else
constexpr int VB = 4;     // lanes per block (one AVX2 register of doubles)
#endif
typedef int64_t lane_t;   // lane flags as wide as the doubles they steer

// Stage 1 writes per group (index g); the later stages work per slot j of the list of groups they
// need (g = list[j]), so that a block of consecutive slots is read and written with whole vectors.
struct Work {
    double gz2[CH], gz3[CH], gz4[CH], glam[CH];  // per group: sorted, normalised input, lam * scale
    double scale[CH];     // per group
    double need[CH];      // per group, 1: not settled by stage 1's certificates (the scalar loop only)
    double z2[CH + 8], z3[CH + 8], z4[CH + 8], lam[CH + 8];  // per slot (+8: whole-vector stores)
    double w[4][CH + 8];  // per slot: chosen point, sorted order, normalised (z1 = 1)
    double best[CH + 8];  // per slot: its objective
    int kslot;            // slots already filled by stage 1
    int ncopy;            // groups copied unchanged (non-finite group, lam == 0, all zero, identity)
    int nid3, nid4;       // identity groups with 3 and 4 non-zeros
    double rank[4][CH];   // per group: sorted position of each original coordinate
    int32_t list[CH + 8], list2[CH], list3[CH], list4[CH];
    double ts[CH], tt[CH];  // per slot: dense Newton start (s, t)
    double s3[CH];          // per slot: root s = lam w3 of the 3-sparse candidate
};

// Stage 1 for groups g0..n of a chunk (plain loop): sort, normalise, certificates, and the output of
// a group as if it were settled (its input for a copied group, else its top two): the later stages
// overwrite the output of the groups that need them (W.need).  Returns the number of copied groups.
template <typename T>
inline int stage_sort_tail(const T* y, T* x, int g0, int n, Work& W) {
    int ncopy = 0, n3 = 0, n4 = 0;
#pragma omp simd reduction(+ : ncopy, n3, n4)
    for (int g = g0; g < n; ++g) {
        double a0 = std::fabs((double)y[4 * g]), a1 = std::fabs((double)y[4 * g + 1]);
        double a2 = std::fabs((double)y[4 * g + 2]), a3 = std::fabs((double)y[4 * g + 3]);
        // indices carried as doubles so that the loop uses one vector width
        double i0 = 0.0, i1 = 1.0, i2 = 2.0, i3 = 3.0;
#define MS_CX(x, ix, u, iu)                                                  \
    {                                                                        \
        const bool sw = (u > x) | ((u == x) & (iu < ix));                    \
        const double tx = sw ? u : x, tu = sw ? x : u;                       \
        const double jx = sw ? iu : ix, ju = sw ? ix : iu;                   \
        x = tx;                                                              \
        u = tu;                                                              \
        ix = jx;                                                             \
        iu = ju;                                                             \
    }
        MS_CX(a0, i0, a1, i1)
        MS_CX(a2, i2, a3, i3)
        MS_CX(a0, i0, a2, i2)
        MS_CX(a1, i1, a3, i3)
        MS_CX(a1, i1, a2, i2)
#undef MS_CX
        const double l = W.glam[g];
        const bool finite = (a0 <= 1.79769313486231570e308) & (a1 == a1) & (a2 == a2) & (a3 == a3);
        const bool copy0 = (!finite) | (!(l > 0.0)) | (!(a0 > 0.0));
        const double sc = copy0 ? 1.0 : a0;
        const double inv = 1.0 / sc;
        const double z2 = a1 * inv, z3 = a2 * inv, z4 = a3 * inv, ln = l * sc;
        W.gz2[g] = z2;
        W.gz3[g] = z3;
        W.gz4[g] = z4;
        W.glam[g] = ln;
        W.scale[g] = sc;
        W.rank[0][g] = (i1 == 0.0 ? 1.0 : 0.0) + (i2 == 0.0 ? 2.0 : 0.0) + (i3 == 0.0 ? 3.0 : 0.0);
        W.rank[1][g] = (i1 == 1.0 ? 1.0 : 0.0) + (i2 == 1.0 ? 2.0 : 0.0) + (i3 == 1.0 ? 3.0 : 0.0);
        W.rank[2][g] = (i1 == 2.0 ? 1.0 : 0.0) + (i2 == 2.0 ? 2.0 : 0.0) + (i3 == 2.0 ? 3.0 : 0.0);
        W.rank[3][g] = (i1 == 3.0 ? 1.0 : 0.0) + (i2 == 3.0 ? 2.0 : 0.0) + (i3 == 3.0 ? 3.0 : 0.0);
        (void)i0;
        // screen2 / screen3 (see there), inline so that the loop vectorises
        const double rmax2 = z3 * z3 + z4 * z4;
        const double c0 = ln * z2 - z3;
        const double b2 = ln * (1.0 + z2) - 0.7071067811865476;
        // the minimum of q(r) = lam r^2 - b r + c0 on [0, rmax], as in stage_sort
        const double rm = std::sqrt(rmax2);
        const bool s2 = (rmax2 <= z2 * z2) &
                        (b2 <= 0.0 ? c0 >= 0.0
                                   : (b2 >= 2.0 * ln * rm ? ln * rmax2 - b2 * rm + c0 >= 0.0
                                                          : 4.0 * ln * c0 >= b2 * b2));
        const double b3 = ln * (1.0 + z2) - 1.0;
        const bool s3 = (!(z4 > 0.0)) &
                        (b3 <= 0.0 ? c0 >= 0.0
                                   : (b3 >= 2.0 * ln * z3 ? ln * z3 * z3 - b3 * z3 + c0 >= 0.0
                                                          : 4.0 * ln * c0 >= b3 * b3));
        const bool big = !(ln <= 1.79769313486231570e308);  // lam * scale overflowed: top-2
        const double zmin = z4 > 0.0 ? z4 : z3;  // identity (see stage_sort_l)
        const bool copy = copy0 | ((z3 > 0.0) & (3.0 * ln <= IDENT_REL * zmin) & (zmin * zmin > 8.0 * ln));
        ncopy += copy ? 1 : 0;
        n3 += (copy & !copy0 & !(z4 > 0.0)) ? 1 : 0;
        n4 += (copy & !copy0 & (z4 > 0.0)) ? 1 : 0;
        // no 3-sparse critical point, hence no dense one (see stage_sort)
        const bool s4 = ln * (1.0 + std::sqrt(1.0 - z2 * z2)) >= 2.0 + 1e-12;
        const bool need = (!copy) & (z3 > 0.0) & (!big) & (!s2) & (!s3) & (!s4);
        W.need[g] = need ? 1.0 : 0.0;
        for (int i = 0; i < 4; ++i) {
            const T yi = y[4 * g + i];
            const double r = W.rank[i][g];
            // settled: the top two keep their input, the others become zero with the input's
            // sign; a group that needs the later stages keeps its input for now (x may be y)
            x[4 * g + i] = (need | copy | (r <= 1.0)) ? yi : (std::signbit(yi) ? (T)-0.0 : (T)0.0);
        }
    }
    W.nid3 += n3;
    W.nid4 += n4;
    return ncopy;
}

template <typename T>
inline int stage_sort_plain(const T* y, T* x, int n, const double* lam, int64_t lam_stride, Work& W) {
    if (lam_stride == 0) {
        const double l0 = lam[0];
        for (int g = 0; g < n; ++g) W.glam[g] = l0;
    } else {
        for (int g = 0; g < n; ++g) W.glam[g] = lam[g];
    }
    W.nid3 = W.nid4 = 0;
    W.kslot = 0;
    W.ncopy = stage_sort_tail<T>(y, x, 0, n, W);
    int k = 0;
    for (int g = 0; g < n; ++g) {
        W.list[k] = g;
        k += W.need[g] != 0.0;
    }
    return k;
}

// Last stage: the output of the groups that went past stage 1 (W.list[0..k)), from the chosen point
// of each: order and signs restored, scale undone.  Stage 1 already wrote every other group.
template <typename T>
inline void stage_out(const T* y, T* x, int n, int k, const Work& W, Stats& st, int j0 = 0) {
    int64_t c3 = 0, c4 = 0;
    for (int j = j0; j < k; ++j) {
        const int g = W.list[j];
        const double sc = W.scale[g];
        const double w0 = W.w[0][j] * sc, w1 = W.w[1][j] * sc, w2 = W.w[2][j] * sc, w3 = W.w[3][j] * sc;
        c3 += (w2 != 0.0) & (w3 == 0.0);
        c4 += w3 != 0.0;
        const bool two = (w2 == 0.0) & (w3 == 0.0);
        for (int i = 0; i < 4; ++i) {
            const double r = W.rank[i][g];
            const double yi = (double)y[4 * g + i], ai = std::fabs(yi);
            double o = r == 0.0 ? w0 : (r == 1.0 ? w1 : (r == 2.0 ? w2 : w3));
            // exact inputs for a 2-sparse result, and |x| <= |y| despite rounding
            o = two ? (r <= 1.0 ? ai : 0.0) : (o < ai ? o : ai);
            x[4 * g + i] = (T)(std::signbit(yi) ? -o : o);
        }
    }
    st.n3 += c3;
    st.n4 += c4;
    st.n2 += n - W.ncopy - c3 - c4;
}

#if defined(__GNUC__) && !defined(MINISPARSE_NO_VECTOR_EXT)
// Four groups at a time with GCC/Clang vector extensions (AVX2: one register; otherwise the compiler
// splits them): loads are transposed to one register per sorted coordinate.
typedef double vd __attribute__((vector_size(32)));
typedef int64_t vi __attribute__((vector_size(32)));
typedef float vf __attribute__((vector_size(16)));

static inline vd vload(const double* p) {
    vd r;
    std::memcpy(&r, p, sizeof r);
    return r;
}
static inline vd vload(const float* p) {
    vf r;
    std::memcpy(&r, p, sizeof r);
    return __builtin_convertvector(r, vd);
}
static inline void vstore(double* p, vd v) { std::memcpy(p, &v, sizeof v); }
static inline void vstore(float* p, vd v) {
    const vf r = __builtin_convertvector(v, vf);
    std::memcpy(p, &r, sizeof r);
}
static inline void transpose4(vd& a, vd& b, vd& c, vd& d) {
    const vi lo = {0, 4, 2, 6}, hi = {1, 5, 3, 7}, l2 = {0, 1, 4, 5}, h2 = {2, 3, 6, 7};
    const vd t0 = __builtin_shuffle(a, b, lo), t1 = __builtin_shuffle(a, b, hi);
    const vd t2 = __builtin_shuffle(c, d, lo), t3 = __builtin_shuffle(c, d, hi);
    a = __builtin_shuffle(t0, t2, l2);
    b = __builtin_shuffle(t1, t3, l2);
    c = __builtin_shuffle(t0, t2, h2);
    d = __builtin_shuffle(t1, t3, h2);
}

// Stage 1 with L lanes (L groups) per step: 4 (one AVX2 register of doubles) or 8 (one AVX-512
// register).  The loads and stores below transpose between groups and coordinates.
template <int L>
struct VT {
    typedef double d __attribute__((vector_size(8 * L)));
    typedef int64_t i __attribute__((vector_size(8 * L)));
};

// c[i] = coordinate i of the groups g .. g + L - 1
template <typename T>
static inline void load_coords(const T* y, vd c[4]) {
    for (int j = 0; j < 4; ++j) c[j] = vload(y + 4 * j);
    transpose4(c[0], c[1], c[2], c[3]);
}
template <typename T>
static inline void store_coords(T* x, vd c[4]) {
    transpose4(c[0], c[1], c[2], c[3]);
    for (int j = 0; j < 4; ++j) vstore(x + 4 * j, c[j]);
}
#ifdef MS_L8
typedef VT<8>::d vd8;
typedef float vf8 __attribute__((vector_size(32)));
typedef float vf16 __attribute__((vector_size(64)));
static inline void load_coords(const float* y, vd8 c[4]) {
    vf16 a, b;
    std::memcpy(&a, y, sizeof a);
    std::memcpy(&b, y + 16, sizeof b);
    c[0] = __builtin_convertvector(__builtin_shufflevector(a, b, 0, 4, 8, 12, 16, 20, 24, 28), vd8);
    c[1] = __builtin_convertvector(__builtin_shufflevector(a, b, 1, 5, 9, 13, 17, 21, 25, 29), vd8);
    c[2] = __builtin_convertvector(__builtin_shufflevector(a, b, 2, 6, 10, 14, 18, 22, 26, 30), vd8);
    c[3] = __builtin_convertvector(__builtin_shufflevector(a, b, 3, 7, 11, 15, 19, 23, 27, 31), vd8);
}
static inline void store_coords(float* x, vd8 c[4]) {
    const vf8 o0 = __builtin_convertvector(c[0], vf8), o1 = __builtin_convertvector(c[1], vf8);
    const vf8 o2 = __builtin_convertvector(c[2], vf8), o3 = __builtin_convertvector(c[3], vf8);
    const vf16 p01 = __builtin_shufflevector(o0, o1, 0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
    const vf16 p23 = __builtin_shufflevector(o2, o3, 0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
    const vf16 a = __builtin_shufflevector(p01, p23, 0, 1, 16, 17, 2, 3, 18, 19, 4, 5, 20, 21, 6, 7, 22, 23);
    const vf16 b = __builtin_shufflevector(p01, p23, 8, 9, 24, 25, 10, 11, 26, 27, 12, 13, 28, 29, 14, 15, 30, 31);
    std::memcpy(x, &a, sizeof a);
    std::memcpy(x + 16, &b, sizeof b);
}
static inline void load_coords(const double* y, vd8 c[4]) {
    vd lo[4], hi[4];
    load_coords(y, lo);
    load_coords(y + 16, hi);
    for (int i = 0; i < 4; ++i) c[i] = __builtin_shufflevector(lo[i], hi[i], 0, 1, 2, 3, 4, 5, 6, 7);
}
static inline void store_coords(double* x, vd8 c[4]) {
    vd lo[4], hi[4];
    for (int i = 0; i < 4; ++i) {
        lo[i] = __builtin_shufflevector(c[i], c[i], 0, 1, 2, 3);
        hi[i] = __builtin_shufflevector(c[i], c[i], 4, 5, 6, 7);
    }
    store_coords(x, lo);
    store_coords(x + 16, hi);
}
#endif

template <typename T, int L>
inline int stage_sort_l(const T* y, T* x, int n, const double* lam, int64_t lam_stride, Work& W) {
    typedef typename VT<L>::d V;
    typedef typename VT<L>::i M;
    const int nl = n - n % L;
    const V zero = V{}, one = zero + 1.0, two = zero + 2.0, three = zero + 3.0, four = zero + 4.0;
    const V dmax = zero + 1.79769313486231570e308, rs2 = zero + 0.7071067811865476;
    const M sgn = (M)(-zero);  // the sign bit
    M ncopy = (M)zero, nid3 = (M)zero, nid4 = (M)zero;
    const V lam0 = zero + lam[0];
    int k = 0;
    for (int g = 0; g < nl; g += L) {
        V ya[4];  // inputs, one register per original coordinate
        load_coords(y + 4 * g, ya);
        V a0 = ya[0] < zero ? -ya[0] : ya[0], a1 = ya[1] < zero ? -ya[1] : ya[1];
        V a2 = ya[2] < zero ? -ya[2] : ya[2], a3 = ya[3] < zero ? -ya[3] : ya[3];
        V i0 = zero, i1 = one, i2 = two, i3 = three;
#define MS_VCX(x, ix, u, iu)                                  \
    {                                                         \
        const M sw = (u > x) | ((u == x) & (iu < ix));        \
        const V tx = sw ? u : x, tu = sw ? x : u;             \
        const V jx = sw ? iu : ix, ju = sw ? ix : iu;         \
        x = tx;                                               \
        u = tu;                                               \
        ix = jx;                                              \
        iu = ju;                                              \
    }
        MS_VCX(a0, i0, a1, i1)
        MS_VCX(a2, i2, a3, i3)
        MS_VCX(a0, i0, a2, i2)
        MS_VCX(a1, i1, a3, i3)
        MS_VCX(a1, i1, a2, i2)
#undef MS_VCX
        V l = lam0;
        if (lam_stride != 0) std::memcpy(&l, lam + g, sizeof l);
        const M finite = (a0 <= dmax) & (a1 == a1) & (a2 == a2) & (a3 == a3);
        const M copy0 = ~finite | ~(l > zero) | ~(a0 > zero);
        const V sc = copy0 ? one : a0;
        const V inv = one / sc;
        const V z2 = a1 * inv, z3 = a2 * inv, z4 = a3 * inv, ln = l * sc;
#ifdef MS_L8
        if (L != 8)  // (eight lanes write the listed groups' data per slot directly, below;
                     //  only the tail, through stage_sort_tail, reads the per-group copy)
#endif
        {
            std::memcpy(W.gz2 + g, &z2, sizeof z2);
            std::memcpy(W.gz3 + g, &z3, sizeof z3);
            std::memcpy(W.gz4 + g, &z4, sizeof z4);
            std::memcpy(W.glam + g, &ln, sizeof ln);
        }
        std::memcpy(W.scale + g, &sc, sizeof sc);
        const V rk[4] = {(i1 == zero ? one : zero) + (i2 == zero ? two : zero) + (i3 == zero ? three : zero),
                         (i1 == one ? one : zero) + (i2 == one ? two : zero) + (i3 == one ? three : zero),
                         (i1 == two ? one : zero) + (i2 == two ? two : zero) + (i3 == two ? three : zero),
                         (i1 == three ? one : zero) + (i2 == three ? two : zero) + (i3 == three ? three : zero)};
        // (the chosen point and its objective are first written by stage 2, for the listed groups)
        const V rmax2 = z3 * z3 + z4 * z4;
        const V c0 = ln * z2 - z3;
        const V b2 = ln * (one + z2) - rs2;
        // q(r) = lam r^2 - b r + c0 >= 0 on [0, rmax], from its minimum: q(0) when b <= 0, q(rmax)
        // when b >= 2 lam rmax, else c0 - b^2 / (4 lam) (no division)
        V rm, rz;
        const V q2 = one - z2 * z2;
        for (int j = 0; j < L; ++j) {
            rm[j] = std::sqrt(rmax2[j]);
            rz[j] = std::sqrt(q2[j]);
        }
        const M s2 = (rmax2 <= z2 * z2) &
                     (b2 <= zero ? c0 >= zero
                                 : (b2 >= two * ln * rm ? ln * rmax2 - b2 * rm + c0 >= zero
                                                        : four * ln * c0 >= b2 * b2));
        const V b3 = ln * (one + z2) - one;
        const M s3 = ~(z4 > zero) &
                     (b3 <= zero ? c0 >= zero
                                 : (b3 >= two * ln * z3 ? ln * z3 * z3 - b3 * z3 + c0 >= zero
                                                        : four * ln * c0 >= b3 * b3));
        const M big = ~(ln <= dmax);
        // identity: with 3 lam <= 2^-54 zmin (zmin the smallest non-zero) and zmin^2 > 8 lam, every
        // point without all non-zeros costs 0.5 zmin^2 > 4 lam >= lam Reg(z), so the optimum keeps
        // them and lies within 3 lam of z, below half an ulp: the output is the input (this also
        // keeps a lam that underflows, lam^2 = 0 or 1/lam = inf, out of the later stages)
        const V zmin = z4 > zero ? z4 : z3;
        const M ident = (z3 > zero) & (3.0 * ln <= IDENT_REL * zmin) & (zmin * zmin > 8.0 * ln);
        const M copy = copy0 | ident;
        // no 3-sparse critical point (hence no dense one): G' <= 0 at G's inflection point, where
        // G' = 1 - lam^2 m^2 (1 + k)^4 / 4 is largest (m = (1 + z2) / 2, k^2 = (1 - z2) / (1 + z2)),
        // i.e. lam (1 + sqrt(1 - z2^2)) >= 2 (with a margin for rounding)
        const M s4 = ln * (one + rz) >= (2.0 + 1e-12) * one;
        const M need = ~copy & (z3 > zero) & ~big & ~s2 & ~s3 & ~s4;
        ncopy -= copy;  // lanes are 0 or -1
        nid3 -= ident & ~copy0 & ~(z4 > zero);
        nid4 -= ident & ~copy0 & (z4 > zero);
#ifdef MS_L8
        if constexpr (L == 8) {
            // the list, and the listed groups' data per slot, compressed in registers
            const __mmask8 mk = _mm512_movepi64_mask((__m512i)need);
            _mm512_storeu_pd(W.z2 + k, _mm512_maskz_compress_pd(mk, (__m512d)z2));
            _mm512_storeu_pd(W.z3 + k, _mm512_maskz_compress_pd(mk, (__m512d)z3));
            _mm512_storeu_pd(W.z4 + k, _mm512_maskz_compress_pd(mk, (__m512d)z4));
            _mm512_storeu_pd(W.lam + k, _mm512_maskz_compress_pd(mk, (__m512d)ln));
            _mm512_storeu_pd(W.best + k, _mm512_maskz_compress_pd(mk, (__m512d)(0.5 * (z3 * z3 + z4 * z4))));
            _mm512_storeu_pd(W.w[0] + k, (__m512d)one);
            _mm512_storeu_pd(W.w[1] + k, _mm512_maskz_compress_pd(mk, (__m512d)z2));
            _mm512_storeu_pd(W.w[2] + k, (__m512d)zero);
            _mm512_storeu_pd(W.w[3] + k, (__m512d)zero);
            const __m256i ids = _mm256_add_epi32(_mm256_set1_epi32(g), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
            _mm256_storeu_si256((__m256i*)(W.list + k), _mm256_maskz_compress_epi32(mk, ids));
            k += __builtin_popcount((unsigned)mk);
        } else
#endif
        for (int j = 0; j < L; ++j) {  // the list of the groups for the later stages, branch free
            W.list[k] = g + j;
            k += need[j] != 0;
        }
        // the output of a settled group: its input when copied, else its top two (the others zero
        // with the input's sign).  A group that needs the later stages keeps its input for now
        // (x may be y), and the last stage writes its output.
        V o[4];
        for (int i = 0; i < 4; ++i) {
            std::memcpy(W.rank[i] + g, &rk[i], sizeof rk[i]);
            o[i] = (need | copy | (rk[i] <= one)) ? ya[i] : (V)((M)ya[i] & sgn);
        }
        store_coords(x + 4 * g, o);
    }
    int nc = 0;
    W.nid3 = W.nid4 = 0;
    for (int j = 0; j < L; ++j) {
        nc += (int)ncopy[j];
        W.nid3 += (int)nid3[j];
        W.nid4 += (int)nid4[j];
    }
    W.ncopy = nc;
    W.kslot = L == 8 ? k : 0;
    if (nl < n) {  // tail: the plain loop
        for (int g = nl; g < n; ++g) W.glam[g] = lam[lam_stride == 0 ? 0 : g];
        W.ncopy += stage_sort_tail<T>(y, x, nl, n, W);
        for (int g = nl; g < n; ++g) {
            W.list[k] = g;
            k += W.need[g] != 0.0;
        }
    }
    return k;
}

template <typename T>
inline int stage_sort(const T* y, T* x, int n, const double* lam, int64_t lam_stride, Work& W) {
#ifdef MS_L8
    return stage_sort_l<T, 8>(y, x, n, lam, lam_stride, W);
#else
    return stage_sort_l<T, 4>(y, x, n, lam, lam_stride, W);
#endif
}

// Last stage, four listed groups at a time (the rest: the plain loop).
template <typename T>
inline void stage_out_v(const T* y, T* x, int n, int k, const Work& W, Stats& st) {
    const int k4 = k & ~3;
    const vd zero = {0, 0, 0, 0}, one = {1, 1, 1, 1}, two = {2, 2, 2, 2};
    vi c3 = (vi)zero, c4 = (vi)zero;
    for (int j = 0; j < k4; j += 4) {
        const int* id = W.list + j;
        vd sc, w[4], r[4], ya[4];
        for (int l = 0; l < 4; ++l) {
            const int g = id[l];
            sc[l] = W.scale[g];
            for (int i = 0; i < 4; ++i) r[i][l] = W.rank[i][g];
            ya[l] = vload(y + 4 * g);
        }
        for (int i = 0; i < 4; ++i) w[i] = vload(W.w[i] + j) * sc;  // per slot: contiguous
        c3 -= (w[2] != zero) & (w[3] == zero);
        c4 -= w[3] != zero;
        transpose4(ya[0], ya[1], ya[2], ya[3]);  // one register per original coordinate
        const vi two_sparse = (w[2] == zero) & (w[3] == zero);
        vd o[4];
        for (int i = 0; i < 4; ++i) {
            const vd ai = ya[i] < zero ? -ya[i] : ya[i];
            const vd oi = r[i] == zero ? w[0] : (r[i] == one ? w[1] : (r[i] == two ? w[2] : w[3]));
            // exact inputs for a 2-sparse result, and |x| <= |y| despite rounding
            const vd v = two_sparse ? (r[i] <= one ? ai : zero) : (oi < ai ? oi : ai);
            o[i] = (vd)((vi)v | ((vi)ya[i] & (vi)(-zero)));  // the input's sign
        }
        transpose4(o[0], o[1], o[2], o[3]);
        for (int l = 0; l < 4; ++l) vstore(x + 4 * id[l], o[l]);
    }
    const int64_t n3 = c3[0] + c3[1] + c3[2] + c3[3], n4 = c4[0] + c4[1] + c4[2] + c4[3];
    st.n3 += n3;
    st.n4 += n4;
    st.n2 -= n3 + n4;
    stage_out<T>(y, x, n, k, W, st, k4);
}

#define MS_STAGE_OUT stage_out_v
#else
template <typename T>
inline int stage_sort(const T* y, T* x, int n, const double* lam, int64_t lam_stride, Work& W) {
    return stage_sort_plain<T>(y, x, n, lam, lam_stride, W);
}
#define MS_STAGE_OUT stage_out
#endif

// Stage 2 on one block of VB lanes (indices idx[0..VB), some possibly repeated as padding).
// Writes the 3-sparse candidate where it is better and classifies the lanes:
// cls = 0 done, 1 dense Newton (start in W.ts, W.tt), 2 scalar path.
inline void stage_sp3(const int32_t* idx, Work& W, const Cfg& cfg, Stats& st, lane_t* cls) {
    double z2[VB], z3[VB], z4[VB], lam[VB];
    for (int l = 0; l < VB; ++l) {
        const int g = idx[l];
        z2[l] = W.z2[g];
        z3[l] = W.z3[g];
        z4[l] = W.z4[g];
        lam[l] = W.lam[g];
    }
    double m[VB], d[VB], se[VB], s[VB], G[VB], Gp[VB], r1[VB], r2[VB];
    lane_t ok[VB], act[VB], right[VB];
#pragma omp simd
    for (int l = 0; l < VB; ++l) {
        m[l] = 0.5 * (1.0 + z2[l]);
        d[l] = 0.5 * (1.0 - z2[l]);
        se[l] = std::min(lam[l] * z3[l], z2[l]);
        const double k = std::sqrt(d[l] / m[l]);
        const double s0 = std::min(std::max((1.0 - k) / (1.0 + k), 0.0), se[l]);
        const double q1 = 1.0 / (1.0 + s0), q2 = d[l] > 0.0 ? 1.0 / (1.0 - s0) : 0.0;
        const double a = m[l] * q1, b = d[l] * q2, l2 = lam[l] * lam[l];
        s[l] = s0;
        r1[l] = q1;
        r2[l] = q2;
        G[l] = s0 - lam[l] * z3[l] + l2 * (a * a - b * b);
        Gp[l] = 1.0 - 2.0 * l2 * (a * a * q1 + b * b * q2);
        ok[l] = Gp[l] > 0.0;
        right[l] = G[l] < 0.0;
        act[l] = ok[l] && G[l] != 0.0;
    }
    for (int it = 0; it < cfg.maxit; ++it) {
        lane_t any = 0;
#pragma omp simd reduction(| : any)
        for (int l = 0; l < VB; ++l) {
            const double ns = s[l] - G[l] / Gp[l];
            const bool leave = right[l] ? !(ns <= se[l]) : !(ns >= 0.0);
            const bool noprog = right[l] ? !(ns > s[l]) : !(ns < s[l]);
            const bool done = std::fabs(ns - s[l]) <= cfg.tol * ns;
            const bool upd = act[l] && !leave && !noprog;
            const double sn = upd ? ns : s[l];
            const double q1 = 1.0 / (1.0 + sn), q2 = d[l] > 0.0 ? 1.0 / (1.0 - sn) : 0.0;
            const double a = m[l] * q1, b = d[l] * q2, l2 = lam[l] * lam[l];
            const double Gn = sn - lam[l] * z3[l] + l2 * (a * a - b * b);
            const double Gpn = 1.0 - 2.0 * l2 * (a * a * q1 + b * b * q2);
            const bool bad = upd && !(Gpn > 0.0);
            ok[l] = (act[l] && leave) || bad ? 0 : ok[l];
            s[l] = sn;
            r1[l] = upd ? q1 : r1[l];
            r2[l] = upd ? q2 : r2[l];
            G[l] = upd ? Gn : G[l];
            Gp[l] = upd ? Gpn : Gp[l];
            act[l] = upd && !bad && !done && Gn != 0.0;
            any |= act[l];
        }
        if (!any) break;
        if (it + 1 == cfg.maxit) st.capped++;
    }
    // candidate, R(0), R'(0), classification
#pragma omp simd
    for (int l = 0; l < VB; ++l) {
        const double u1 = m[l] * r1[l] + d[l] * r2[l], u2 = m[l] * r1[l] - d[l] * r2[l];
        const double u3 = s[l] / lam[l];
        const bool good = ok[l] && u2 > 0.0 && u3 > 0.0;
        const double e1 = u1 - 1.0, e2 = u2 - z2[l], e3 = u3 - z3[l];
        const double v3 = 0.5 * (e1 * e1 + e2 * e2 + e3 * e3 + z4[l] * z4[l]) + lam[l] * u1 * u2 * u3;
        ok[l] = good;
        G[l] = v3;  // reuse: candidate value
        // R(0) and R'(0) (make_pt at t = 0: c = 0, dc/dt = 1)
        const double E = u1 * u2 + u1 * u3 + u2 * u3;
        const double R = -z4[l] + lam[l] * E;
        const double dGdc = -lam[l] + 2.0 * lam[l] * lam[l] * m[l] * r1[l] * r1[l];
        const double dsdc = -dGdc / Gp[l];
        const double du1 = r1[l] + (-m[l] * r1[l] * r1[l] + d[l] * r2[l] * r2[l]) * dsdc - 1.0;
        const double du2 = r1[l] + (-m[l] * r1[l] * r1[l] - d[l] * r2[l] * r2[l]) * dsdc - 1.0;
        const double du3 = dsdc / lam[l] - 1.0;
        const double Rp = 1.0 + lam[l] * (du1 * (u2 + u3) + du2 * (u1 + u3) + du3 * (u1 + u2));
        double t1 = Rp > 0.0 ? -R / Rp : 0.5 * z4[l];
        t1 = t1 < z4[l] ? t1 : z4[l];
        double s1 = s[l] + dsdc * t1;
        s1 = (s1 > 0.0 && s1 < 1.0) ? s1 : s[l];
        lane_t c = 0;
        if (good && z4[l] > 0.0) c = R < 0.0 ? 1 : (Rp >= 0.0 ? 0 : 2);
        cls[l] = c;
        se[l] = s1;  // reuse: dense start
        d[l] = t1;
        m[l] = u1;  // keep u1 for write-back (m, r1, r2 no longer needed)
        r1[l] = u2;
        r2[l] = u3;
    }
    for (int l = 0; l < VB; ++l) {
        const int g = idx[l];
        if (ok[l] && G[l] < W.best[g]) {
            W.best[g] = G[l];
            W.w[0][g] = m[l];
            W.w[1][g] = r1[l];
            W.w[2][g] = r2[l];
            W.w[3][g] = 0.0;
        }
        W.ts[g] = se[l];
        W.tt[g] = d[l];
        W.s3[g] = s[l];
    }
}

// Stage 3 on one block: Newton's method on (s, t) (see dense_newton), verified.  cls = 1 where it
// did not verify (the lane goes to the scalar path).
inline void stage_dense(const int32_t* idx, Work& W, const Cfg& cfg, Stats& st, lane_t* fail) {
    double z2[VB], z3[VB], z4[VB], lam[VB], s[VB], t[VB];
    for (int l = 0; l < VB; ++l) {
        const int g = idx[l];
        z2[l] = W.z2[g];
        z3[l] = W.z3[g];
        z4[l] = W.z4[g];
        lam[l] = W.lam[g];
        s[l] = W.ts[g];
        t[l] = W.tt[g];
    }
    lane_t act[VB], ok[VB], last[VB];
    double o1[VB], o2[VB], o3[VB], Rp[VB], Gs[VB];
    for (int l = 0; l < VB; ++l) {
        act[l] = 1;
        ok[l] = 1;
        last[l] = 0;
    }
    for (int it = 0; it <= cfg.maxit + 1; ++it) {
        lane_t any = 0;
#pragma omp simd reduction(| : any)
        for (int l = 0; l < VB; ++l) {
            const double L = lam[l], L2 = L * L, il = 1.0 / L;
            const double m = 0.5 * (1.0 + z2[l]), d = 0.5 * (1.0 - z2[l]);
            const double tl = t[l], sl = s[l];
            const double c = tl + L * tl * tl, mc = m + c, cp = 1.0 + 2.0 * L * tl;
            const double q1 = 1.0 / (1.0 + sl), q2 = d > 0.0 ? 1.0 / (1.0 - sl) : 0.0;
            const double a = mc * q1, b = d * q2;
            const double F1 = sl - L * (z3[l] + c) + L2 * (a * a - b * b);
            const double gs = 1.0 - 2.0 * L2 * (a * a * q1 + b * b * q2);
            const double F1t = (-L + 2.0 * L2 * mc * q1 * q1) * cp;
            const double w1 = a + b - tl, w2 = a - b - tl, w3 = sl * il - tl;
            const double S1 = w2 + w3, S2 = w1 + w3, S3 = w1 + w2;
            const double F2 = tl - z4[l] + L * (w1 * w2 + w1 * w3 + w2 * w3);
            const double w1s = -mc * q1 * q1 + d * q2 * q2, w2s = -mc * q1 * q1 - d * q2 * q2;
            const double F2s = L * (w1s * S1 + w2s * S2 + il * S3);
            const double F2t = 1.0 + L * ((q1 * cp - 1.0) * (S1 + S2) - S3);
            const double det = gs * F2t - F1t * F2s;
            const double ds = (-F1 * F2t + F1t * F2) / det;
            const double dt = (-gs * F2 + F2s * F1) / det;
            const bool a_ = act[l] != 0;
            // values at the current point are final for lanes that converged in the last step
            const bool fin = a_ && last[l];
            o1[l] = fin ? w1 : o1[l];
            o2[l] = fin ? w2 : o2[l];
            o3[l] = fin ? w3 : o3[l];
            Gs[l] = fin ? gs : Gs[l];
            Rp[l] = fin ? F2t - F2s * F1t / gs : Rp[l];
            const bool step = a_ && !last[l];
            const double sn = sl + ds, tn = tl + dt;
            const bool bad = step && (!(sn > 0.0 && sn < 1.0 && tn > 0.0) || !(det != 0.0));
            const bool conv = std::fabs(ds) <= cfg.tol * sn && std::fabs(dt) <= cfg.tol * tn;
            ok[l] = bad ? 0 : ok[l];
            s[l] = step && !bad ? sn : sl;
            t[l] = step && !bad ? tn : tl;
            act[l] = step && !bad;
            last[l] = step && !bad && conv;
            any |= act[l];
        }
        if (!any) break;
        if (it == cfg.maxit) {
            st.capped++;
            for (int l = 0; l < VB; ++l)
                if (act[l]) ok[l] = 0;
            break;
        }
    }
    for (int l = 0; l < VB; ++l) {
        const int g = idx[l];
        const double w1 = o1[l], w2 = o2[l], w3 = o3[l], w4 = t[l];
        const bool good = ok[l] && !act[l] && Gs[l] > 0.0 && w2 > 0.0 && w4 > 0.0 &&
                          w3 >= w4 * (1.0 - 1e-12) && Rp[l] >= -1e-10;
        fail[l] = !good;
        if (!good) continue;
        const double z[4] = {1.0, z2[l], z3[l], z4[l]};
        const double v = obj4(z, w1, w2, w3, w4, lam[l]);
        if (v < W.best[g]) {
            W.best[g] = v;
            W.w[0][g] = w1;
            W.w[1][g] = w2;
            W.w[2][g] = w3;
            W.w[3][g] = w4;
        }
    }
}

#if defined(__GNUC__) && !defined(MINISPARSE_NO_VECTOR_EXT)
// The same two stages with explicit vectors of VB lanes (one AVX2 or AVX-512 register each).
typedef double vb_d __attribute__((vector_size(8 * VB)));
typedef int64_t vb_i __attribute__((vector_size(8 * VB)));

static inline vb_d vb_splat(double x) {
    vb_d r;
    for (int l = 0; l < VB; ++l) r[l] = x;
    return r;
}
static inline bool vb_any(vb_i m) {
    int64_t a = 0;
    for (int l = 0; l < VB; ++l) a |= m[l];
    return a != 0;
}

// U independent vectors per call: their dependency chains (divisions) overlap.
constexpr int VU = 2;

// The data of the slots idx[0 .. VU * VB), one lane each.
inline void gather_slots(const int32_t* idx, const Work& W, vb_d* z2, vb_d* z3, vb_d* z4, vb_d* lam) {
    for (int u = 0; u < VU; ++u)
        for (int l = 0; l < VB; ++l) {
            const int j = idx[u * VB + l];
            z2[u][l] = W.z2[j];
            z3[u][l] = W.z3[j];
            z4[u][l] = W.z4[j];
            lam[u][l] = W.lam[j];
        }
}

inline void stage_sp3_v(const int32_t* idx, Work& W, const Cfg& cfg, Stats& st, lane_t* cls) {
    constexpr int U = VU;
    vb_d z2[U], z3[U], z4[U], lam[U];
    // consecutive slots (all blocks but the last of a chunk): whole vectors in and out
    const bool contig = idx[U * VB - 1] == idx[0] + U * VB - 1;
    if (contig) {
        const int j0 = idx[0];
        for (int u = 0; u < U; ++u) {
            std::memcpy(&z2[u], W.z2 + j0 + u * VB, sizeof z2[u]);
            std::memcpy(&z3[u], W.z3 + j0 + u * VB, sizeof z3[u]);
            std::memcpy(&z4[u], W.z4 + j0 + u * VB, sizeof z4[u]);
            std::memcpy(&lam[u], W.lam + j0 + u * VB, sizeof lam[u]);
        }
    } else {
        gather_slots(idx, W, z2, z3, z4, lam);
    }
    const vb_d zero = vb_splat(0.0), one = vb_splat(1.0), half = vb_splat(0.5), two = vb_splat(2.0);
    const vb_d tol = vb_splat(cfg.tol);
    // Newton on G in polynomial form (one division per step): with A = 1 + s and B = 1 - s (B = 1
    // where d = 0, as G then has no d-term), N = G A^2 B^2 and P = G' A^3 B^3 are polynomials with
    // the signs of G and G' (A, B > 0 on the domain s <= se <= z2), and G / G' = N A B / P.
    vb_d m[U], d[U], l2[U], lz3[U], m2[U], d2[U], se[U], s[U], N[U], P[U], pd[U];
    vb_i dpos[U], ok[U], right[U], act[U];
#define MS_NP(sv, Nv, Pv, Av, Bv)                                                    \
    {                                                                                \
        Av = one + (sv);                                                             \
        Bv = dpos[u] ? one - (sv) : one;                                             \
        const vb_d A2 = Av * Av, B2 = Bv * Bv, AB = Av * Bv;                         \
        Nv = ((sv) - lz3[u]) * AB * AB + l2[u] * (m2[u] * B2 - d2[u] * A2);          \
        Pv = AB * AB * AB - two * l2[u] * (m2[u] * B2 * Bv + d2[u] * A2 * Av);        \
    }
    for (int u = 0; u < U; ++u) {
        m[u] = half * (one + z2[u]);
        d[u] = half * (one - z2[u]);
        m2[u] = m[u] * m[u];
        d2[u] = d[u] * d[u];
        l2[u] = lam[u] * lam[u];
        lz3[u] = lam[u] * z3[u];
        dpos[u] = d[u] > zero;
        se[u] = lz3[u] < z2[u] ? lz3[u] : z2[u];
        // G's inflection point (1 - k) / (1 + k), k = sqrt(d / m), is z2 / (1 + sqrt(1 - z2^2))
        vb_d q = one - z2[u] * z2[u];
        for (int l = 0; l < VB; ++l) q[l] = std::sqrt(q[l]);
        vb_d s0 = z2[u] / (one + q);
        s0 = s0 > zero ? s0 : zero;
        s0 = s0 < se[u] ? s0 : se[u];
        s[u] = s0;
        vb_d A, B;
        MS_NP(s0, N[u], P[u], A, B)
        ok[u] = P[u] > zero;
        // A closer start from the right in the convex part: the critical point is a fixed point of
        // the antitone map T_i(u) = z_i - lam u_j u_k on [0, z], so T of lower bounds gives upper
        // bounds and vice versa; from u <= z, two rounds give an upper bound sg = lam U3 >= s.  If
        // G(sg) > 0 < G'(sg) and sg < s0 (so sg lies in the convex part), Newton from sg decreases
        // monotonically to the crossing as from s0, or proves there is none.
        {
            const vb_d lz = lam[u];
            vb_d L1 = one - lz * z2[u] * z3[u], L2 = z2[u] - lz * z3[u], L3 = z3[u] - lz * z2[u];
            L2 = L2 > zero ? L2 : zero;
            L3 = L3 > zero ? L3 : zero;
            const vb_d U1 = one - lz * L2 * L3, U2 = z2[u] - lz * L1 * L3, U3 = z3[u] - lz * L1 * L2;
            vb_d M1 = one - lz * U2 * U3, M2 = z2[u] - lz * U1 * U3;
            M1 = M1 > zero ? M1 : zero;
            M2 = M2 > zero ? M2 : zero;
            const vb_d sg = lz * (z3[u] - lz * M1 * M2);
            vb_d Ng, Pg;
            MS_NP(sg, Ng, Pg, A, B)
            const vb_i use = (sg < s0) & (sg > zero) & (Ng > zero) & (Pg > zero);
            s[u] = use ? sg : s0;
            N[u] = use ? Ng : N[u];
            P[u] = use ? Pg : P[u];
        }
        right[u] = N[u] < zero;
        act[u] = ok[u] & (N[u] != zero);
        pd[u] = zero;  // previous |step| (none yet)
    }
    for (int it = 0; it < cfg.maxit; ++it) {
        bool any = false;
        for (int u = 0; u < U; ++u) any |= vb_any(act[u]);
        if (!any) break;
        for (int u = 0; u < U; ++u) {
            const vb_d A = one + s[u], B = dpos[u] ? one - s[u] : one;
            const vb_d ns = s[u] - N[u] * (A * B) / P[u];
            const vb_i leave = right[u] ? ~(ns <= se[u]) : ~(ns >= zero);
            const vb_i noprog = right[u] ? ~(ns > s[u]) : ~(ns < s[u]);
            const vb_d dd = ns - s[u];
            const vb_d ad = dd < zero ? -dd : dd;
            // converged: the step is below tol, or the steps shrink quadratically (by 1e3 at least)
            // and the next one, predicted as |dd| (|dd| / |previous|)^2, is below tol
            const vb_i done = (ad <= tol * ns) |
                              ((ad * ad * ad <= tol * ns * pd[u] * pd[u]) & (ad <= vb_splat(1e-3) * pd[u]));
            const vb_i upd = act[u] & ~leave & ~noprog;
            pd[u] = upd ? ad : pd[u];
            const vb_d sn = upd ? ns : s[u];
            vb_d Nn, Pn, An, Bn;
            MS_NP(sn, Nn, Pn, An, Bn)
            const vb_i bad = upd & ~(Pn > zero);
            ok[u] = ((act[u] & leave) | bad) ? (ok[u] & 0) : ok[u];
            s[u] = sn;
            N[u] = upd ? Nn : N[u];
            P[u] = upd ? Pn : P[u];
            act[u] = upd & ~bad & ~done & (Nn != zero);
        }
        if (it + 1 == cfg.maxit) {
            bool left = false;
            for (int u = 0; u < U; ++u) left |= vb_any(act[u]);
            if (left) st.capped++;
        }
    }
#undef MS_NP
    for (int u = 0; u < U; ++u) {
        const vb_d A = one + s[u], B = dpos[u] ? one - s[u] : one;
        const vb_d inv = one / (A * B);
        const vb_d r1 = B * inv, r2 = dpos[u] ? A * inv : zero;
        const vb_d Gp = P[u] * inv * inv * inv;
        const vb_d a = m[u] * r1, b = d[u] * r2;
        const vb_d u1 = a + b, u2 = a - b, u3 = s[u] / lam[u];
        const vb_i good = ok[u] & (u2 > zero) & (u3 > zero);
        const vb_d e1 = u1 - one, e2 = u2 - z2[u], e3 = u3 - z3[u];
        const vb_d v3 = half * (e1 * e1 + e2 * e2 + e3 * e3 + z4[u] * z4[u]) + lam[u] * u1 * u2 * u3;
        // R(0) and R'(0) (make_pt at t = 0: c = 0, dc/dt = 1).  With ds/dc = -dG/dc / G', R' is
        // c0 + c1 ds/dc = Q / G' for Q = c0 G' - c1 dG/dc, so one division serves 1/G' and 1/Q.
        const vb_d S1 = u2 + u3, S2 = u1 + u3, S3 = u1 + u2;
        const vb_d E = u1 * u2 + u1 * u3 + u2 * u3;
        const vb_d R = lam[u] * E - z4[u];
        const vb_d mr = m[u] * r1 * r1, dr = d[u] * r2 * r2;
        const vb_d dGdc = two * l2[u] * mr - lam[u];
        const vb_d c0 = one + lam[u] * ((r1 - one) * (S1 + S2) - S3);
        const vb_d c1 = lam[u] * ((dr - mr) * S1 - (mr + dr) * S2) + S3;
        const vb_d Q = c0 * Gp - c1 * dGdc;
        const vb_i qpos = Q > zero;
        const vb_d Qs = qpos ? Q : one;
        const vb_d X = one / (Gp * Qs);
        const vb_d iGp = Qs * X;
        vb_d t1 = qpos ? -R * Gp * X : half * z4[u];
        t1 = t1 < z4[u] ? t1 : z4[u];
        vb_d s1 = s[u] - dGdc * iGp * t1;
        s1 = (s1 > zero) & (s1 < one) ? s1 : s[u];
        const vb_i dense = good & (z4[u] > zero);
        const vb_i i0 = z4[u] != z4[u], i1 = i0 + 1, i2 = i0 + 2;  // integer vectors 0, 1, 2
        const vb_i c = dense ? (R < zero ? i1 : (qpos | (Q == zero) ? i0 : i2)) : i0;
        // the slot's chosen point is still the 2-sparse one, (1, z2, 0, 0) with objective
        // (z3^2 + z4^2) / 2, so the update needs no loads and no branches
        const vb_d b0 = half * (z3[u] * z3[u] + z4[u] * z4[u]);
        const vb_i take = good & (v3 < b0);
        const vb_d nb = take ? v3 : b0, n0 = take ? u1 : one, n1 = take ? u2 : z2[u], n2 = take ? u3 : zero;
        for (int l = 0; l < VB; ++l) cls[u * VB + l] = c[l];
        if (contig) {
            const int j = idx[0] + u * VB;
            std::memcpy(W.best + j, &nb, sizeof nb);
            std::memcpy(W.w[0] + j, &n0, sizeof n0);
            std::memcpy(W.w[1] + j, &n1, sizeof n1);
            std::memcpy(W.w[2] + j, &n2, sizeof n2);
            std::memcpy(W.ts + j, &s1, sizeof s1);
            std::memcpy(W.tt + j, &t1, sizeof t1);
            std::memcpy(W.s3 + j, &s[u], sizeof s[u]);
            continue;  // (w[3] is still stage 1's zero)
        }
        for (int l = 0; l < VB; ++l) {
            const int g = idx[u * VB + l];
            W.best[g] = nb[l];
            W.w[0][g] = n0[l];
            W.w[1][g] = n1[l];
            W.w[2][g] = n2[l];
            W.ts[g] = s1[l];
            W.tt[g] = t1[l];
            W.s3[g] = s[u][l];
        }
    }
}

inline void stage_dense_v(const int32_t* idx, Work& W, const Cfg& cfg, Stats& st, lane_t* fail) {
    constexpr int U = VU;
    vb_d z2[U], z3[U], z4[U], L[U], s[U], t[U];
    gather_slots(idx, W, z2, z3, z4, L);
    for (int u = 0; u < U; ++u)
        for (int l = 0; l < VB; ++l) {
            s[u][l] = W.ts[idx[u * VB + l]];
            t[u][l] = W.tt[idx[u * VB + l]];
        }
    const vb_d zero = vb_splat(0.0), one = vb_splat(1.0), half = vb_splat(0.5), two = vb_splat(2.0);
    const vb_d tol = vb_splat(cfg.tol), tiny = vb_splat(1e-300);
    vb_d L2[U], il[U], m[U], d[U];
    vb_i dpos[U], act[U], ok[U], last[U];
    vb_d o1[U], o2[U], o3[U], Gs[U], oF2t[U], oF2s[U], oF1t[U], pr[U];
    for (int u = 0; u < U; ++u) {
        L2[u] = L[u] * L[u];
        il[u] = one / L[u];
        m[u] = half * (one + z2[u]);
        d[u] = half * (one - z2[u]);
        dpos[u] = d[u] > zero;
        act[u] = L[u] == L[u];
        ok[u] = act[u];
        last[u] = ~act[u];
        o1[u] = o2[u] = o3[u] = Gs[u] = oF2t[u] = oF2s[u] = oF1t[u] = zero;
        pr[u] = zero;  // previous relative step (none yet)
    }
    for (int it = 0; it <= cfg.maxit + 1; ++it) {
        for (int u = 0; u < U; ++u) {
            const vb_d tu = t[u], su = s[u];
            const vb_d c = tu + L[u] * tu * tu, mc = m[u] + c, cp = one + two * L[u] * tu;
            vb_d om = one - su;
            om = om > tiny ? om : tiny;
            const vb_d inv = one / ((one + su) * om);
            const vb_d q1 = om * inv, q2 = dpos[u] ? (one + su) * inv : zero;
            const vb_d a = mc * q1, b = d[u] * q2;
            const vb_d F1 = su - L[u] * (z3[u] + c) + L2[u] * (a * a - b * b);
            const vb_d gs = one - two * L2[u] * (a * a * q1 + b * b * q2);
            const vb_d F1t = (two * L2[u] * mc * q1 * q1 - L[u]) * cp;
            const vb_d w1 = a + b - tu, w2 = a - b - tu, w3 = su * il[u] - tu;
            const vb_d S1 = w2 + w3, S2 = w1 + w3, S3 = w1 + w2;
            const vb_d F2 = tu - z4[u] + L[u] * (w1 * w2 + w1 * w3 + w2 * w3);
            const vb_d w1s = d[u] * q2 * q2 - mc * q1 * q1, w2s = -mc * q1 * q1 - d[u] * q2 * q2;
            const vb_d F2s = L[u] * (w1s * S1 + w2s * S2 + il[u] * S3);
            const vb_d F2t = one + L[u] * ((q1 * cp - one) * (S1 + S2) - S3);
            const vb_d det = gs * F2t - F1t * F2s;
            const vb_d idet = one / det;
            const vb_d ds = (F1t * F2 - F1 * F2t) * idet;
            const vb_d dt = (F2s * F1 - gs * F2) * idet;
            const vb_i fin = act[u] & last[u];  // converged in the previous step: values here are final
            o1[u] = fin ? w1 : o1[u];
            o2[u] = fin ? w2 : o2[u];
            o3[u] = fin ? w3 : o3[u];
            Gs[u] = fin ? gs : Gs[u];
            oF2t[u] = fin ? F2t : oF2t[u];
            oF2s[u] = fin ? F2s : oF2s[u];
            oF1t[u] = fin ? F1t : oF1t[u];
            const vb_i step = act[u] & ~last[u];
            const vb_d sn = su + ds, tn = tu + dt;
            const vb_i bad = step & (~((sn > zero) & (sn < one) & (tn > zero)) | ~(det != zero));
            const vb_d ads = ds < zero ? -ds : ds, adt = dt < zero ? -dt : dt;
            // converged as in stage_sp3_v, on the larger relative step of the two
            const vb_d ist = one / (sn * tn);  // one division for 1/sn and 1/tn
            const vb_d rs = ads * tn * ist, rt = adt * sn * ist, rr = rs > rt ? rs : rt;
            const vb_i conv = ((ads <= tol * sn) & (adt <= tol * tn)) |
                              ((rr * rr * rr <= tol * pr[u] * pr[u]) & (rr <= vb_splat(1e-3) * pr[u]));
            ok[u] = bad ? (ok[u] & 0) : ok[u];
            const vb_i mv = step & ~bad;
            pr[u] = mv ? rr : pr[u];
            s[u] = mv ? sn : su;
            t[u] = mv ? tn : tu;
            act[u] = mv;
            last[u] = mv & conv;
        }
        bool any = false;
        for (int u = 0; u < U; ++u) any |= vb_any(act[u]);
        if (!any) break;
        if (it == cfg.maxit) {
            st.capped++;
            for (int u = 0; u < U; ++u) {
                ok[u] = act[u] ? (ok[u] & 0) : ok[u];
                act[u] = act[u] & 0;
            }
            break;
        }
    }
    for (int u = 0; u < U; ++u) {
        const vb_d Rp = oF2t[u] - oF2s[u] * oF1t[u] / Gs[u];
        const vb_i good = ok[u] & ~act[u] & (Gs[u] > zero) & (o2[u] > zero) & (t[u] > zero) &
                          (o3[u] >= t[u] * vb_splat(1.0 - 1e-12)) & (Rp >= vb_splat(-1e-10));
        for (int l = 0; l < VB; ++l) {
            const int g = idx[u * VB + l];
            fail[u * VB + l] = !good[l];
            if (!good[l]) continue;
            const double z[4] = {1.0, z2[u][l], z3[u][l], z4[u][l]};
            const double v = obj4(z, o1[u][l], o2[u][l], o3[u][l], t[u][l], L[u][l]);
            if (v < W.best[g]) {
                W.best[g] = v;
                W.w[0][g] = o1[u][l];
                W.w[1][g] = o2[u][l];
                W.w[2][g] = o3[u][l];
                W.w[3][g] = t[u][l];
            }
        }
    }
}
#define MS_STAGE_SP3 stage_sp3_v
#define MS_STAGE_DENSE stage_dense_v
constexpr int BS = VB * VU;  // lanes per stage call
#else
#define MS_STAGE_SP3 stage_sp3
#define MS_STAGE_DENSE stage_dense
constexpr int BS = VB;
#endif

// Scalar path for a lane with R(0) >= 0 > R'(0) (3-sparse root s known): interval certificate,
// then the certified walk.
inline void dense_slow(const double* z, double lam, double s, const Cfg& cfg, Stats& st, Best& best) {
    if (screen_dense(z, lam, 8)) return;
    const double m = 0.5 * (z[0] + z[1]), d = 0.5 * (z[0] - z[1]);
    double G, Gp, r1, r2;
    g_eval(s, m, d, lam, lam * lam, z[2], G, Gp, r1, r2);
    Sp3 q;
    q.s = s;
    q.u1 = m * r1 + d * r2;
    q.u2 = m * r1 - d * r2;
    q.u3 = s / lam;
    q.r1 = r1;
    q.r2 = r2;
    q.gp = Gp;
    Pt p0;
    make_pt(z, lam, 0.0, q, p0);
    if (p0.R < 0.0 || p0.Rp >= 0.0) {  // (rounding moved it: the full scalar path decides)
        double w[4];
        solve_sorted(z, lam, cfg, st, w);
        const double v = obj4(z, w[0], w[1], w[2], w[3], lam);
        if (v < best.v) {
            best.v = v;
            for (int i = 0; i < 4; ++i) best.w[i] = w[i];
        }
        return;
    }
    dense_walk(z, lam, p0, std::min(z[3], q.u3), cfg, st, best);
}

template <typename T>
void chunk(const T* y, T* x, int n, const double* lam, int64_t lam_stride, const Cfg& cfg, Stats& st, Work& W) {
    const int k = stage_sort<T>(y, x, n, lam, lam_stride, W);
    st.n3 += W.nid3;
    st.n4 += W.nid4;
    // the listed groups' data, per slot, with the chosen point so far: stage 1's 2-sparse one
    for (int j = W.kslot; j < k; ++j) {
        const int g = W.list[j];
        const double z2 = W.gz2[g], z3 = W.gz3[g], z4 = W.gz4[g];
        W.z2[j] = z2;
        W.z3[j] = z3;
        W.z4[j] = z4;
        W.lam[j] = W.glam[g];
        W.best[j] = 0.5 * (z3 * z3 + z4 * z4);
        W.w[0][j] = 1.0;
        W.w[1][j] = z2;
        W.w[2][j] = 0.0;
        W.w[3][j] = 0.0;
    }
    int k2 = 0, k3 = 0, k4 = 0;
    lane_t cls[BS];
    int32_t idx[BS];
    for (int j = 0; j < k; j += BS) {
        for (int l = 0; l < BS; ++l) idx[l] = std::min(j + l, k - 1);  // slots
        MS_STAGE_SP3(idx, W, cfg, st, cls);
        const int lim = std::min(BS, k - j);
        for (int l = 0; l < lim; ++l) {  // branch free (the classes are unpredictable)
            W.list2[k2] = idx[l];
            k2 += cls[l] == 1;
            W.list3[k3] = idx[l];
            k3 += cls[l] == 2;
        }
    }
    for (int j = 0; j < k2; j += BS) {
        for (int l = 0; l < BS; ++l) idx[l] = W.list2[std::min(j + l, k2 - 1)];
        MS_STAGE_DENSE(idx, W, cfg, st, cls);
        const int lim = std::min(BS, k2 - j);
        for (int l = 0; l < lim; ++l) {
            W.list4[k4] = idx[l];
            k4 += cls[l] != 0;
        }
    }
    for (int j = 0; j < k3; ++j) {
        const int g = W.list3[j];  // (a slot)
        const double z[4] = {1.0, W.z2[g], W.z3[g], W.z4[g]};
        Best best;
        best.v = W.best[g];
        for (int i = 0; i < 4; ++i) best.w[i] = W.w[i][g];
        best.kind = 0;
        dense_slow(z, W.lam[g], W.s3[g], cfg, st, best);
        W.best[g] = best.v;
        for (int i = 0; i < 4; ++i) W.w[i][g] = best.w[i];
    }
    for (int j = 0; j < k4; ++j) {
        const int g = W.list4[j];  // (a slot)
        const double z[4] = {1.0, W.z2[g], W.z3[g], W.z4[g]};
        double w[4];
        solve_sorted(z, W.lam[g], cfg, st, w);
        for (int i = 0; i < 4; ++i) W.w[i][g] = w[i];
    }
    MS_STAGE_OUT<T>(y, x, n, k, W, st);
}

template <typename T>
int64_t run(const T* y, T* x, int64_t ngroups, const double* lam, int64_t lam_stride, double tol,
            int maxit, int nthreads, int64_t* stats) {
    Cfg cfg{tol, maxit};
    int64_t n2 = 0, n3 = 0, n4 = 0, nf = 0, nc = 0;
    const int64_t nchunks = (ngroups + CH - 1) / CH;
    (void)nthreads;
#ifdef _OPENMP
    if (nthreads < 1) nthreads = 1;
    if (nchunks < 2 * nthreads) nthreads = (int)std::max<int64_t>(1, nchunks / 2);
#pragma omp parallel num_threads(nthreads) reduction(+ : n2, n3, n4, nf, nc)
#endif
    {
        Stats st;
        Work* W = new Work;
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 8)
#endif
        for (int64_t c = 0; c < nchunks; ++c) {
            const int64_t g0 = c * CH;
            const int n = (int)std::min<int64_t>(CH, ngroups - g0);
            chunk<T>(y + 4 * g0, x + 4 * g0, n, lam + g0 * lam_stride, lam_stride, cfg, st, *W);
        }
        delete W;
        n2 += st.n2;
        n3 += st.n3;
        n4 += st.n4;
        nf += st.fallback;
        nc += st.capped;
    }
    if (stats) {
        stats[0] = n2;
        stats[1] = n3;
        stats[2] = n4;
        stats[3] = nf;
        stats[4] = nc;
    }
    return 0;
}

}  // namespace

extern "C" {

int minisparse_prox24_abi_version() { return 1; }

int minisparse_prox24_has_openmp() {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

int64_t minisparse_prox24_f32(const float* y, float* x, int64_t ngroups, const double* lam,
                              int64_t lam_stride, double tol, int maxit, int nthreads, int64_t* stats) {
    return run<float>(y, x, ngroups, lam, lam_stride, tol, maxit, nthreads, stats);
}

int64_t minisparse_prox24_f64(const double* y, double* x, int64_t ngroups, const double* lam,
                              int64_t lam_stride, double tol, int maxit, int nthreads, int64_t* stats) {
    return run<double>(y, x, ngroups, lam, lam_stride, tol, maxit, nthreads, stats);
}

}  // extern "C"
