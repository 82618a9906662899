"""``experiments.evaluate`` / ``sweep`` with ``--pretrained``, and ``experiments.export``."""
import json
import os

import gin
import jax.numpy as jnp
import numpy as np

from experiments import configurables
from experiments import evaluate as evaluate_lib
from experiments import export as export_lib
from experiments import sweep as sweep_lib
from experiments import train as train_lib
from lcattn import pretrained

ROOT = configurables.REPO_ROOT
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "pretrained")
CORPUS = os.path.join(ROOT, "tests", "fixtures", "corpus")
EVAL = [f"data.DataConfig.source = '{CORPUS}'", "evaluate.length_multipliers = (1, 2)",
        "evaluate.max_tokens = 600", "evaluate.batch_size = 2"]


def _parse(name, files=(), bindings=()):
    configurables.parse(list(files), configurables.pretrained_bindings(
        os.path.join(FIXTURES, name)) + EVAL + list(bindings))


def test_evaluate_pretrained_under_lminfinite_with_passkey(tmp_path):
    _parse("llama_gqa_llama3", ["configs/attention/lminfinite.gin"],
           ["tasks.Passkey.trials = 1", "tasks.Passkey.depths = (0.5,)",
            "tasks.Passkey.multipliers = (4,)"])
    result = evaluate_lib.evaluate(str(tmp_path))
    assert result["unit"] == "token" and result["lengths"] == [64, 128]   # max_position x 1, 2
    assert "Lambda(window=64, n_global=10)" in result["attention_override"]
    assert "each layer's own" in result["attention_override"]             # RoPE kept
    assert all(3.0 < loss < 8.0 for loss in result["loss"].values())     # ~ln(320) at random
    assert np.shape(result["passkey"]["accuracy"]) == (1, 1)
    for name in ("eval.json", "eval_loss_vs_length.png", "eval_passkey.png"):
        assert (tmp_path / name).exists()


def test_pretrained_mamba2_takes_ssm_mitigations(tmp_path):
    losses = []
    for extra in ([], ["ssm.SSMOptions.decay_scale = 2.0"]):
        _parse("mamba2", [], ["evaluate.length_unit = 32", "evaluate.passkey = None"] + extra)
        losses.append(evaluate_lib.evaluate(str(tmp_path / str(len(losses))))["loss"]["64"])
    assert losses[0] != losses[1]


def test_sweep_over_a_pretrained_model_trains_nothing(tmp_path):
    configurables.parse(["configs/sweeps/pretrained.gin"], configurables.pretrained_bindings(
        os.path.join(FIXTURES, "qwen2_bias")) + EVAL + ["tasks.Passkey.trials = 0"])
    variants = {k: v for k, v in gin.query_parameter("sweep.variants").items()
                if k in ("as_trained", "lminfinite")}
    results = sweep_lib.sweep(workdir=str(tmp_path), variants=variants,
                              cli_bindings=configurables.pretrained_bindings(
                                  os.path.join(FIXTURES, "qwen2_bias")) + EVAL
                              + ["tasks.Passkey.trials = 0"])
    assert set(results) == {"as_trained", "lminfinite"}
    assert not any((tmp_path / v / "checkpoints").exists() for v in results)
    assert "nats/token" in (tmp_path / "results.md").read_text()


def test_export_a_trained_run_and_load_it_back(tmp_path):
    run = tmp_path / "run"
    configurables.parse(["configs/base.gin", "configs/models/tiny.gin",
                         "configs/attention/softmax_rope.gin"],
                        [f"data.DataConfig.source = '{CORPUS}'", "data.DataConfig.val_every = 3",
                         "SEQ_LEN = 16", "train.batch_size = 2", "train.num_steps = 1",
                         "train.warmup_steps = 0", "build_model.d_model = 32",
                         "build_model.num_heads = 2", "build_model.mlp_dim = 32"])
    train_lib.train(str(run))
    configurables.parse([], [], run_config=str(run / "config.gin"))
    config = export_lib.export(str(run), str(tmp_path / "hf"))
    assert config["max_position_embeddings"] == 16 and config["vocab_size"] == 256
    model, _ = evaluate_lib.restore_model(str(run))
    tokens = jnp.asarray(np.arange(20, dtype=np.int32)[None] * 7 % 256)
    np.testing.assert_allclose(np.asarray(pretrained.load(str(tmp_path / "hf"))(tokens)),
                               np.asarray(model(tokens)), rtol=1e-5, atol=1e-5)
    with open(tmp_path / "hf" / "config.json") as f:
        assert json.load(f)["architectures"] == ["LlamaForCausalLM"]
