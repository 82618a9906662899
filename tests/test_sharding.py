"""Sharded experiments on 8 host devices: rules, shardings, meshes vs one device, resharding
restores, bitwise resume, bf16 compute, remat, damaged checkpoints, clear errors."""
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from experiments import checkpoints, configurables
from experiments import evaluate as evaluate_lib
from experiments import sweep as sweep_lib
from experiments import train as train_lib
from lcattn import sharding
from lcattn.layers import LOGICAL_AXES
from lcattn.memory import HMT, HMTConfig
from tests.test_experiments import BASE, SMALL

# A hybrid (attention + Mamba-2) model, 8 rows per batch so every 8-way batch split divides.
HYBRID = SMALL + ["train.batch_size = 8", "train.num_steps = 3", "train.checkpoint_every = 2",
                  "train.warmup_steps = 1", "build_model.layer_pattern = ('attn', 'mamba2')",
                  "build_model.mamba2 = @layers.Mamba2Config()"]
HMT_SMALL = HMTConfig(segment_len=8, sensory_len=2, num_memories=4)
# One step on 8 devices partitions the same sums differently from one device: float32
# rounding, amplified a little by three Adam steps.
TOL = dict(rtol=2e-5, atol=2e-6)


def _mesh(data=1, fsdp=1, tensor=1, context=1):
    return [f"sharding.make_mesh.data = {data}", f"sharding.make_mesh.fsdp = {fsdp}",
            f"sharding.make_mesh.tensor = {tensor}", f"sharding.make_mesh.context = {context}",
            "train.mesh = @sharding.make_mesh()", "evaluate.mesh = @sharding.make_mesh()"]


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f)]


def _saved(workdir, item, step=None):
    """A checkpoint item restored with the shardings it was saved with."""
    with checkpoints.manager(str(workdir)) as mgr:
        step = mgr.latest_step() if step is None else step
        return mgr.restore(step, args=ocp.args.Composite(
            **{item: ocp.args.StandardRestore()}))[item]


def _param_names(model):
    names = set()
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names.update(n for n in var.get_metadata()["out_sharding"] if n is not None)
    return names


def test_rules_cover_every_logical_name_of_every_layer():
    configurables.register_all()
    models = [train_lib.build_model(d_model=32, num_heads=2),
              train_lib.build_model(d_model=32, num_heads=2, layer_pattern=("attn", "mamba2"),
                                    tie_embeddings=False),
              train_lib.build_model(d_model=32, num_heads=2, memory=HMT_SMALL)]
    used = set().union(*map(_param_names, models))
    assert used == set(LOGICAL_AXES)
    assert set(sharding.DEFAULT_RULES) == set(LOGICAL_AXES) | set(sharding.ACTIVATION_AXES)
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    for model in models:  # every parameter gets a sharding (none unmapped)
        shardings = sharding.param_shardings(model, mesh)
        assert len(jax.tree.leaves(shardings)) == len(jax.tree.leaves(nnx.state(model,
                                                                                 nnx.Param)))
    with pytest.raises(ValueError, match="'experts' has no sharding rule"):
        sharding.spec_for(("embed", "experts"), (8, 8), mesh.shape, sharding.DEFAULT_RULES)
    with pytest.raises(ValueError, match="unknown logical axis 'experts'"):
        sharding.logical_rules({"experts": "tensor"})
    with pytest.raises(ValueError, match="not None, a mesh axis"):
        sharding.logical_rules({"mlp": "model"})


def test_an_axis_that_does_not_divide_is_dropped_for_that_array(caplog):
    model = train_lib.build_model(d_model=32, num_heads=8, num_kv_heads=2, mlp_dim=64)
    mesh = sharding.make_mesh(fsdp=2, tensor=4)
    with caplog.at_level(logging.INFO, logger="lcattn.sharding"):
        specs = jax.tree.map(lambda s: s.spec, sharding.param_shardings(model, mesh))
    attn = specs["blocks"][0]["mixer"]
    assert attn["wq"] == P("fsdp", "tensor", None)   # 8 heads over tensor=4
    assert attn["wk"] == P("fsdp", None, None)       # 2 kv heads: not over tensor=4
    assert specs["embedding"] == P("tensor", "fsdp")
    lines = [r.getMessage() for r in caplog.records if r.name == "lcattn.sharding"]
    assert len(lines) == 1 and "blocks.0.mixer.wk (kv_heads=2 over tensor=4)" in lines[0]


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("single")
    configurables.parse(BASE, HYBRID)
    train_lib.train(str(workdir))
    model, _ = evaluate_lib.restore_model(str(workdir))
    return workdir, _losses(workdir), nnx.to_pure_dict(nnx.state(model, nnx.Param))


@pytest.mark.parametrize("mesh", [dict(data=8), dict(fsdp=8), dict(data=2, fsdp=4),
                                  dict(data=2, fsdp=2, tensor=2)],
                         ids=["data8", "fsdp8", "data2xfsdp4", "data2xfsdp2xtensor2"])
