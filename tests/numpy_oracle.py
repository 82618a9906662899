"""Independent float64 numpy oracle for attention (tests only).

Written from the contract of ``lcattn.attend`` entry by entry (explicit loops over batch, head,
query and key) without calling any lcattn helper.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

import lcattn
from lcattn import masks, normalizers, positions

REF = "reference"
# One standard shape for most tests: eager jax compiles every primitive once per shape, so
# sharing shapes keeps the file fast.
B, T, HQ, HKV, D = 2, 12, 4, 2, 8


# ----------------------------------------------------------------------------------------------
# numpy oracle
# ----------------------------------------------------------------------------------------------
def pred_full(q, k):
    return True


def pred_causal(q, k):
    return k <= q


def pred_local(w):
    return lambda q, k: 0 <= q - k < w


def pred_sinks(n):
    return lambda q, k: k < n


def pred_chunked(c):
    return lambda q, k: q // c == k // c


def pred_lambda(w, g):
    return lambda q, k: k <= q and (q - k < w or k < g)


def np_visible(pred, q_pos, k_pos, q_seg=None, kv_seg=None):
    """bool [B, Tq, Tk] built with explicit loops from a predicate on integer positions."""
    b_, tq = q_pos.shape
    tk = k_pos.shape[1]
    vis = np.zeros((b_, tq, tk), dtype=bool)
    for b in range(b_):
        for i in range(tq):
            for j in range(tk):
                ok = bool(pred(int(q_pos[b, i]), int(k_pos[b, j])))
                if q_seg is not None:
                    ok = ok and int(q_seg[b, i]) == int(kv_seg[b, j])
                vis[b, i, j] = ok
    return vis


def np_rope(d, theta=10000.0, scaling=None):
    """(inv_freq [d/2], position divisor, mscale) in float64 from the contract: plain,
    ``("linear", f)`` or ``("ntk", f)`` (YaRN and Llama 3: tests/test_reference_oracle.py)."""
    th = float(theta)
    if scaling is not None and scaling[0] == "ntk":
        th = th * scaling[1] ** (d / (d - 2))
    inv = np.array([th ** (-2.0 * i / d) for i in range(d // 2)], dtype=np.float64)
    divisor, mscale = 1.0, 1.0
    if scaling is not None and scaling[0] == "linear":
        divisor = float(scaling[1])
    return inv, divisor, mscale


def np_rotate(x, pos, rope):
    """Half-split rotation of one head vector x [D] at integer position pos."""
    if rope is None:
        return x
    inv, divisor, mscale = rope
    angle = (float(pos) / divisor) * inv
    c, s = np.cos(angle), np.sin(angle)
    h = x.shape[0] // 2
    x1, x2 = x[:h], x[h:]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s]) * mscale


def oracle(q, k, v, visible, q_pos, k_pos, *, norm="softmax", scale=None, softcap=None,
           p=15.0, warmup=3, rope=None, slopes=None, lm_inf=None):
    """Float64 attention from the contract, one (batch, head, query, key) entry at a time.

    norm: "softmax", "softplus" (LSSA) or "reweighted" (LSSAR).
    rope: output of np_rope(...) or None.  slopes: ALiBi slopes [Hq] or None.
    lm_inf: (window, D) for LM-Infinite's distance limit, or None.
    """
    q = np.asarray(q, np.float64)
    k = np.asarray(k, np.float64)
    v = np.asarray(v, np.float64)
    b_, tq, hq, d = q.shape
    hkv, dv = k.shape[2], v.shape[3]
    group = hq // hkv
    out = np.zeros((b_, tq, hq, dv), np.float64)
    for b in range(b_):
        for h in range(hq):
            g = h // group
            for i in range(tq):
                idx = np.nonzero(visible[b, i])[0]
                n = len(idx)
                if n == 0:
                    continue
                s = np.empty(n, np.float64)
                for t, j in enumerate(idx):
                    pq, pk = int(q_pos[b, i]), int(k_pos[b, j])
                    if lm_inf is not None and pq - pk >= lm_inf[0]:
                        pq, pk = lm_inf[1], 0
                    qv = np_rotate(q[b, i, h], pq, rope)
                    kv = np_rotate(k[b, j, g], pk, rope)
                    if norm == "softmax":
                        sc = scale if scale is not None else 1.0 / math.sqrt(d)
                        val = sc * float(qv @ kv)
                    else:
                        cos = float(qv @ kv) / (np.linalg.norm(qv) * np.linalg.norm(kv))
                        val = math.log(d) * math.log(n) * cos
                    if slopes is not None:
                        val += -slopes[h] * abs(pq - pk)
                    if norm == "softmax" and softcap is not None:
                        val = softcap * math.tanh(val / softcap)
                    s[t] = val
                if norm == "softmax":
                    w = np.exp(s - s.max())
                    w = w / w.sum()
                else:
                    sp = np.logaddexp(0.0, s)  # softplus
                    a = sp / sp.sum()
                    if norm == "reweighted":
                        o = 0.0 if int(q_pos[b, i]) < warmup else 1.0
                        r = np.maximum(n * a - o, 0.0)
                        if r.max() <= 0.0:
                            continue
                        w = (r / r.max()) ** p
                        w = w / w.sum()
                    else:
                        w = a
                out[b, i, h] = w @ v[b, idx, g]
    return out


def data(seed, b, tq, tk, hq, hkv, d, dv=None):
    rng = np.random.default_rng(seed)
    dv = d if dv is None else dv
    q = rng.standard_normal((b, tq, hq, d))
    k = rng.standard_normal((b, tk, hkv, d))
    v = rng.standard_normal((b, tk, hkv, dv))
    return q, k, v


def f32(x):
    return jnp.asarray(x, jnp.float32)


def default_pos(b, t):
    return np.broadcast_to(np.arange(t), (b, t))


def run(q, k, v, spec, **kw):
    out = lcattn.attend(f32(q), f32(k), f32(v), spec, backend=REF, **kw)
    assert out.dtype == jnp.float32
    assert out.shape == q.shape[:3] + (v.shape[3],)
    return np.asarray(out, np.float64)


def spec_of(mask, normalizer=None, position=None, distance_limit=None):
    return lcattn.AttentionSpec(
        mask=mask,
        normalizer=normalizers.Softmax() if normalizer is None else normalizer,
        position=positions.NoPE() if position is None else position,
        distance_limit=distance_limit)


MASK_CASES = {
    "full": (lambda: masks.Full(), pred_full),
    "causal": (lambda: masks.Causal(), pred_causal),
    "local3": (lambda: masks.Local(3), pred_local(3)),
    "chunked4": (lambda: masks.Chunked(4), pred_chunked(4)),
    "chunked4_causal": (lambda: masks.Chunked(4) & masks.Causal(),
                        lambda q, k: q // 4 == k // 4 and k <= q),
    "lambda4_2": (lambda: masks.Lambda(4, 2), pred_lambda(4, 2)),
    "composed_lambda": (lambda: masks.Causal() & (masks.Local(3) | masks.Sinks(2)),
                        pred_lambda(3, 2)),
    "sinks_or_local": (lambda: masks.Sinks(2) | masks.Local(2),
                       lambda q, k: k < 2 or 0 <= q - k < 2),
}


# Hand-written ALiBi slopes (Press et al.), per number of heads.
ALIBI_SLOPES = {
    8: [2.0**-1, 2.0**-2, 2.0**-3, 2.0**-4, 2.0**-5, 2.0**-6, 2.0**-7, 2.0**-8],
    # n=4: 2^(-8h/4) = 2^-2, 2^-4, 2^-6, 2^-8; then entries 0 and 2 of the 2n=8 list.
    6: [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3],
    4: [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8],
    # n=2: 2^-4, 2^-8; then entry 0 of the n=4 list.
    3: [2.0**-4, 2.0**-8, 2.0**-2],
    2: [2.0**-4, 2.0**-8],
}
