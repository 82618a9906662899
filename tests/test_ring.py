"""Ring attention on 8 host devices: equal to the reference (output and gradients) over masks x
normalizers x layouts x meshes, and the compiled program sends what the plan says."""
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import lcattn
from lcattn import masks, normalizers, positions, sharding
from lcattn.backends import ring, ring_plan
from tests.helpers import qkv

SPECS = {
    "causal": lcattn.AttentionSpec(mask=masks.Causal()),
    "local_small": lcattn.AttentionSpec(mask=masks.Local(5)),     # window < a shard
    "local_large": lcattn.AttentionSpec(mask=masks.Local(20)),    # window > a shard
    "chunked": lcattn.AttentionSpec(mask=masks.Chunked(12)),
    "lambda": lcattn.AttentionSpec(mask=masks.Lambda(6, 3)),
    "lambda_limit": lcattn.AttentionSpec(mask=masks.Lambda(6, 3), distance_limit=6),
}
NORMS = {"softmax": normalizers.Softmax(), "softplus": normalizers.Softplus(),
         "reweighted": normalizers.Reweighted(p=3)}
MESHES = [dict(context=8), dict(data=2, context=4), dict(data=4, context=2)]
T = 64


def _cases():
    """Every mask x normalizer once; meshes, layouts, GQA and ALiBi rotate over them."""
    out = []
    for i, (m, n) in enumerate((m, n) for m in SPECS for n in NORMS):
        out.append(pytest.param(m, n, MESHES[i % 3], ("contiguous", "zigzag")[i % 2],
                                (4, 2) if i % 4 < 2 else (2, 2), i % 5 == 0,
                                id=f"{m}-{n}-{'x'.join(map(str, MESHES[i % 3].values()))}"))
    return out


def _ring(spec, mesh, layout, q, k, v, pos=None, seg=None, strategy="ring"):
    """Outputs and gradients of <out, cot> through the ring, back in token order."""
    n = mesh.shape["context"]
    order = ring_plan.global_positions(layout, n, T // n).reshape(-1)
    back = np.argsort(order)
    cot = jnp.asarray(np.random.default_rng(7).normal(size=q.shape[:3] + v.shape[3:]),
                      jnp.float32)
    rows = P("data", "context")

    def local(q, k, v, cot, pos, seg):
        kw = {} if pos is None else dict(q_positions=pos, k_positions=pos)
        if seg is not None:
            kw.update(q_segment_ids=seg, kv_segment_ids=seg)
        out = lcattn.attend(q, k, v, spec, backend="xla", block_sizes=(8, 8),
                            context_axis="context", context_layout=layout,
                            context_strategy=strategy, **kw)
        return jax.lax.psum(jnp.sum(out * cot), ("data", "context")), out

    fn = jax.shard_map(local, mesh=mesh, in_specs=(rows,) * 6, out_specs=(P(), rows))
    grad = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2), has_aux=True))
    (_, out), grads = grad(*(None if x is None else x[:, order]
                             for x in (q, k, v, cot, pos, seg)))
    ref = jax.value_and_grad(lambda q, k, v: jnp.sum(lcattn.attend(
        q, k, v, spec, backend="reference", q_positions=pos, k_positions=pos,
        q_segment_ids=seg, kv_segment_ids=seg) * cot), argnums=(0, 1, 2))
    _, ref_grads = ref(q, k, v)
    ref_out = lcattn.attend(q, k, v, spec, backend="reference", q_positions=pos,
                            k_positions=pos, q_segment_ids=seg, kv_segment_ids=seg)
    return (out[:, back], tuple(g[:, back] for g in grads)), (ref_out, ref_grads)


@pytest.mark.parametrize("mask, norm, mesh_shape, layout, heads, alibi", _cases())
def test_ring_equals_reference(mask, norm, mesh_shape, layout, heads, alibi):
    spec = lcattn.AttentionSpec(mask=SPECS[mask].mask, normalizer=NORMS[norm],
                                distance_limit=SPECS[mask].distance_limit,
                                position=positions.ALiBi() if alibi else positions.RoPE())
    mesh = sharding.make_mesh(**mesh_shape)
    q, k, v = qkv(1, 4, T, T, heads[0], heads[1], 8)
    (out, grads), (ref, ref_grads) = _ring(spec, mesh, layout, q, k, v)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-4)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, atol=5e-5, rtol=5e-4)