def test_sharded_training_equals_one_device(tmp_path, single_run, mesh):
    _, losses, params = single_run
    configurables.parse(BASE, HYBRID + _mesh(**mesh))
    train_lib.train(str(tmp_path))
    got = _losses(tmp_path)
    assert [s for s, _ in got] == [s for s, _ in losses]
    np.testing.assert_allclose([x for _, x in got], [x for _, x in losses], **TOL)
    model, _ = evaluate_lib.restore_model(str(tmp_path))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL),
                 nnx.to_pure_dict(nnx.state(model, nnx.Param)), params)
    # what training held, as saved: parameters and both Adam moments follow the rules
    fsdp = "fsdp" if mesh.get("fsdp", 1) > 1 else None
    tensor = "tensor" if mesh.get("tensor", 1) > 1 else None
    saved = _saved(tmp_path, "params")
    assert saved["blocks"]["0"]["mlp"]["w_up"].sharding.spec == P(fsdp, tensor)
    assert saved["blocks"]["1"]["mixer"]["w_x"].sharding.spec == P(fsdp, tensor, None)
    adam = _saved(tmp_path, "opt_state")[1][0]
    for moment in (adam["mu"], adam["nu"]):
        assert moment["blocks"]["0"]["mlp"]["w_up"].sharding.spec == P(fsdp, tensor)
        assert moment["embedding"].sharding.spec == P(tensor, fsdp)
    assert adam["count"].sharding.is_fully_replicated


def test_restore_onto_another_mesh_and_continue(tmp_path, single_run):
    _, losses, _ = single_run
    configurables.parse(BASE, HYBRID + _mesh(fsdp=8) + ["train.stop_at_step = 2"])
    train_lib.train(str(tmp_path))                      # saved at step 2 on (8,) fsdp
    new_mesh = sharding.make_mesh(data=2, tensor=4)
    moved, _ = evaluate_lib.restore_model(str(tmp_path), new_mesh)
    plain, _ = evaluate_lib.restore_model(str(tmp_path))
    wq = moved.blocks[0].mixer.wq[...]
    assert wq.sharding.spec == P(None, None, None)  # 2 heads: not over tensor=4
    assert moved.blocks[0].mlp.w_up[...].sharding.spec == P(None, "tensor")
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b),
                 nnx.to_pure_dict(nnx.state(moved, nnx.Param)),
                 nnx.to_pure_dict(nnx.state(plain, nnx.Param)))
    configurables.parse(BASE, HYBRID + _mesh(data=2, tensor=4))
    train_lib.train(str(tmp_path))                      # resumes at 2 on (2, 4) data x tensor
    got = _losses(tmp_path)
    assert [s for s, _ in got] == [1, 2, 3]
    np.testing.assert_allclose([x for _, x in got], [x for _, x in losses], **TOL)
    assert _saved(tmp_path, "params")["blocks"]["0"]["mlp"]["w_up"].sharding.spec == \
        P(None, "tensor")


def test_preempted_and_resumed_on_a_mesh_is_bitwise(tmp_path):
    bindings = HYBRID + _mesh(data=2, fsdp=4) + ["train.num_steps = 4"]
    configurables.parse(BASE, bindings)
    train_lib.train(str(tmp_path / "straight"))
    configurables.parse(BASE, bindings + ["train.stop_at_step = 3"])
    train_lib.train(str(tmp_path / "resumed"))  # preempted at 3; newest checkpoint is 2
    configurables.parse(BASE, bindings)
    train_lib.train(str(tmp_path / "resumed"))
    assert _losses(tmp_path / "resumed") == _losses(tmp_path / "straight")


def _loss_and_grads(model, tokens):
    def loss(params, graphdef, rest):
        m = nnx.merge(graphdef, params, rest)
        logits = m(tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, graphdef, rest)


def test_bf16_compute_keeps_float32_parameters_and_loss():
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 33)), jnp.int32)
    kw = dict(d_model=32, num_heads=2, layer_pattern=("attn", "mamba2"))
    f32 = train_lib.build_model(**kw)
    bf16 = train_lib.build_model(compute_dtype="bfloat16", **kw)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
    (l32, g32), (l16, g16) = _loss_and_grads(f32, tokens), _loss_and_grads(bf16, tokens)
    assert l16.dtype == jnp.float32 and abs(float(l16) - float(l32)) < 0.02 * float(l32)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(g16))
    flat32, flat16 = (np.concatenate([np.ravel(g) for g in jax.tree.leaves(g)])
                      for g in (g32, g16))
    cosine = flat32 @ flat16 / np.linalg.norm(flat32) / np.linalg.norm(flat16)
    assert cosine > 0.99, cosine  # the same descent direction to bf16 rounding
    with pytest.raises(ValueError, match="compute_dtype"):
        train_lib.build_model(compute_dtype="float8")


def test_remat_gives_the_same_loss_and_gradients():
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 256, (2, 17)), jnp.int32)
    kw = dict(d_model=32, num_heads=2, layer_pattern=("attn", "mamba2"))
    l0, g0 = _loss_and_grads(train_lib.build_model(**kw), tokens)
    l1, g1 = _loss_and_grads(train_lib.build_model(remat="nothing_saveable", **kw), tokens)
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g0, g1)
    with pytest.raises(ValueError, match="remat"):
        train_lib.build_model(remat="all")


