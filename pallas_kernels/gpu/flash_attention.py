"""Block-sparse flash attention on Hopper GPUs (Pallas Mosaic GPU): one forward pass.

``flash_attention_pass`` computes, for each query row ``i`` of ``q [B, Hq, Tq, D]``,
``lse_i = log sum_j exp(t_ij)`` and ``out_i = sum_j exp(t_ij - lse_i) v_j`` over the keys
visible under ``mask`` (and equal segment ids), with ``t = normalizer.log_weight(q k^T, ctx)``
-- the contract of ``pallas_kernels.tpu.flash_attention_pass``, forward only. GQA: query head
``h`` reads kv head ``h // (Hq // Hkv)``, K/V are never repeated.

Here: the checks (sm_90a WGMMA needs bf16 / fp16 operands and a head dim that is a multiple
of 64 up to 256), padding (any length: queries to the tile, keys to the kv block, padded keys
masked in the kernel), the block lists of the mask's tile classes packed for GMEM, and the
int32 position / segment-id rows the kernel copies next to each tile.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

try:  # the Mosaic GPU interpreter's options (a private module in jax 0.10)
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
except ImportError:  # another jax: compiling still works, interpreting needs its class
    InterpretGPUParams = None

from pallas_kernels import block_sparse
from pallas_kernels.block_sizes import BlockSizes
from pallas_kernels.block_sparse import pad_axis
from pallas_kernels.gpu import kernels
from pallas_kernels.protocols import Bias

WGMMA_M = 64  # query rows per compute warpgroup (one WGMMA M tile)
DTYPES = (jnp.bfloat16, jnp.float16)
SPLIT_DTYPE = jnp.dtype(jnp.bfloat16)  # the halves of split_qk's q and k
HEAD_DIMS = (64, 128, 192, 256)
DEFAULT_BLOCKS = ((128, 128), (128, 64), (64, 64))  # the first that fits SMEM
PINGPONG = False  # the default schedule until attention_gpu has measured both on a GPU
MAX_FIELDS = 3  # info rows per side at most (positions, segment ids, bias positions)
SMEM_BYTES = 227 * 1024  # sm_90a's shared memory per thread block
OWNER = "pallas_kernels.gpu.flash_attention_pass"


def check_inputs(q, k, v, blocks: tuple[int, int], stages: int, split_qk: bool = False,
                 owner: str = OWNER) -> None:
    """Raise ``ValueError`` naming what the sm_90a kernel cannot do with these inputs."""
    arrays = {"q": q, "k": k} | ({} if v is None else {"v": v})
    dtypes = {n: jnp.dtype(a.dtype) for n, a in arrays.items()}
    got = ", ".join(f"{n}={t}" for n, t in dtypes.items())
    if split_qk:
        if dtypes["q"] != jnp.float32 or dtypes["k"] != jnp.float32 \
                or dtypes.get("v", jnp.dtype(SPLIT_DTYPE)) != SPLIT_DTYPE:
            raise ValueError(f"{owner}: split_qk=True takes float32 q, k (split into bfloat16 "
                             f"halves) and bfloat16 v, got {got}")
    elif dtypes["q"] not in map(jnp.dtype, DTYPES) or len(set(dtypes.values())) > 1:
        raise ValueError(f"{owner}: q, k, v must all be bfloat16 or float16 (WGMMA operands), "
                         f"got {got}")
    for name, a in arrays.items():
        if a.ndim != 4:
            raise ValueError(f"{owner}: `{name}` must be [B, H, T, D], got shape {a.shape}")
        if a.shape[-1] not in HEAD_DIMS:
            raise ValueError(f"{owner}: head_dim of `{name}` must be one of {HEAD_DIMS} on "
                             f"sm_90a, got {a.shape[-1]}")
    bq, bk = blocks
    if bq not in (64, 128, 256):
        raise ValueError(f"{owner}: block_q must be 64, 128 or 256 (64 or 128 query rows per "
                         f"compute warpgroup), got {bq}")
    if bk % 64 or bk > 256:
        raise ValueError(f"{owner}: block_k must be a multiple of 64 up to 256, got {bk}")
    if not isinstance(stages, int) or stages < 2:
        raise ValueError(f"{owner}: `stages` must be an integer >= 2, got {stages!r}")


def split(x, on: bool):
    """``(hi, lo)``: float32 ``x`` as two bfloat16 arrays with ``hi + lo = x`` to 16 mantissa
    bits (``on``), or ``(x, None)``."""
    if not on:
        return x, None
    hi = x.astype(SPLIT_DTYPE)
    return hi, (x - hi.astype(jnp.float32)).astype(SPLIT_DTYPE)


def compute_capability() -> str | None:
    """The first GPU's compute capability (``"9.0"`` on H100 / H200); None off GPU."""
    if jax.default_backend() != "gpu":
        return None
    return str(getattr(jax.devices()[0], "compute_capability", "")) or "?"


