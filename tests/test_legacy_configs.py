"""Run folders written before the option groups: their ``config.gin`` still builds the same
model on the same data; old names elsewhere stop with their new place."""
import logging
import os

import gin
import jax
import numpy as np
import pytest
from flax import nnx

from experiments import configurables, legacy
from experiments import train as train_lib
from experiments.data import DataConfig
from lcattn.layers import Mamba2Config
from lcattn.ssm import SSMOptions

ROOT = configurables.REPO_ROOT
# The operative config.gin of an old hybrid run (the code before the groups), trained with
#   --gin_file=configs/base.gin --gin_file=configs/models/tiny.gin
#   --gin_file=configs/models/hybrid.gin --gin.SEQ_LEN=16
#   --gin.make_iterator.source="'tests/fixtures/corpus'" --gin.make_iterator.val_every=3
#   --gin.build_model.ssm_decay_scale=1.5 --gin.build_model.mamba2_state_dim=8
OLD = os.path.join(ROOT, "tests", "fixtures", "legacy", "hybrid_config.gin")
NEW = (["configs/base.gin", "configs/models/tiny.gin", "configs/models/hybrid.gin"],
       ["SEQ_LEN = 16", "data.DataConfig.source = 'tests/fixtures/corpus'",
        "data.DataConfig.val_every = 3", "ssm.SSMOptions.decay_scale = 1.5",
        "layers.Mamba2Config.state_dim = 8"])


def _params(model):
    return jax.tree.leaves(nnx.state(model, nnx.Param))


def test_old_run_config_builds_the_same_model_and_data(caplog):
    with caplog.at_level(logging.WARNING, logger="lcattn.config"):
        configurables.parse([], [], run_config=OLD)
    assert "build_model.ssm_decay_scale -> ssm.SSMOptions.decay_scale" in caplog.text
    old = train_lib.build_model()
    old_data = gin.get_configurable(DataConfig)()
    configurables.parse(*NEW)
    new = train_lib.build_model()
    assert old.layer_pattern == new.layer_pattern == ("mamba2", "attn")
    config = old.blocks[0].mixer.config
    assert config == new.blocks[0].mixer.config == Mamba2Config(
        head_dim=64, state_dim=8, options=SSMOptions(decay_scale=1.5))
    assert all(np.array_equal(a, b) for a, b in zip(_params(old), _params(new), strict=True))
    assert old_data == gin.get_configurable(DataConfig)() == DataConfig(
        source="tests/fixtures/corpus", val_every=3)


def test_old_explicit_layer_pattern_keeps_its_length():
    text = open(OLD).read().replace("build_model.layer_cycle = ('mamba2', 'attn')",
                                    "build_model.layer_cycle = None").replace(
        "build_model.layer_pattern = None", "build_model.layer_pattern = ('attn', 'mamba2', "
        "'attn')")
    migrated, moved = legacy.migrate(text)
    assert "build_model.num_layers = 3" in migrated and moved
    gin.parse_config(migrated)
    assert train_lib.build_model().layer_pattern == ("attn", "mamba2", "attn")


def test_new_configs_are_left_alone():
    text = open(os.path.join(ROOT, "configs", "models", "hybrid.gin")).read()
    assert legacy.migrate(text) == (text, [])


@pytest.mark.parametrize("binding, new", [
    ("build_model.mamba2_state_dim = 8", "layers.Mamba2Config.state_dim"),
    ("build_model.attention_spec = @lcattn.AttentionSpec()", "build_model.attention_specs"),
    ("make_iterator.source = 'x'", "data.DataConfig.source"),
    ("evaluate.passkey_trials = 0", "tasks.Passkey.trials"),
])
def test_old_names_on_the_command_line_say_where_they_moved(binding, new):
    with pytest.raises(ValueError, match=f"moved to `{new}`"):
        configurables.parse(["configs/base.gin"], [binding])