def test_bad_meshes_and_batches_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match=r"data=3 x fsdp=1 x tensor=1 x context=1 = 3 "
                                         r"devices, but there are 8"):
        sharding.make_mesh(data=3)
    with pytest.raises(ValueError, match="at most one of them -1"):
        sharding.make_mesh(data=-1, fsdp=-1)
    assert sharding.make_mesh(data=2, fsdp=-1).shape["fsdp"] == 4
    configurables.parse(BASE, SMALL + _mesh(data=8) + ["train.batch_size = 6"])
    with pytest.raises(ValueError, match=r"`batch_size` \(6\) must be a multiple .*'data'"):
        train_lib.train(str(tmp_path))
    assert not (tmp_path / "checkpoints").exists()
    configurables.parse(BASE, SMALL + ["train.mesh = 8"])
    with pytest.raises(ValueError, match="`mesh` must be None"):
        train_lib.train(str(tmp_path))


def test_state_layers_refuse_a_sharded_sequence(tmp_path):
    tokens = jnp.zeros((4, 16), jnp.int32)
    mesh = sharding.make_mesh(data=4, context=2)
    for model, owner in ((train_lib.build_model(d_model=32, num_heads=2,
                                                layer_pattern=("mamba2",)), "Mamba2"),
                         (train_lib.build_model(d_model=32, num_heads=2,
                                                memory=HMT_SMALL), "HMT")):
        with jax.set_mesh(mesh), pytest.raises(ValueError, match=f"{owner}.*'context'"):
            model(tokens)
    assert isinstance(model, HMT)


def _flip(path):
    data = bytearray(open(path, "rb").read())
    for i in range(0, len(data), 97):
        data[i] ^= 0xFF
    open(path, "wb").write(data)


def _largest_param_file(workdir, step):
    root = os.path.join(workdir, "checkpoints", str(step), "params")
    files = [os.path.join(r, f) for r, _, fs in os.walk(root) for f in fs]
    return max(files, key=os.path.getsize)


def test_damaged_checkpoint_is_named_set_aside_and_the_previous_one_used(tmp_path, caplog):
    bindings = SMALL + ["train.num_steps = 4", "train.checkpoint_every = 2"]
    configurables.parse(BASE, bindings)
    train_lib.train(str(tmp_path / "straight"))
    train_lib.train(str(tmp_path / "run"))
    _flip(_largest_param_file(str(tmp_path / "run"), 4))
    configurables.parse(BASE, bindings)
    with caplog.at_level(logging.INFO, logger="lcattn"):
        train_lib.train(str(tmp_path / "run"))  # the same command again
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "step 4" in errors[0] and str(tmp_path / "run" / "checkpoints" / "4") in errors[0]
    assert any("using step 2" in r.getMessage() for r in caplog.records
               if r.levelno == logging.WARNING)
    assert (tmp_path / "run" / "checkpoints_damaged" / "4" / "params").is_dir()  # kept
    assert _losses(tmp_path / "run") == _losses(tmp_path / "straight")  # retrained 3, 4
    for step in (2, 4):
        _flip(_largest_param_file(str(tmp_path / "run"), step))
    with pytest.raises(RuntimeError, match="no readable checkpoint"):
        train_lib.train(str(tmp_path / "run"))
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["2", "4"]  # left in place


def test_quick_sweep_runs_on_a_2x4_mesh(tmp_path):
    mesh_file = tmp_path / "dp2_fsdp4.gin"
    mesh_file.write_text("\n".join(_mesh(data=2, fsdp=4)) + "\n")
    variants = {"softmax_rope": {"gin": ["configs/attention/softmax_rope.gin"]},
                "lminfinite": {"gin": ["configs/attention/lminfinite.gin"],
                               "checkpoint_from": "softmax_rope"}}
    configurables.parse(["configs/sweeps/quick.gin", str(mesh_file)], [])
    results = sweep_lib.sweep(variants=variants, workdir=str(tmp_path / "sweep"),
                              cli_files=[str(mesh_file)],
                              cli_bindings=SMALL + ["train.num_steps = 2",
                                                    "train.batch_size = 8",
                                                    "train.warmup_steps = 1"])
    assert set(results) == set(variants)
    assert "make_mesh.fsdp = 4" in (tmp_path / "sweep" / "softmax_rope" /
                                             "config.gin").read_text()
    table = json.loads((tmp_path / "sweep" / "results.json").read_text())
    assert all(0 < loss < 10 for row in table.values() for loss in row.values())


def test_a_checkpoint_of_another_model_is_a_config_error_not_damage(tmp_path):
    configurables.parse(BASE, SMALL + ["train.num_steps = 2", "train.warmup_steps = 1"])
    train_lib.train(str(tmp_path))
    configurables.parse(BASE, SMALL + ["build_model.d_model = 48"])
    with pytest.raises(ValueError, match="does not match the configured model"):
        evaluate_lib.evaluate(str(tmp_path))
    assert not (tmp_path / "checkpoints_damaged").exists()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]
