"""Block-sparse flash attention forward for GPUs without WGMMA (Pallas Triton): the fallback
of ``flash_attention`` (sm_90a only) for Ampere / Ada GPUs (A100, L4, RTX 30xx / 40xx).

``flash_attention_pass`` has the Mosaic kernel's contract: for each query row ``i`` of
``q [B, Hq, Tq, D]``, ``lse_i = log sum_j exp(t_ij)`` and ``out_i = sum_j exp(t_ij - lse_i)
v_j`` over the keys visible under ``mask`` (and equal segment ids), ``t =
normalizer.log_weight(q k^T + bias, ctx)``; GQA reads kv head ``h // (Hq // Hkv)``.

One program per (query tile, query head, batch row), query tiles in reverse order (the
longest causal rows start first). It loads its ``block_q`` query rows once and walks the
tile's list of non-empty kv blocks (``pack_lists``: ``[count, 2 * kv_block + full, ...]`` in
GMEM, a run-time trip count): ``block_k`` keys and values per step straight from GMEM
(Triton pipelines the loads over ``num_stages``), ``QK^T`` and ``PV`` on the tensor cores
(``mma.sync``) with float32 accumulation, the mask evaluated only on PARTIAL tiles. float32
q and k take IEEE float32 ``QK^T`` (not TF32): the operand precision LSSAR's power needs.
Forward only: ``lcattn``'s ``pallas_triton`` backend differentiates through the ``xla`` pass.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import block_sparse
from pallas_kernels.block_sizes import BlockSizes
from pallas_kernels.block_sparse import pad_axis
from pallas_kernels.gpu.flash_attention import info_rows, pack_lists
from pallas_kernels.protocols import Bias
from pallas_kernels.vma import varying_struct

LOG2E = math.log2(math.e)
DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
DEFAULT_BLOCKS = (64, 64)
OWNER = "pallas_kernels.gpu.triton_forward.flash_attention_pass"


def _power_of_two(n: int, low: int, high: int) -> bool:
    return low <= n <= high and n & (n - 1) == 0


def check_inputs(q, k, v, blocks: tuple[int, int], num_warps: int, num_stages: int,
                 owner: str = OWNER) -> None:
    """Raise ``ValueError`` naming what the Triton kernel cannot do with these inputs."""
    arrays = {"q": q, "k": k} | ({} if v is None else {"v": v})
    dtypes = {n: jnp.dtype(a.dtype) for n, a in arrays.items()}
    if dtypes["q"] not in map(jnp.dtype, DTYPES) or dtypes["k"] != dtypes["q"] \
            or dtypes.get("v", jnp.dtype(jnp.float32)) not in map(jnp.dtype, DTYPES):
        got = ", ".join(f"{n}={t}" for n, t in dtypes.items())
        raise ValueError(f"{owner}: q and k must share one of bfloat16, float16, float32 (v any "
                         f"of them), got {got}")
    for name, a in arrays.items():
        if a.ndim != 4:
            raise ValueError(f"{owner}: `{name}` must be [B, H, T, D], got shape {a.shape}")
        if not _power_of_two(a.shape[-1], 16, 256):
            raise ValueError(f"{owner}: head_dim of `{name}` must be a power of two from 16 to "
                             f"256 (Triton tiles), got {a.shape[-1]}")
    for name, n in zip(("block_q", "block_k"), blocks):
        if not _power_of_two(n, 16, 256):
            raise ValueError(f"{owner}: {name} must be a power of two from 16 to 256, got {n}")
    if num_warps not in (1, 2, 4, 8, 16):
        raise ValueError(f"{owner}: `num_warps` must be 1, 2, 4, 8 or 16, got {num_warps!r}")
    if not isinstance(num_stages, int) or num_stages < 1:
        raise ValueError(f"{owner}: `num_stages` must be an integer >= 1, got {num_stages!r}")


@dataclasses.dataclass(frozen=True)
class Static:
    """What the kernel specializes on; fields as ``kernels.Static`` (``q_fields`` /
    ``k_fields`` name the int32 info rows, iota positions when ``"pos"`` is absent); shared
    with ``triton_backward``."""

    mask: Any
    normalizer: Any
    pass_idx: int
    ctx_names: tuple[str, ...]
    q_fields: tuple[str, ...]
    k_fields: tuple[str, ...]
    q_offset: int
    k_offset: int
    block_q: int
    block_k: int
    n_q_tiles: int
    kv_len: int
    kv_padded: bool
    with_values: bool
    bias_fn: Any = None
    group: int = 1  # Hq // Hkv (the backward's dK/dV walk)


def _tile(x, shape, dim):
    return lax.broadcast_in_dim(x, shape, [dim])


def precision(x):
    """IEEE float32 dots for float32 operands (not TF32); the default for 16-bit ones."""
    return lax.Precision.HIGHEST if x.dtype == jnp.float32 else None


def scores_and_log_weights(st: Static, q, k, ctx, q_info, k_info, col0, full, slope):
    """``(s, t)`` of one ``[block_q, block_k]`` tile: ``s = q k^T (+ bias)`` in float32, ``t =
    log_weight(s, ctx)`` with ``-inf`` where a PARTIAL tile's key is not visible (mask, segment
    ids, padded keys; FULL tiles skip the test). ``q_info`` / ``k_info``: ``{field: tile}``
    with the query's ``"pos"`` always present, the key's when not iota."""
    shape = (st.block_q, st.block_k)
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision(q),
                        preferred_element_type=jnp.float32)
    if st.bias_fn is not None:
        s = s + st.bias_fn(q_info["bias"], k_info["bias"], slope)
    t = st.normalizer.log_weight(s, ctx, st.pass_idx)

    def visible(t):
        key = col0 + lax.broadcasted_iota(jnp.int32, shape, 1)
        vis = st.mask(q_info["pos"], k_info["pos"] if "pos" in k_info else st.k_offset + key)
        if "seg" in q_info:
            vis = vis & (q_info["seg"] == k_info["seg"])
        if st.kv_padded:
            vis = vis & (key < st.kv_len)
        return jnp.where(vis, t, -jnp.inf)

    return s, lax.cond(full, lambda t: t, visible, t)


def query_side(st: Static, r, row0, rows):
    """``{field: [block_q, block_k] tile}`` of the query rows ``rows`` (a slice from
    ``row0``): info refs ``r["q_<field>"]`` (1-D), iota positions when there is no "pos"."""
    shape = (st.block_q, st.block_k)
    info = {f: _tile(r[f"q_{f}"][rows], shape, 0) for f in st.q_fields}
    if "pos" not in info:
        info["pos"] = st.q_offset + row0 + lax.broadcasted_iota(jnp.int32, shape, 0)
    return info


def key_side(st: Static, r, cols):
    """``{field: [block_q, block_k] tile}`` of the keys ``cols`` (refs ``r["k_<field>"]``)."""
    return {f: _tile(r[f"k_{f}"][cols], (st.block_q, st.block_k), 1) for f in st.k_fields}


def _kernel(st: Static, names, *refs):
    r = dict(zip(names, refs))
    i = st.n_q_tiles - 1 - pl.program_id(0)
    h = pl.program_id(1)
    shape = (st.block_q, st.block_k)
    q = r["q"][...]
    ctx = {n: _tile(r[f"ctx_{n}"][...], shape, 0) for n in st.ctx_names}
    q_info = query_side(st, r, i * st.block_q, slice(None))
    slope = r["slopes"][h] if st.bias_fn is not None else None

    def step(s, carry):
        m, l, acc = carry
        entry = r["lists"][i, 1 + s]
        col0 = pl.multiple_of(lax.div(entry, 2) * st.block_k, st.block_k)
        cols = pl.ds(col0, st.block_k)
        _, t = scores_and_log_weights(st, q, r["k"][cols, :], ctx, q_info, key_side(st, r, cols),
                                      col0, lax.rem(entry, 2) == 1, slope)
        m_new = jnp.maximum(m, t.max(axis=1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new) * LOG2E
        alpha = jnp.exp2(m * LOG2E - m_safe)
        p = jnp.exp2(t * LOG2E - m_safe[:, None])
        l = l * alpha + p.sum(axis=1)
        if st.with_values:
            v = r["v"][cols, :]
            acc = acc * alpha[:, None] + jnp.dot(p.astype(v.dtype), v, precision=precision(v),
                                                 preferred_element_type=jnp.float32)
        return m_new, l, acc

    m = jnp.full((st.block_q,), -jnp.inf, jnp.float32)
    l = jnp.zeros((st.block_q,), jnp.float32)
    acc = jnp.zeros((st.block_q, r["v"].shape[-1]), jnp.float32) if st.with_values else None
    m, l, acc = lax.fori_loop(0, r["lists"][i, 0], step, (m, l, acc))
    live = l > 0.0
    safe_l = jnp.where(live, l, 1.0)
    r["lse"][...] = jnp.where(live, m + jnp.log(safe_l), -jnp.inf)
    if st.with_values:
        r["o"][...] = (acc * jnp.where(live, 1.0 / safe_l, 0.0)[:, None]).astype(r["o"].dtype)


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the forward and the backward kernels share: ``st``, the padded lengths
    ``(Tq, Tk)``, the tile classes, the int32 info rows ``[B, F, T]`` (or None), the ALiBi
    ``slopes`` and the Triton ``launch`` options."""

    st: Static
    padded: tuple[int, int]
    classes: Any
    q_info: Any
    k_info: Any
    slopes: Any
    launch: dict

    def key_inputs(self, index_map) -> dict:
        """Kernel inputs: each key-side info row whole (``[B, Tk]`` -> ``[Tk]``), and the
        slopes."""
        ins = {f"k_{name}": (self.k_info[:, f], pl.BlockSpec((None, self.padded[1]), index_map))
               for f, name in enumerate(self.st.k_fields)}
        return ins | ({} if self.slopes is None else {"slopes": (self.slopes, None)})


