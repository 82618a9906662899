"""Experiments: gin configs, training (loss falls, bitwise resume, safe failures), the sweep."""
import glob
import json
import os

import gin
import pytest

from experiments import configurables
from experiments import evaluate as evaluate_lib
from experiments import sweep as sweep_lib
from experiments import train as train_lib
from lcattn.memory import HMT

ROOT = configurables.REPO_ROOT
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "corpus")
SMALL = [f"data.DataConfig.source = '{FIXTURE}'", "data.DataConfig.val_every = 3", "SEQ_LEN = 16",
         "train.batch_size = 4", "train.warmup_steps = 2", "train.log_every = 1",
         "build_model.d_model = 32", "build_model.num_heads = 2", "build_model.num_kv_heads = 1",
         "build_model.mlp_dim = 64", "evaluate.length_multipliers = (1, 2, 4)",
         "tasks.Passkey.trials = 0", "evaluate.max_tokens = 2000"]
BASE = ["configs/base.gin", "configs/models/tiny.gin", "configs/attention/softmax_rope.gin"]


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [(r["step"], r["loss"], r["learning_rate"]) for r in map(json.loads, f)]


def _all_gin_files():
    paths = glob.glob(os.path.join(ROOT, "configs/**/*.gin"), recursive=True)
    return sorted(os.path.relpath(p, ROOT) for p in paths)


@pytest.mark.parametrize("path", _all_gin_files())
def test_every_gin_file_parses_binds_and_states_its_command(path):
    with open(os.path.join(ROOT, path)) as f:
        head = f.read().split("\n\n")[0]
    assert head.startswith("#") and "python -m experiments." in head and "Expect" in head, path
    if path.startswith("configs/sweeps/"):
        configurables.parse([path], [])
        variants = gin.query_parameter("sweep.variants")
        base = list(gin.query_parameter("sweep.base_gin"))
        for variant in variants.values():
            configurables.parse(base + variant["gin"], variant.get("bindings", []))
            train_lib.build_model(vocab_size=16, d_model=32, num_heads=2, num_kv_heads=1)
        return
    files = {"configs/base.gin": BASE, "configs/models": ["configs/base.gin", path],
             "configs/attention": ["configs/base.gin", "configs/models/tiny.gin", path],
             "configs/memory": BASE + [path], "configs/mesh": BASE + [path],
             "configs/figures": ["configs/base.gin", path, "configs/attention/softmax_rope.gin"]}
    key = path if path == "configs/base.gin" else os.path.dirname(path)
    needs = {"configs/memory/hmt_pretrained.gin": [   # its folder is a command-line binding
        f"PRETRAINED = '{ROOT}/tests/fixtures/pretrained/llama_gqa_llama3'"]}
    configurables.parse(files[key], needs.get(path, []))
    model = train_lib.build_model()
    assert model is not None
    if key == "configs/mesh":  # 8 test devices: every mesh file but single.gin uses them all
        mesh = gin.query_parameter("train.mesh")
        if path.endswith("single.gin"):
            assert mesh is None
        else:
            assert configurables.make_mesh().devices.size == 8


