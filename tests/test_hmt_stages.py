"""HMT's two-stage training through ``train.init_from`` (configs/memory/hmt_stage{1,2}.gin),
and HMT around a frozen pretrained backbone (configs/memory/hmt_pretrained.gin)."""
import os

import numpy as np
import pytest
from flax import traverse_util

from experiments import configurables
from experiments import train as train_lib
from lcattn import sharding

CORPUS = os.path.join(configurables.REPO_ROOT, "tests", "fixtures", "corpus")
BASE = ["configs/base.gin", "configs/models/tiny.gin", "configs/attention/softmax_rope.gin"]
SMALL = [f"data.DataConfig.source = '{CORPUS}'", "data.DataConfig.val_every = 3", "SEQ_LEN = 16",
         "train.batch_size = 2", "train.warmup_steps = 1", "train.num_steps = 2",
         "build_model.d_model = 32", "build_model.num_heads = 2", "build_model.mlp_dim = 32",
         "memory.HMTConfig.sensory_len = 4", "memory.HMTConfig.num_memories = 4",
         "train.seq_len = 48", "build_model.backend = 'reference'"]


def _fresh_params():
    _, param_state, _, params = train_lib.split_model(train_lib.build_model())
    mesh = sharding.single_device_mesh()
    return params, sharding.param_shardings(param_state, mesh)


def test_stage1_then_stage2_restores_shared_initializes_new_refuses_misshapen(tmp_path):
    stage1, stage2 = str(tmp_path / "stage1"), str(tmp_path / "stage2")
    configurables.parse(BASE + ["configs/memory/hmt_stage1.gin"], SMALL)
    train_lib.train(stage1)
    configurables.parse(BASE + ["configs/memory/hmt_stage2.gin"],
                        SMALL + [f"train.init_from = '{stage1}'"])
    fresh, shardings = _fresh_params()
    got = traverse_util.flatten_dict(train_lib.init_params_from(stage1, fresh, shardings))
    flat_fresh = traverse_util.flatten_dict(fresh)
    configurables.parse(BASE + ["configs/memory/hmt_stage1.gin"], SMALL)
    from experiments.evaluate import restore_model
    trained, _ = restore_model(stage1)
    theirs = traverse_util.flatten_dict(train_lib.split_model(trained)[3])
    new = {k for k in got if k not in theirs}
    assert {k[-1] for k in new} == {"summary_prompt", "w_q", "w_k"}
    for k in got:
        want = flat_fresh[k] if k in new else theirs[k]
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want))
    assert any(not np.array_equal(np.asarray(theirs[k]), np.asarray(flat_fresh[k]))
               for k in theirs)   # stage 1 trained: restoring changed something
    configurables.parse(BASE + ["configs/memory/hmt_stage2.gin"],
                        SMALL + [f"train.init_from = '{stage1}'"])
    row = train_lib.train(stage2)
    assert np.isfinite(row["loss"]) and row["step"] == 2
    configurables.parse(BASE + ["configs/memory/hmt_stage2.gin"],
                        SMALL + ["build_model.mlp_dim = 48"])
    fresh, shardings = _fresh_params()
    with pytest.raises(ValueError, match=r"parameter backbone\.blocks\.0\.mlp\.w_\w+ has shape"):
        train_lib.init_params_from(stage1, fresh, shardings)


def test_pretrained_backbone_stays_bit_identical_memory_trains(tmp_path):
    folder = os.path.join(configurables.REPO_ROOT, "tests", "fixtures", "pretrained",
                          "llama_gqa_llama3")
    small = [b for b in SMALL if not b.startswith("build_model.")] + [
        f"PRETRAINED = '{folder}'", "build_model.backend = 'reference'", "train.num_steps = 3",
        "train.seq_len = 64"]
    configurables.parse(["configs/base.gin", "configs/memory/hmt_pretrained.gin"], small)
    before = traverse_util.flatten_dict(train_lib.split_model(train_lib.build_model())[3])
    train_lib.train(str(tmp_path / "run"), checkpoint_every=1, stop_at_step=2)
    row = train_lib.train(str(tmp_path / "run"))   # resumes: masked optimizer state restored
    assert np.isfinite(row["loss"]) and row["step"] == 3
    from experiments.evaluate import restore_model
    after = traverse_util.flatten_dict(train_lib.split_model(
        restore_model(str(tmp_path / "run"))[0])[3])
    assert before.keys() == after.keys()
    memory = {k for k in before if k[0] != "backbone"}
    assert {k[-1] for k in memory} == {"initial_memory", "summary_prompt", "w_q", "w_k"}
    table = np.std(np.asarray(before[("backbone", "embedding")]))   # ~0.02 (Llama init)
    for name in ("initial_memory", "summary_prompt"):   # drawn at the embeddings' scale
        assert 0.5 < np.std(np.asarray(before[(name,)])) / table < 2, name
    for k in before:
        same = np.array_equal(np.asarray(before[k]), np.asarray(after[k]))
        assert same == (k not in memory), ".".join(map(str, k))
    with pytest.raises(ValueError, match=r"train: `freeze` = 'nothing' matches no parameter"):
        configurables.parse(["configs/base.gin", "configs/memory/hmt_pretrained.gin"],
                            small + ["train.freeze = 'nothing'"])
        train_lib.train(str(tmp_path / "other"))
    with pytest.raises(ValueError, match=r"data.DataConfig.tokenizer"):
        configurables.parse(["configs/base.gin", "configs/memory/hmt_pretrained.gin"],
                            small + ["data.DataConfig.tokenizer = None"])
        train_lib.train(str(tmp_path / "bytes"))


def test_sweep_init_from_names_an_earlier_variant(tmp_path):
    from experiments import sweep

    variants = {"stage2": {"gin": ["configs/memory/hmt_stage2.gin"], "init_from": "stage1"},
                "stage1": {"gin": ["configs/memory/hmt_stage1.gin"]}}
    with pytest.raises(ValueError, match=r"init_from: 'stage1' is not an earlier variant"):
        sweep.run_variant("stage2", variants["stage2"], variants, BASE, str(tmp_path), SMALL)
