"""HMT's two-stage training through ``train.init_from`` (configs/memory/hmt_stage{1,2}.gin)."""
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