@pytest.mark.parametrize("mask", ["causal", "lambda", "local_small"])
def test_packed_documents_across_shard_edges(mask):
    """Segment ids crossing shard edges, positions restarting per document: the plan is
    widened (sinks of every document), the result still equals the reference."""
    mesh = sharding.make_mesh(data=2, context=4)
    q, k, v = qkv(2, 2, T, T, 4, 2, 8)
    bounds = [0, 5, 21, 40, 47, T]  # documents straddle the 16-token shards
    seg = np.zeros(T, np.int32)
    pos = np.zeros(T, np.int32)
    for d, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        seg[a:b], pos[a:b] = d + 1, np.arange(b - a)
    seg, pos = (jnp.asarray(np.broadcast_to(x, (2, T))) for x in (seg, pos))
    (out, grads), (ref, ref_grads) = _ring(SPECS[mask], mesh, "contiguous", q, k, v, pos, seg)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-4)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, atol=5e-5, rtol=5e-4)


@pytest.mark.parametrize("mask, norm, layout", [("lambda_limit", "softmax", "contiguous"),
                                                ("causal", "softplus", "zigzag")])
def test_all_gather_strategy_equals_reference(mask, norm, layout):
    spec = lcattn.AttentionSpec(mask=SPECS[mask].mask, normalizer=NORMS[norm],
                                distance_limit=SPECS[mask].distance_limit)
    q, k, v = qkv(4, 2, T, T, 4, 2, 8)
    (out, grads), (ref, ref_grads) = _ring(spec, sharding.make_mesh(data=2, context=4), layout,
                                           q, k, v, strategy="all_gather")
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-4)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, atol=5e-5, rtol=5e-4)


@pytest.mark.parametrize("mask, norm", [("lambda_limit", "softmax"), ("causal", "reweighted"),
                                        ("local_large", "softplus")])
def test_decoding_against_a_cache_sharded_over_context(mask, norm):
    """kv_shards: 3 new queries (the same on every device) against a 61-key cache split over
    4 devices (the cache's padding slots carry positions no query sees), merged across
    devices; equals the reference on the whole cache, output and gradients."""
    spec = lcattn.AttentionSpec(mask=SPECS[mask].mask, normalizer=NORMS[norm],
                                distance_limit=SPECS[mask].distance_limit)
    q, _, _ = qkv(6, 2, 3, 3, 4, 2, 8)
    _, k, v = qkv(7, 2, T, T, 4, 2, 8)
    k_pos = np.broadcast_to(np.where(np.arange(T) < 61, np.arange(T), 10**6), (2, T))
    q_pos = np.broadcast_to(np.arange(61, 64), (2, 3))
    mesh = sharding.make_mesh(data=2, context=4)
    fn = jax.jit(jax.shard_map(
        lambda q, k, v, qp, kp: lcattn.attend(q, k, v, spec, q_positions=qp, k_positions=kp,
                                              backend="xla", block_sizes=(8, 8),
                                              context_axis="context",
                                              context_strategy="kv_shards"),
        mesh=mesh, in_specs=(P("data"), P("data", "context"), P("data", "context"), P("data"),
                             P("data", "context")), out_specs=P("data")))
    qp, kp = jnp.asarray(q_pos, jnp.int32), jnp.asarray(k_pos, jnp.int32)
    cot = jnp.asarray(np.random.default_rng(8).normal(size=q.shape), jnp.float32)
    out, grads = fn(q, k, v, qp, kp), jax.grad(
        lambda q, k, v: jnp.sum(fn(q, k, v, qp, kp) * cot), argnums=(0, 1, 2))(q, k, v)

    def ref_fn(q, k, v):
        return lcattn.attend(q, k[:, :61], v[:, :61], spec, backend="reference",
                             q_positions=q_pos, k_positions=k_pos[:, :61])

    ref_grads = jax.grad(lambda q, k, v: jnp.sum(ref_fn(q, k, v) * cot), argnums=(0, 1, 2))(
        q, k, v)
    np.testing.assert_allclose(out, ref_fn(q, k, v), atol=2e-5, rtol=2e-4)
    for g, r in zip(grads, ref_grads):  # the padding slots get zero gradient
        np.testing.assert_allclose(g, r, atol=5e-5, rtol=5e-4)