def plan(q, k, v, ctx, blocks, num_warps, num_stages, interpret, owner, *, mask, normalizer,
         pass_idx, q_positions, k_positions, q_segment_ids, kv_segment_ids, bias) -> Plan:
    """Checks (naming ``owner``), padding, tile classes and info rows for one pass."""
    num_warps = (4 if q.shape[-1] < 128 else 8) if num_warps is None else num_warps
    check_inputs(q, k, v, blocks, num_warps, num_stages, owner)
    hq, tq, hk, tk = q.shape[1], q.shape[2], k.shape[1], k.shape[2]
    if hq % hk:
        raise ValueError(f"GQA: query heads ({hq}) must be a multiple of kv heads ({hk})")
    bq, bk = blocks
    tq_p, tk_p = -(-tq // bq) * bq, -(-tk // bk) * bk
    padded = block_sparse.padded_rows(
        q_positions, k_positions, q_segment_ids, kv_segment_ids, tq_p, tk_p)
    q_off, k_off, qp, kp, qs, ks = padded
    classes = block_sparse.padded_tile_classes(mask, qp, kp, blocks, qs, ks, tk)
    q_fields, q_info, k_fields, k_info, slopes = info_rows(padded, bias, hq, tq_p, tk_p)
    st = Static(mask=mask, normalizer=normalizer, pass_idx=pass_idx, ctx_names=tuple(ctx),
                q_fields=q_fields, k_fields=k_fields, q_offset=q_off or 0, k_offset=k_off or 0,
                block_q=bq, block_k=bk, n_q_tiles=tq_p // bq, kv_len=tk, kv_padded=tk_p != tk,
                with_values=v is not None, bias_fn=None if bias is None else bias.fn,
                group=hq // hk)
    launch = dict(num_warps=num_warps, num_stages=num_stages,
                  interpret=jax.default_backend() != "gpu" if interpret is None else interpret)
    return Plan(st, (tq_p, tk_p), classes, q_info, k_info, slopes, launch)


def call(kernel, st: Static, grid, ins: dict, outs: dict, name: str, launch: dict) -> dict:
    """``pallas_call`` of ``kernel(st, names, *refs)`` over ``ins`` / ``outs`` = ``{name:
    (array or ShapeDtypeStruct, BlockSpec or None)}`` (None: the whole array); returns
    ``{out name: array}``."""
    names = list(ins) + list(outs)
    whole = lambda a, spec: (  # noqa: E731
        pl.BlockSpec(a.shape, lambda *_: (0,) * a.ndim) if spec is None else spec)
    result = pl.pallas_call(
        lambda *refs: kernel(st, names, *refs), grid=grid,
        in_specs=[whole(a, s) for a, s in ins.values()],
        out_specs=[s for _, s in outs.values()], out_shape=[a for a, _ in outs.values()],
        compiler_params=pltriton.CompilerParams(num_warps=launch["num_warps"],
                                                num_stages=launch["num_stages"]),
        interpret=launch["interpret"], name=name)(*(a for a, _ in ins.values()))
    return dict(zip(outs, result))


def flash_attention_pass(q, k, v, ctx: dict, *, mask, normalizer, pass_idx: int = 0,
                         q_positions, k_positions, q_segment_ids=None, kv_segment_ids=None,
                         bias: Bias | None = None,
                         block_sizes: BlockSizes | tuple[int, int] | None = None,
                         num_warps: int | None = None, num_stages: int = 2, interpret=None):
    """One forward pass: ``(out [B, Hq, Tq, Dv] float32 or None, lse [B, Hq, Tq] float32)``.

    Args as ``flash_attention.flash_attention_pass``, except: q, k, v bfloat16, float16 or
    float32 (float32 ``QK^T`` and ``PV`` in IEEE float32, not TF32), head dims powers of two
    from 16 to 256; ``block_sizes``: ``(block_q, block_k)`` powers of two from 16 to 256
    (default ``DEFAULT_BLOCKS``); ``num_warps`` (default 4, 8 from head_dim 128) and
    ``num_stages`` (software pipelining of the K / V loads) go to Triton; ``interpret``: None
    runs in interpret mode off GPU, True always, False compiles.
    """
    blocks = DEFAULT_BLOCKS if block_sizes is None else BlockSizes.of(block_sizes).forward
    setup = plan(q, k, v, ctx, blocks, num_warps, num_stages, interpret, OWNER, mask=mask,
               normalizer=normalizer, pass_idx=pass_idx, q_positions=q_positions,
               k_positions=k_positions, q_segment_ids=q_segment_ids,
               kv_segment_ids=kv_segment_ids, bias=bias)
    st, (tq_p, tk_p) = setup.st, setup.padded
    b, hq, tq, d = q.shape
    bq, nq, group = st.block_q, st.n_q_tiles, st.group
    lists = block_sparse.block_lists(setup.classes)

    def rev(i):
        return nq - 1 - i

    rows = lambda *tail: pl.BlockSpec(  # noqa: E731  [B, Hq, Tq, ...] -> one query tile
        (None, None, bq, *tail), lambda i, h, z: (z, h, rev(i), *(0 for _ in tail)))
    kv = lambda width: pl.BlockSpec(  # noqa: E731  [B, Hkv, Tk, width] -> one kv head
        (None, None, tk_p, width), lambda i, h, z: (z, lax.div(h, group), 0, 0))
    ins = {"lists": (pack_lists(lists), None), "q": (pad_axis(q, tq_p, 2), rows(d)),
           "k": (pad_axis(k, tk_p, 2), kv(d))}
    if v is not None:
        ins["v"] = (pad_axis(v, tk_p, 2), kv(v.shape[-1]))
    for n in st.ctx_names:
        ins[f"ctx_{n}"] = (pad_axis(jnp.asarray(ctx[n], jnp.float32), tq_p, 2), rows())
    for f, name in enumerate(st.q_fields):
        ins[f"q_{name}"] = (setup.q_info[:, f], pl.BlockSpec((None, bq),
                                                           lambda i, h, z: (z, rev(i))))
    ins |= setup.key_inputs(lambda i, h, z: (z, 0))
    outs = {"lse": (varying_struct((b, hq, tq_p), jnp.float32, (q, k, v)), rows())}
    if v is not None:
        outs = {"o": (varying_struct((b, hq, tq_p, v.shape[-1]), q.dtype, (q, k, v)),
                      rows(v.shape[-1])), **outs}
    result = call(_kernel, st, (nq, hq, b), ins, outs, "block_sparse_flash_attention_triton",
                  setup.launch)
    out, lse = result.get("o"), result["lse"]
    return (None if out is None else out[:, :, :tq].astype(jnp.float32)), lse[:, :, :tq]