@pytest.mark.parametrize("bindings, error, match", [
    (["train.no_such_param = 3"], ValueError, "no_such_param"),
    (["no_such_configurable.x = 3"], ValueError, "no_such_configurable"),
    (["train.num_steps = -1"], ValueError, "num_steps"),
    (["data.DataConfig.packing = 'zip'"], ValueError, "packing"),
    (["build_model.ssm_window = 4"], ValueError, "moved to `ssm.SSMOptions.window`"),
    (["build_model.memory = @memory.HMTConfig()", "memory.HMTConfig.segment_len = 8",
      "memory.HMTConfig.sensory_len = 0", "memory.HMTConfig.num_memories = 1"], ValueError,
     "data.DataConfig.packing = 'chunk'"),
    (["build_model.memory = @memory.HMTConfig()", "memory.HMTConfig.segment_len = 8",
      "memory.HMTConfig.sensory_len = 8", "memory.HMTConfig.num_memories = 1"], ValueError,
     "sensory_len"),
])
def test_bad_configs_fail_clearly_before_touching_checkpoints(tmp_path, bindings, error, match):
    with pytest.raises(error, match=match):
        configurables.parse(BASE, SMALL + bindings)
        train_lib.train(str(tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_missing_gin_file_names_it():
    with pytest.raises(FileNotFoundError, match="configs/nope.gin"):
        configurables.parse(["configs/nope.gin"], [])


def test_training_lowers_the_loss(tmp_path):
    configurables.parse(BASE, SMALL + ["train.num_steps = 40", "train.learning_rate = 1e-2"])
    train_lib.train(str(tmp_path))
    losses = [loss for _, loss, _ in _losses(tmp_path)]
    assert losses[-1] < losses[0] - 1.0, losses
    for name in ("config.gin", "run.json", "corpus.json"):
        assert (tmp_path / name).exists()


def test_interrupted_and_resumed_equals_uninterrupted(tmp_path):
    steps = SMALL + ["train.num_steps = 10", "train.checkpoint_every = 4"]
    configurables.parse(BASE, steps)
    train_lib.train(str(tmp_path / "straight"))
    configurables.parse(BASE, steps + ["train.stop_at_step = 6"])
    train_lib.train(str(tmp_path / "resumed"))  # preempted at 6; newest checkpoint is 4
    assert [s for s, _, _ in _losses(tmp_path / "resumed")] == list(range(1, 7))
    configurables.parse(BASE, steps)
    train_lib.train(str(tmp_path / "resumed"))
    assert _losses(tmp_path / "resumed") == _losses(tmp_path / "straight")  # bitwise


HMT_SMALL = SMALL + ["memory.HMTConfig.sensory_len = 4", "memory.HMTConfig.num_memories = 4",
                     "train.seq_len = 48", "train.num_steps = 4", "train.checkpoint_every = 2",
                     "build_model.backend = 'reference'"]  # short segments compile faster


def test_hmt_trains_resumes_and_evaluates_through_the_recurrence(tmp_path):
    files = BASE + ["configs/memory/hmt.gin"]
    configurables.parse(files, HMT_SMALL)
    assert isinstance(train_lib.build_model(), HMT)
    configurables.parse(files, HMT_SMALL + ["train.stop_at_step = 3"])
    train_lib.train(str(tmp_path / "resumed"))  # preempted at 3; newest checkpoint is 2
    configurables.parse(files, HMT_SMALL)
    train_lib.train(str(tmp_path / "resumed"))  # (bitwise resume: the decoder's test above)
    assert [s for s, _, _ in _losses(tmp_path / "resumed")] == [1, 2, 3, 4]
    configurables.parse(files, HMT_SMALL + ["evaluate.length_multipliers = (1, 3)",
                                            "tasks.Passkey.trials = 1",
                                            "tasks.Passkey.depths = (0.5,)",
                                            "tasks.Passkey.multipliers = (16,)"])
    result = evaluate_lib.evaluate(str(tmp_path / "resumed"))
    # lengths are multiples of the 16-token segment (not of the 48-token training rows), and
    # the 256-token passkey prompt spans 16 segments
    assert result["length_unit"] == 16 and result["lengths"] == [16, 48]
    assert result["passkey"]["lengths"] == [256]
    assert all(0 < loss < 10 for loss in result["loss"].values())


def test_failed_run_keeps_the_good_checkpoint(tmp_path):
    configurables.parse(BASE, SMALL + ["train.num_steps = 4", "train.checkpoint_every = 2"])
    train_lib.train(str(tmp_path))
    before = sorted(os.listdir(tmp_path / "checkpoints"))
    configurables.parse(BASE, SMALL + ["train.num_steps = 8", "train.learning_rate = 1e30",
                                       "train.checkpoint_every = 1", "train.grad_clip = 1e30"])
    with pytest.raises(FloatingPointError, match="last good checkpoint"):
        train_lib.train(str(tmp_path))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == before


def test_minimal_sweep_writes_table_and_figures(tmp_path):
    variants = {"softmax_rope": {"gin": ["configs/attention/softmax_rope.gin"]},
                "lminfinite": {"gin": ["configs/attention/lminfinite.gin"],
                               "checkpoint_from": "softmax_rope"}}
    configurables.parse(["configs/sweeps/quick.gin"], [])
    extra = SMALL + ["train.num_steps = 3"]
    results = sweep_lib.sweep(variants=variants, workdir=str(tmp_path), cli_bindings=extra)
    assert set(results) == set(variants)
    for name in ("results.md", "results.json", "length_generalization.png", "per_position.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    table = json.loads((tmp_path / "results.json").read_text())
    assert set(table["lminfinite"]) == {"16", "32", "64"}
    assert "lminfinite" in (tmp_path / "results.md").read_text()
    assert not (tmp_path / "lminfinite" / "checkpoints").exists()  # reused, not retrained
    stamp = os.path.getmtime(tmp_path / "softmax_rope" / "eval.json")
    configurables.parse(["configs/sweeps/quick.gin"], [])
    sweep_lib.sweep(variants=variants, workdir=str(tmp_path), cli_bindings=extra)
    assert os.path.getmtime(tmp_path / "softmax_rope" / "eval.json") == stamp  # skipped
