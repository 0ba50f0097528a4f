// Attention of a decode step's few queries over a static KV cache, for CPU decoding, eager and compiled
// (mtp/decode/attend.py): the operator mtp::attend, built into the same library as mtp::rowdot.
//
// out (B, H, T, hd) = softmax(q k^T * scale, masked) v, with q (B, H, T, hd), the cache's keys and
// values k, v (B, Hkv, S, hd) (grouped-query attention: head h reads group h / (H / Hkv)) and a
// boolean mask (B, 1 or H, T, S), float32. Each query is computed on its own, reading only the cache
// positions its mask lets it see (a compiled step's cache is max_len long, most of it not written
// yet), in a fixed order: a query's output does not depend on the other queries of the step, so a
// speculative step's attention equals a greedy step's to the bit. The output is laid out (B, T, H, hd)
// (returned as the (B, H, T, hd) view), which is what the attention's output projection reads.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <cmath>
#include <limits>
#include <torch/library.h>
#include <vector>

#include "simd.h"

namespace {

struct Strides {
    int64_t b, h, t;  // of the batch, head and position dimensions (the last one's stride is 1)
};

// the dot product of hd floats: HV full vectors (HV > 0: a compile-time count) then a tail, in a fixed order
template <int HV>
inline float dot(const float *a, const float *b, long hd) {
    V acc = vzero();
    const long nv = HV > 0 ? HV : hd / VW;
    for (long j = 0; j < nv; j++) acc = vfma(vload(a + j * VW), vload(b + j * VW), acc);
    float s = vsum(acc);
    for (long j = nv * VW; j < hd; j++) s = __builtin_fmaf(a[j], b[j], s);
    return s;
}

// e^x lane by lane for x <= 0 (Cephes' expf: 2^n times a polynomial on the remainder; about 1 ulp),
// and 0 where x is -inf (a position the query does not see)
inline V vexp_or_zero(V x) {
    const V ninf = vset1(-std::numeric_limits<float>::infinity());
#if defined(__AVX512F__)
    const __mmask16 hidden = _mm512_cmp_ps_mask(x, ninf, _CMP_EQ_OQ);
    x = _mm512_max_ps(x, vset1(-87.3f));
    const V n = _mm512_roundscale_ps(_mm512_mul_ps(x, vset1(1.44269504f)),  // x / ln 2, rounded
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
    const V hidden = _mm256_cmp_ps(x, ninf, _CMP_EQ_OQ);
    x = _mm256_max_ps(x, vset1(-87.3f));
    const V n = _mm256_round_ps(_mm256_mul_ps(x, vset1(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#endif
    V r = vfma(n, vset1(-0.693359375f), x);
    r = vfma(n, vset1(2.12194440e-4f), r);
    V p = vset1(1.9875691500e-4f);
    p = vfma(p, r, vset1(1.3981999507e-3f));
    p = vfma(p, r, vset1(8.3334519073e-3f));
    p = vfma(p, r, vset1(4.1665795894e-2f));
    p = vfma(p, r, vset1(1.6666665459e-1f));
    p = vfma(p, r, vset1(5.0000001201e-1f));
#if defined(__AVX512F__)
    p = _mm512_add_ps(vfma(p, _mm512_mul_ps(r, r), r), vset1(1.f));
    const __m512i biased = _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127));
    const V scale = _mm512_castsi512_ps(_mm512_slli_epi32(biased, 23));  // 2^n
    return _mm512_maskz_mul_ps(~hidden, p, scale);
#else
    p = _mm256_add_ps(vfma(p, _mm256_mul_ps(r, r), r), vset1(1.f));
    const __m256i biased = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
    const V scale = _mm256_castsi256_ps(_mm256_slli_epi32(biased, 23));  // 2^n
    return _mm256_andnot_ps(hidden, _mm256_mul_ps(p, scale));
#endif
}

// one query: q (hd), the group's keys and values (row s at k + s * ks), its mask (mask[s * ms]),
// out (hd); sc: S floats of scratch
template <int HV>
void attend_query(const float *q, const float *k, const float *v, int64_t ks, int64_t vs, const bool *mask,
                  int64_t ms, long S, long hd, float scale, float *out, float *sc) {
    const float ninf = -std::numeric_limits<float>::infinity();
    float mx = ninf;
    for (long s = 0; s < S; s++) {
        sc[s] = mask[s * ms] ? dot<HV>(q, k + s * ks, hd) * scale : ninf;
        mx = sc[s] > mx ? sc[s] : mx;
    }
    if (mx == ninf) {  // nothing to attend to: zeros, not NaN
        for (long j = 0; j < hd; j++) out[j] = 0.f;
        return;
    }
    // the weights e^(score - max), 0 where hidden, and their sum, in a fixed order
    const long sv = S - S % VW;
    const V vmx = vset1(mx);
    V vsum_ = vzero();
    for (long s = 0; s < sv; s += VW) {
        const V e = vexp_or_zero(vsub(vload(sc + s), vmx));
        vsum_ = vadd(vsum_, e);
        vstore(sc + s, e);
    }
    float sum = vsum(vsum_);
    for (long s = sv; s < S; s++) {
        sc[s] = sc[s] == ninf ? 0.f : std::exp(sc[s] - mx);
        sum += sc[s];
    }
    const float inv = 1.f / sum;
    if constexpr (HV > 0) {
        V acc[HV];
        for (int j = 0; j < HV; j++) acc[j] = vzero();
        for (long s = 0; s < S; s++)
            if (mask[s * ms]) {
                const V p = vset1(sc[s] * inv);
                const float *vr = v + s * vs;
#pragma GCC unroll 8
                for (int j = 0; j < HV; j++) acc[j] = vfma(p, vload(vr + j * VW), acc[j]);
            }
        for (int j = 0; j < HV; j++) vstore(out + j * VW, acc[j]);
    } else {
        for (long j = 0; j < hd; j++) out[j] = 0.f;  // any hd: one column at a time
        for (long s = 0; s < S; s++)
            if (mask[s * ms]) {
                const float p = sc[s] * inv;
                for (long j = 0; j < hd; j++) out[j] = __builtin_fmaf(p, v[s * vs + j], out[j]);
            }
    }
}

typedef void (*query_fn)(const float *, const float *, const float *, int64_t, int64_t, const bool *, int64_t,
                         long, long, float, float *, float *);

query_fn pick(long hd) {
    if (hd % VW) return attend_query<0>;
    switch (hd / VW) {
        case 1: return attend_query<1>;
        case 2: return attend_query<2>;
        case 4: return attend_query<4>;
        case 8: return attend_query<8>;
        default: return attend_query<0>;
    }
}

at::Tensor attend_cpu(const at::Tensor &q_, const at::Tensor &k_, const at::Tensor &v_, const at::Tensor &mask,
                      double scale) {
    TORCH_CHECK(q_.scalar_type() == at::kFloat && k_.scalar_type() == at::kFloat && v_.scalar_type() == at::kFloat,
                "attend takes float32 q, k, v");
    TORCH_CHECK(mask.scalar_type() == at::kBool, "attend takes a boolean mask");
    TORCH_CHECK(q_.dim() == 4 && k_.dim() == 4 && v_.dim() == 4 && mask.dim() == 4, "attend takes 4-D tensors");
    const int64_t B = q_.size(0), H = q_.size(1), T = q_.size(2), hd = q_.size(3);
    const int64_t G = k_.size(1), S = k_.size(2);
    TORCH_CHECK(k_.size(0) == B && v_.size(0) == B && v_.size(1) == G && v_.size(2) == S && k_.size(3) == hd &&
                    v_.size(3) == hd && G > 0 && H % G == 0,
                "attend: q, k, v do not fit");
    TORCH_CHECK(mask.size(0) == B && (mask.size(1) == 1 || mask.size(1) == H) && mask.size(2) == T &&
                    mask.size(3) == S,
                "attend: the mask does not fit");
    // the innermost dimension contiguous (a cache's view is; anything else is copied once)
    const at::Tensor q = q_.stride(3) == 1 ? q_ : q_.contiguous(), k = k_.stride(3) == 1 ? k_ : k_.contiguous(),
                     v = v_.stride(3) == 1 ? v_ : v_.contiguous();
    at::Tensor out = at::empty({B, T, H, hd}, q.options());
    const Strides qs{q.stride(0), q.stride(1), q.stride(2)}, kst{k.stride(0), k.stride(1), k.stride(2)},
        vst{v.stride(0), v.stride(1), v.stride(2)};
    const int64_t mb = mask.stride(0), mh = mask.size(1) == 1 ? 0 : mask.stride(1), mt = mask.stride(2),
                  msd = mask.stride(3);
    const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
    const bool *mp = mask.data_ptr<bool>();
    float *op = out.data_ptr<float>();
    const query_fn fn = pick(hd);
    const int64_t rep = H / G;
    if (B * H * T == 0) return out.transpose(1, 2);
    at::parallel_for(0, B * H * T, 1, [&](int64_t i0, int64_t i1) {
        std::vector<float> sc(S > 0 ? S : 1);
        for (int64_t i = i0; i < i1; i++) {
            const int64_t b = i / (H * T), h = i / T % H, t = i % T, g = h / rep;
            fn(qp + b * qs.b + h * qs.h + t * qs.t, kp + b * kst.b + g * kst.h, vp + b * vst.b + g * vst.h, kst.t,
               vst.t, mp + b * mb + h * mh + t * mt, msd, S, hd, (float)scale, op + ((b * T + t) * H + h) * hd,
               sc.data());
        }
    });
    return out.transpose(1, 2);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mtp, m) {
    m.def("attend(Tensor q, Tensor k, Tensor v, Tensor mask, float scale) -> Tensor");
}
TORCH_LIBRARY_IMPL(mtp, CPU, m) {
    m.impl("attend", &attend_cpu);
}
