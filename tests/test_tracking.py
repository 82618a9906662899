"""Watching runs (experiments.tracking): TensorBoard events mirror metrics.jsonl across a resume,
evaluation scalars land at the trained step, profiler traces, optional wandb."""
import glob
import json
import os
import sys

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_file_loader
from tensorboard.util import tensor_util

from experiments import configurables, tracking
from experiments import evaluate as evaluate_lib
from experiments import train as train_lib

ROOT = configurables.REPO_ROOT
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "corpus")
BASE = ["configs/base.gin", "configs/models/tiny.gin", "configs/attention/softmax_rope.gin"]
SMALL = [f"data.DataConfig.source = '{FIXTURE}'", "data.DataConfig.val_every = 3", "SEQ_LEN = 16",
         "train.batch_size = 4", "train.warmup_steps = 1", "train.log_every = 1",
         "train.num_steps = 4", "train.checkpoint_every = 2", "build_model.num_layers = 1",
         "build_model.d_model = 32", "build_model.num_heads = 2", "build_model.num_kv_heads = 1",
         "build_model.mlp_dim = 64", "evaluate.length_multipliers = (1, 2)",
         "tasks.Passkey.trials = 0", "evaluate.max_tokens = 2000"]


def _events(logdir):
    """``[(tag, step, value)]`` of the event files directly in ``logdir``, in file order;
    ``value`` is a float for scalars and the PNG bytes for images."""
    out = []
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        for event in event_file_loader.EventFileLoader(path).Load():
            for v in event.summary.value:
                array = tensor_util.make_ndarray(v.tensor)
                value = array[2] if v.metadata.plugin_data.plugin_name == "images" \
                    else float(array)
                out.append((v.tag, event.step, value))
    return out


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


class _FakeWandb:
    """Stands in for the ``wandb`` module and its run: records what it is given."""

    dir = "fake"

    def __init__(self):
        self.init_kwargs, self.logged, self.finished = None, [], False

    def init(self, **kwargs):
        self.init_kwargs = kwargs
        return self

    def log(self, values, step):
        self.logged.append((step, values))

    def finish(self):
        self.finished = True


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run preempted after step 3 (newest checkpoint: 2) while profiling steps 2..3, resumed
    to step 4 with (fake) wandb logging, then evaluated."""
    workdir = str(tmp_path_factory.mktemp("tracked"))
    configurables.parse(BASE, SMALL + ["train.stop_at_step = 3", "train.profile_steps = (2, 3)"])
    train_lib.train(workdir)
    first = _events(os.path.join(workdir, "tensorboard"))
    wandb = _FakeWandb()
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "wandb", wandb)
        configurables.parse(BASE, SMALL + ["train.wandb_project = 'lcattn'"])
        train_lib.train(workdir)
    configurables.parse(BASE, SMALL, run_config=os.path.join(workdir, "config.gin"))
    result = evaluate_lib.evaluate(workdir)
    return workdir, first, result, wandb


def test_events_hold_the_metrics_rows(run):
    workdir, first, *_ = run
    assert sorted({s for _, s, _ in first}) == [1, 2, 3]  # the preempted run's own events
    events = _events(os.path.join(workdir, "tensorboard"))
    rows = _rows(workdir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in ("loss", "learning_rate", "grad_norm", "param_norm", "tokens_per_sec",
                "step_seconds"):
        got = [(s, v) for tag, s, v in events if tag == f"train/{key}"]
        assert got == [(r["step"], float(np.float32(r[key]))) for r in rows], key
    assert "mfu" not in rows[0]  # a CPU has no known peak FLOP/s


def test_resumed_run_writes_each_step_once_in_order(run):
    events = _events(os.path.join(run[0], "tensorboard"))
    steps = [s for tag, s, _ in events if tag == "train/loss"]
    assert steps == [1, 2, 3, 4]
    assert len(glob.glob(os.path.join(run[0], "tensorboard", "events.out.tfevents.*"))) == 1


def test_profile_steps_write_a_trace(run):
    traces = glob.glob(os.path.join(run[0], "profile", "plugins", "profile", "*", "*.xplane.pb"))
    assert len(traces) == 1 and os.path.getsize(traces[0]) > 0


def test_evaluation_writes_scalars_and_figures_at_the_trained_step(run):
    workdir, _, result, _ = run
    logdir = os.path.join(workdir, "tensorboard", "eval")
    events = _events(logdir)
    scalars = {tag: v for tag, s, v in events if not isinstance(v, bytes)}
    assert {s for _, s, _ in events} == {result["step"]} == {4}
    assert scalars == {f"loss/L_{length}": float(np.float32(loss))
                       for length, loss in result["loss"].items()}
    images = {tag: v for tag, _, v in events if isinstance(v, bytes)}
    assert set(images) == {"eval_loss_vs_length", "eval_nll_vs_position"}
    assert all(png.startswith(b"\x89PNG") for png in images.values())
    tracking.write_eval(logdir, result, [])  # a re-run replaces, not adds
    assert sorted(tag for tag, _, _ in _events(logdir)) == sorted(scalars)


def test_wandb_run_gets_the_same_rows_replayed_on_resume(run):
    workdir, *_, wandb = run
    assert wandb.init_kwargs["project"] == "lcattn" and wandb.init_kwargs["dir"] == workdir
    assert wandb.init_kwargs["config"]["seq_len"] == 16
    assert "train.num_steps = 4" in wandb.init_kwargs["config"]["config.gin"]
    rows = _rows(workdir)
    assert wandb.logged == [(r["step"], {f"train/{k}": v for k, v in r.items() if k != "step"})
                            for r in rows]
    assert wandb.finished


@pytest.mark.parametrize("steps", [(0, 2), (3, 2), (1,), "1,2"])
def test_bad_profile_steps_fail_clearly(tmp_path, steps):
    configurables.parse(BASE, SMALL + [f"train.profile_steps = {steps!r}"])
    with pytest.raises(ValueError, match="train.profile_steps"):
        train_lib.train(str(tmp_path))
    assert not (tmp_path / "checkpoints").exists()


def test_wandb_without_wandb_installed_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    configurables.parse(BASE, SMALL + ["train.wandb_project = 'lcattn'"])
    with pytest.raises(ImportError, match=r"train.wandb_project.*pip install wandb"):
        train_lib.train(str(tmp_path))
    assert not (tmp_path / "checkpoints").exists()


def test_wandb_offline_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    configurables.parse(BASE, SMALL + ["train.wandb_project = 'lcattn'", "train.num_steps = 2"])
    train_lib.train(str(tmp_path))
    assert glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