def test_pallas_tpu_kernels_as_the_ring_local_backend():
    """The Mosaic TPU kernels (interpret mode) as each hop's pass: their outputs are typed as
    varying over ``context``, so ``shard_map`` checks them like any value. LSSAR (two passes,
    the first without V), output and gradients equal the reference."""
    spec = lcattn.AttentionSpec(mask=masks.Causal(), normalizer=NORMS["reweighted"])
    mesh = sharding.make_mesh(context=2, devices=jax.devices()[:2])
    q, k, v = qkv(9, 1, 256, 256, 2, 1, 128)
    cot = jnp.asarray(np.random.default_rng(2).normal(size=q.shape), jnp.float32)
    rows = P(None, "context")
    fn = jax.shard_map(lambda q, k, v: lcattn.attend(q, k, v, spec, backend="pallas_tpu",
                                                     block_sizes=(128, 128),
                                                     context_axis="context"),
                       mesh=mesh, in_specs=(rows,) * 3, out_specs=rows)
    loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v) * cot)  # noqa: E731
    out, grads = jax.jit(jax.value_and_grad(loss(fn), argnums=(0, 1, 2)))(q, k, v)
    ref, ref_grads = jax.value_and_grad(loss(lambda q, k, v: lcattn.attend(
        q, k, v, spec, backend="reference")), argnums=(0, 1, 2))(q, k, v)
    np.testing.assert_allclose(out, ref, rtol=1e-4)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, atol=5e-5, rtol=5e-4)


def test_pallas_gpu_kernels_as_the_ring_local_backend():
    """The Mosaic GPU kernels as the ring's pass. The interpreter runs them inside
    ``shard_map`` only on a one-device ``context`` axis (over two host devices jax 0.10's
    interpreter deadlocks: its shared memory is simulated per process): output and gradients
    equal the reference there, with ``check_vma`` on (the kernels' outputs and the custom VJP's
    gradients typed as varying like their inputs). Over ``context=2``, forward and backward
    (LSSAR: two passes, split ``QKᵀ``) lower for CUDA."""
    rows = P(None, "context")
    cot_rng = np.random.default_rng(3)

    def sharded(spec, n, interpret):
        mesh = sharding.make_mesh(context=n, devices=jax.devices()[:n])
        return jax.shard_map(lambda q, k, v: lcattn.attend(
            q, k, v, spec, backend="pallas_gpu", block_sizes=(64, 64), context_axis="context",
            interpret=interpret), mesh=mesh, in_specs=(rows,) * 3, out_specs=rows)

    def loss(f, cot):
        return jax.value_and_grad(lambda q, k, v: jnp.sum(f(q, k, v) * cot), argnums=(0, 1, 2))

    spec = lcattn.AttentionSpec(mask=masks.Causal())
    q, k, v = qkv(11, 1, 64, 64, 2, 1, 64)  # one tile: the point is the typing
    cot = jnp.asarray(cot_rng.normal(size=q.shape), jnp.float32)
    out, grads = jax.jit(loss(sharded(spec, 1, True), cot))(q, k, v)
    ref, ref_grads = loss(lambda q, k, v: lcattn.attend(q, k, v, spec, backend="reference"),
                          cot)(q, k, v)
    np.testing.assert_allclose(out, ref, rtol=1e-2)
    for g, r in zip(grads, ref_grads):  # bf16 operands: within 3 % of the largest entry
        np.testing.assert_allclose(g, r, atol=0.03 * float(jnp.max(jnp.abs(r))))
    lssar = lcattn.AttentionSpec(mask=masks.Causal(), normalizer=normalizers.Reweighted())
    lowered = jax.jit(loss(sharded(lssar, 2, False), cot)).trace(q, k, v).lower(
        lowering_platforms=("cuda",))
    assert lowered.as_text().count("mosaic_gpu") >= 6  # forward, dQ, dK/dV of both passes


def test_ring_needs_shard_map_and_a_streaming_backend():
    q, k, v = qkv(5, 1, 16, 16, 2, 2, 8)
    spec = SPECS["causal"]
    with pytest.raises(ValueError, match="inside jax.shard_map"):
        lcattn.attend(q, k, v, spec, context_axis="context")
    mesh = sharding.make_mesh(data=2, context=4)
    for kw, match in ((dict(backend="reference"), "dense"),
                      (dict(context_strategy="gather"), "context_strategy"),
                      (dict(context_layout="spiral"), "context_layout")):
        fn = jax.shard_map(lambda q, k, v, kw=kw: lcattn.attend(q, k, v, spec,
                                                                context_axis="context", **kw),
                           mesh=mesh, in_specs=(P(None, "context"),) * 3,
                           out_specs=P(None, "context"))
        with pytest.raises(ValueError, match=match):
            fn(q, k, v)