def _check_device() -> None:
    """On a GPU backend, the device must be sm_90 (WGMMA exists on Hopper only)."""
    cc = compute_capability()
    if cc not in (None, "9.0"):  # None: CPU, cross-lowering for CUDA or the interpreter
        raise ValueError(f"{OWNER}: needs an sm_90 (Hopper: H100 / H200) GPU for WGMMA, got "
                         f"{jax.devices()[0].device_kind} (compute capability {cc}); use "
                         f"triton_forward (any GPU from sm_80) there")


def smem_bytes(d, dv, blocks, stages, n_qi, n_ki, n_ctx, split_qk) -> int:
    """The forward kernel's SMEM for 2-byte operands: operand tiles (and their low halves
    with ``split_qk``), ``n_qi`` / ``n_ki`` int32 info rows, ``n_ctx`` f32 context rows,
    barriers."""
    bq, bk = blocks
    tiles = 2 * (bq + stages * bk) * (d + dv + (d if split_qk else 0))
    rows = 4 * (bq * (1 + n_qi + n_ctx) + stages * bk * n_ki)
    return tiles + rows + 4096  # + barriers and alignment (measured: < 2.2 KiB)


def fitting_blocks(candidates, need, owner: str, what: str) -> tuple[int, int]:
    """The first of ``candidates`` whose ``need(blocks)`` fits sm_90a's SMEM, else an error."""
    for blocks in candidates:
        if (bytes_ := need(blocks)) <= SMEM_BYTES:
            return blocks
    raise ValueError(f"{owner}: {what} tiles of {blocks[0]} x {blocks[1]} need about {bytes_} "
                     f"bytes of shared memory, more than sm_90a's {SMEM_BYTES}; use smaller "
                     f"blocks or fewer stages")