_SHAPE = re.compile(r"(f32|s32)\[([\d,]*)\]")
_WHILE = re.compile(r"while\(.*body=%?([\w.\-]+).*known_trip_count\D*(\d+)")


def _computations(hlo: str) -> dict[str, list[str]]:
    """Compiled HLO text split into its computations: ``{name: lines}``."""
    comps, name = {}, None
    for line in hlo.splitlines():
        head = re.match(r"(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head and not line.startswith(" "):
            name = head.group(1)
            comps[name] = []
        elif name is not None:
            comps[name].append(line)
    return comps


def _collectives(hlo: str, op: str) -> list[int]:
    """Bytes of each array an ``op`` moves in compiled HLO text, once per execution: an op in
    the body of a while loop with a known trip count counts that many times (XLA may combine
    several arrays into one op with a tuple result: each counts)."""
    comps = _computations(hlo)
    times = {name: 1 for name in comps}
    for lines in comps.values():
        for line in lines:
            loop = _WHILE.search(line)
            if loop:
                times[loop.group(1)] = int(loop.group(2))
    sizes = []
    for name, lines in comps.items():
        for line in lines:
            if f" {op}(" not in line or "=" not in line:
                continue
            result = line.split("=", 1)[1].split(f" {op}(", 1)[0]
            for _, dims in _SHAPE.findall(result):
                sizes += [4 * int(np.prod([int(x) for x in dims.split(",") if x]))] * times[name]
    return sizes


@pytest.mark.parametrize("mask, n", [("local_small", 4), ("lambda", 4), ("lambda", 8),
                                     ("causal", 4), ("causal", 8)])
def test_compiled_program_sends_what_the_plan_says(mask, n):
    spec = SPECS[mask]
    mesh = sharding.make_mesh(data=8 // n, context=n)
    b, hk, d, local_len = 8 // n, 2, 8, T // n
    q, k, v = qkv(3, b, T, T, 4, hk, d)
    rows = P("data", "context")
    fn = jax.jit(jax.shard_map(
        lambda q, k, v: lcattn.attend(q, k, v, spec, backend="xla", block_sizes=(8, 8),
                                      context_axis="context"),
        mesh=mesh, in_specs=(rows,) * 3, out_specs=rows))
    hlo = fn.lower(q, k, v).compile().as_text()
    plan = ring_plan.make_plan(spec.mask, n, local_len)
    per_key = hk * d * 4 * 2 + 4  # k and v (float32) and the position (int32), per row
    local_b = b // (8 // n) if n < 8 else b
    permutes = _collectives(hlo, "collective-permute")
    gathers = _collectives(hlo, "all-reduce")  # the sink broadcast
    assert len(permutes) == 3 * len(plan.hops)  # k, v, positions per hop
    assert sum(permutes) == local_b * per_key * sum(h.hi - h.lo for h in plan.hops)
    if mask == "local_small":
        assert len(plan.hops) == 1 and plan.broadcast is None and not gathers
    if mask == "lambda":  # one halo and one sink broadcast, whatever n
        assert len(plan.hops) == 1 and len(gathers) == 3
        width = plan.broadcast.hi - plan.broadcast.lo
        assert sum(gathers) == len(plan.broadcast.owners) * local_b * per_key * width
    if mask == "causal":  # n - 1 whole shards, as a scanned ring: one loop of n - 2 steps
        assert len(plan.hops) == n - 1 and not gathers and ring.scan_length(plan) == n - 1
        loops = [int(m.group(2)) for m in _WHILE.finditer(hlo)
                 if "collective-permute" in "".join(_computations(hlo)[m.group(1)])]
        assert loops == [n - 2]


def test_layout_order_and_preferred_layout():
    order = ring_plan.layout_order("zigzag", 4, 16)
    assert order.tolist() == [0, 1, 14, 15, 2, 3, 12, 13, 4, 5, 10, 11, 6, 7, 8, 9]
    assert ring_plan.layout_order("contiguous", 4, 16).tolist() == list(range(16))
    with pytest.raises(ValueError, match="divisible by 8, got 12"):
        ring_plan.layout_order("zigzag", 4, 12)
    pick = ring_plan.preferred_layout
    assert pick([masks.Causal()]) == pick([masks.Full()]) == "zigzag"
    assert pick([masks.Local(4), masks.Lambda(8, 2), masks.Chunked(4)]) == "contiguous"
    assert pick([masks.Lambda(8, 2), masks.Causal()]) == "zigzag"
    assert pick([masks.Causal() & masks.Sinks(4)]) == "contiguous"


def test_decoder_trains_on_a_data_x_context_mesh_like_one_device(tmp_path, monkeypatch):
    """configs/mesh/dp2_cp4.gin: the attention layers run as a ring (packed documents:
    segment ids and restarting positions) in the zigzag layout the causal model asks for (each
    batch reordered once); the losses are the single-device ones, and so is the evaluation
    (loss by position, put back in order). The contiguous layout runs in the ring tests."""
    import tensorstore as ts

    from experiments import configurables
    from experiments import evaluate as evaluate_lib
    from experiments import train as train_lib
    from tests.test_experiments import BASE, SMALL

    layouts = []
    wrapped = ring.pass_fn
    monkeypatch.setattr(ring, "pass_fn", lambda *a: layouts.append(a[2]) or wrapped(*a))
    bindings = SMALL + ["train.batch_size = 8", "train.num_steps = 3", "train.warmup_steps = 1",
                        "train.seq_len = 32", "tasks.Passkey.trials = 0",
                        "evaluate.length_multipliers = (1,)", "evaluate.max_tokens = 300"]
    losses, evals = {}, {}
    for name, files in (("one", []), ("zigzag", ["configs/mesh/dp2_cp4.gin"])):
        layouts.clear()
        configurables.parse(BASE + files, bindings)
        train_lib.train(str(tmp_path / name))
        with open(tmp_path / name / "metrics.jsonl") as f:
            losses[name] = [row["loss"] for row in map(json.loads, f)]
        evaluate_lib.evaluate(str(tmp_path / name))
        evals[name] = ts.open({"driver": "zarr", "kvstore": {
            "driver": "file", "path": str(tmp_path / name / "eval.zarr" / "nll_by_position")}},
            open=True).result().read().result()
        assert set(layouts) == (set() if name == "one" else {name})
    np.testing.assert_allclose(losses["zigzag"], losses["one"], rtol=2e-5)
    np.testing.assert_allclose(evals["zigzag"], evals["one"], rtol=2e-5)  # by position


def test_pallas_triton_kernel_as_the_ring_local_backend():
    """The Triton forward as the ring's pass over ``context=4``, Λ-mask (a halo and the sinks'
    gather). In interpret mode (a plain XLA program, so it runs over host devices; jax 0.10's
    Pallas interpreter fails ``check_vma`` on its own grid slicing, so that run has it off):
    output and gradients (the Triton backward kernels inside the ring) equal the reference. With
    ``check_vma`` on, compiled for CUDA: the kernel's outputs are typed as varying and the
    program lowers to Triton IR."""
    spec = lcattn.AttentionSpec(mask=masks.Lambda(20, 4))
    q, k, v = qkv(12, 1, 64, 64, 2, 1, 32)
    cot = jnp.asarray(np.random.default_rng(4).normal(size=q.shape), jnp.float32)
    mesh = sharding.make_mesh(context=4, devices=jax.devices()[:4])
    rows = P(None, "context")

    def loss(interpret):
        ring = jax.shard_map(lambda q, k, v: lcattn.attend(
            q, k, v, spec, backend="pallas_triton", block_sizes=(16, 16),
            context_axis="context", interpret=interpret), mesh=mesh, in_specs=(rows,) * 3,
            out_specs=rows, check_vma=not interpret)
        return jax.value_and_grad(lambda q, k, v: jnp.sum(ring(q, k, v) * cot),
                                  argnums=(0, 1, 2))

    out, grads = jax.jit(loss(True))(q, k, v)
    ref, ref_grads = jax.value_and_grad(lambda q, k, v: jnp.sum(lcattn.attend(
        q, k, v, spec, backend="reference") * cot), argnums=(0, 1, 2))(q, k, v)
    np.testing.assert_allclose(out, ref, rtol=3e-2)  # the loss: a sum of bf16-operand outputs
    for g, r in zip(grads, ref_grads):  # bf16 operands: within 3 % of the largest entry
        np.testing.assert_allclose(g, r, atol=0.03 * float(jnp.max(jnp.abs(r))))
    text = jax.jit(loss(False)).trace(q, k, v).lower(lowering_platforms=("cuda",)).as_text()
    assert "block_sparse_flash_attention_triton" in text