def pack_lists(lists: block_sparse.BlockLists):
    """int32 ``[nq, W]`` (W a multiple of 4): ``[count, 2 * kv_block + full, ...]`` per row."""
    xp = np if lists.static else jnp
    entries = lists.kv_index.astype(np.int32) * 2 + lists.kv_full.astype(np.int32)
    packed = xp.concatenate([lists.kv_count.astype(np.int32)[:, None], entries], axis=1)
    return jnp.asarray(pad_axis(packed, -(-packed.shape[1] // 4) * 4, 1))


def _info(fields: dict):
    """``(names, int32 [B, F, T] or None)`` of the given ``[B, T]`` fields."""
    names = tuple(n for n, a in fields.items() if a is not None)
    if not names:
        return names, None
    return names, jnp.stack([jnp.asarray(fields[n], jnp.int32) for n in names], axis=1)


def info_rows(padded, bias: Bias | None, hq: int, tq_p: int, tk_p: int):
    """``(q_fields, q_info, k_fields, k_info, slopes)`` for the kernels from
    ``block_sparse.padded_rows``' output: positions unless iota, segment ids, and the bias's
    positions ("bias", padded with their last value) with its ``slopes`` f32 ``[Hq]``."""
    q_off, k_off, qp, kp, qs, ks = padded
    q_side = {"pos": None if q_off is not None else qp, "seg": qs}
    k_side = {"pos": None if k_off is not None else kp, "seg": ks}
    slopes = None
    if bias is not None:
        q_side["bias"] = pad_axis(jnp.asarray(bias.q_positions, jnp.int32), tq_p, 1, edge=True)
        k_side["bias"] = pad_axis(jnp.asarray(bias.k_positions, jnp.int32), tk_p, 1, edge=True)
        slopes = jnp.asarray(bias.slopes, jnp.float32).reshape(hq)
    return (*_info(q_side), *_info(k_side), slopes)


def flash_attention_pass(q, k, v, ctx: dict, *, mask, normalizer, pass_idx: int = 0,
                         q_positions, k_positions, q_segment_ids=None, kv_segment_ids=None,
                         bias: Bias | None = None,
                         block_sizes: BlockSizes | tuple[int, int] | None = None,
                         stages: int = 2, split_qk: bool = False, pingpong: bool | None = None,
                         interpret=None):
    """One forward pass: ``(out [B, Hq, Tq, Dv] float32 or None, lse [B, Hq, Tq] float32)``.

    Args:
      q: ``[B, Hq, Tq, D]``; k: ``[B, Hkv, Tk, D]``; v: ``[B, Hkv, Tk, Dv]`` or None (a pass
        that only collects row sums); bfloat16 or float16, D and Dv in ``HEAD_DIMS``.
      ctx: row context for ``normalizer.log_weight``: ``{name: float32 [B, Hq, Tq]}``; the
        kernel passes each entry broadcast to the score tile (``log_weight`` is elementwise).
      mask: a ``MaskLike``; normalizer: a ``NormalizerLike``; pass_idx: its pass.
      q_positions, k_positions: int32 ``[B, T]``; numpy arrays give static block lists (and
        iota positions in the kernel when they are ``offset + arange``).
      q_segment_ids, kv_segment_ids: optional int32 ``[B, T]``.
      bias: optional additive score bias (``protocols.Bias``, e.g. ALiBi): ``t =
        log_weight(q k^T + bias)``, evaluated on every visited tile (FULL ones too).
      block_sizes: ``BlockSizes.of(block_sizes).forward``: ``block_q`` query rows per thread
        block (64 per compute warpgroup up to two warpgroups, or 128 per warpgroup at 256)
        and ``block_k`` keys per kv block; default: the first of ``DEFAULT_BLOCKS`` that fits
        SMEM (128 x 128; 128 x 64 for split operands at head_dim 128).
      stages: SMEM slots of the K/V ring (>= 2).
      split_qk: ``QK^T`` from split operands: q and k come in float32 and are split into
        bfloat16 halves (``x = hi + lo`` to 16 mantissa bits), ``s = q_lo k^T + q k_lo^T +
        q k^T`` (three WGMMAs instead of one; v bfloat16). For normalizers that amplify score
        errors (LSSAR's power): bf16 scores move its gradients by ~10 %.
      pingpong: the two compute warpgroups of a 128-row tile take turns on the tensor cores
        (FlashAttention-3's schedule; needs ``block_q = 128``); None: ``PINGPONG``.
      interpret: None or False compiles for the GPU; True or an ``InterpretGPUParams`` runs the
        kernel in the Mosaic GPU interpreter (on CPU). The kernel specializes to it (register
        layouts are left out, and ``PV`` accumulates in registers instead of in place).

    The kernel's output is in q's dtype (normalized in float32 registers, rounded once); it is
    returned as float32 to keep the pass contract.
    """
    d, dv = q.shape[-1], (0 if v is None else v.shape[-1])

    def need(n_qi, n_ki):
        return lambda blocks: smem_bytes(d, dv, blocks, stages, n_qi, n_ki, len(ctx), split_qk)

    blocks = (fitting_blocks(DEFAULT_BLOCKS, need(MAX_FIELDS, MAX_FIELDS), OWNER, "forward")
              if block_sizes is None else BlockSizes.of(block_sizes).forward)
    check_inputs(q, k, v, blocks, stages, split_qk)
    b, hq, tq, _ = q.shape
    hk, tk = k.shape[1], k.shape[2]
    if hq % hk:
        raise ValueError(f"GQA: query heads ({hq}) must be a multiple of kv heads ({hk})")
    bq, bk = blocks
    if interpret is True:
        if InterpretGPUParams is None:
            raise ValueError(f"{OWNER}: interpret=True needs the Mosaic GPU interpreter, which "
                             f"jax {jax.__version__} does not expose where jax 0.10 did")
        interpret = InterpretGPUParams()
    if not interpret:
        _check_device()
    tq_p, tk_p = -(-tq // bq) * bq, -(-tk // bk) * bk
    padded = block_sparse.padded_rows(
        q_positions, k_positions, q_segment_ids, kv_segment_ids, tq_p, tk_p)
    q_off, k_off, qp, kp, qs, ks = padded
    lists = block_sparse.block_lists(
        block_sparse.padded_tile_classes(mask, qp, kp, (bq, bk), qs, ks, tk))
    q_fields, q_info, k_fields, k_info, slopes = info_rows(padded, bias, hq, tq_p, tk_p)
    ctx_names = tuple(ctx)
    ctx_arr = (jnp.stack([pad_axis(jnp.asarray(ctx[n], jnp.float32), tq_p, 2)
                          for n in ctx_names], axis=2) if ctx_names else None)
    fitting_blocks([blocks], need(len(q_fields), len(k_fields)), OWNER, "forward")
    wgs = 2 if bq % (2 * WGMMA_M) == 0 and bq < 256 else max(bq // 128, 1)
    pingpong = PINGPONG and wgs == 2 if pingpong is None else pingpong
    if pingpong and wgs != 2:
        raise ValueError(f"{OWNER}: pingpong=True needs two compute warpgroups (block_q = 128), "
                         f"got block_q = {bq}")
    st = kernels.Static(
        mask=mask, normalizer=normalizer, pass_idx=pass_idx, ctx_names=ctx_names,
        q_fields=q_fields, k_fields=k_fields, q_offset=q_off or 0, k_offset=k_off or 0,
        rows=bq // wgs, block_k=bk, compute_wgs=wgs, stages=stages, kv_len=tk,
        kv_padded=tk_p != tk, group=hq // hk, with_values=v is not None,
        interpret=bool(interpret), bias_fn=None if bias is None else bias.fn,
        split_qk=split_qk, pingpong=pingpong)
    (q, q_lo), (k, k_lo) = split(pad_axis(q, tq_p, 2), split_qk), split(pad_axis(k, tk_p, 2),
                                                                         split_qk)
    out, lse = kernels.forward_call(
        st, pack_lists(lists), q, k, None if v is None else pad_axis(v, tk_p, 2), ctx_arr,
        q_info, k_info, slopes, (q_lo, k_lo), interpret=interpret or None)
    return (None if out is None else out[:, :, :tq].astype(jnp.float32)), lse[:, :, :tq]
