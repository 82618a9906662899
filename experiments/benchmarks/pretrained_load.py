"""Benchmark: ``lcattn.pretrained.load`` against reading every tensor first, time and peak memory.

Run (from the repository root)::

    PYTHONPATH=. python -m experiments.benchmarks.pretrained_load --out=/tmp/load.json
    PYTHONPATH=. python -m experiments.benchmarks.pretrained_load --layers=16 --hidden=2048 \
        --intermediate=5632 --vocab=32000        # ~1.1B (a GPU session)

No model hub is reachable here, so the script first writes a randomly initialized Llama-like
folder (``--folder``, kept for reuse; bfloat16 safetensors in 1 GiB shards, as released
checkpoints are) with ``--layers`` blocks of width ``--hidden``, GQA ``--heads``/``--kv_heads``,
SwiGLU ``--intermediate`` and an untied ``--vocab`` head. Then, each in a fresh subprocess (so
peak resident memory is the process's own ``ru_maxrss``):

* ``lcattn``: ``lcattn.pretrained.load(folder, dtype=--dtype)``, one tensor at a time;
* ``read_all``: what a user would otherwise write: ``safetensors.numpy.load_file`` of every
  shard into one dict, then ``jnp.asarray(x.astype(dtype))`` of each tensor (no mapping onto a
  model: a lower bound on that route's work).

Both end with the parameters on the default device and report wall seconds from the start of
the read (imports excluded) and peak RSS; the ratios are ``read_all / lcattn``. Prints JSON.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time

from absl import app, flags

_FOLDER = flags.DEFINE_string("folder", "/tmp/lcattn_random_llama", "Where the random model "
                              "is written (reused when its config matches).")
_LAYERS = flags.DEFINE_integer("layers", 20, "Decoder blocks.")
_HIDDEN = flags.DEFINE_integer("hidden", 1024, "hidden_size.")
_HEADS = flags.DEFINE_integer("heads", 16, "Query heads.")
_KV_HEADS = flags.DEFINE_integer("kv_heads", 4, "Key/value heads.")
_INTER = flags.DEFINE_integer("intermediate", 2816, "SwiGLU width.")
_VOCAB = flags.DEFINE_integer("vocab", 32000, "Vocabulary.")
_DTYPE = flags.DEFINE_string("dtype", "float32", "dtype the parameters are loaded in.")
_OUT = flags.DEFINE_string("out", None, "Also write the JSON report here.")
_CHILD = flags.DEFINE_string("child", None, "internal: run one loader and print its record.")


def _config() -> dict:
    h, layers = _HIDDEN.value, _LAYERS.value
    return dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=h,
                intermediate_size=_INTER.value, num_hidden_layers=layers,
                num_attention_heads=_HEADS.value, num_key_value_heads=_KV_HEADS.value,
                rms_norm_eps=1e-5, rope_theta=10000.0, vocab_size=_VOCAB.value,
                max_position_embeddings=4096, tie_word_embeddings=False, hidden_act="silu",
                torch_dtype="bfloat16")


def _write_random(folder: str, config: dict) -> int:
    """Write the random model unless ``folder`` holds it; returns its parameter count."""
    import jax.numpy as jnp
    import numpy as np

    from lcattn import hf_layouts, pretrained
    from lcattn.ssm import SSMOptions

    _, _, tensors = hf_layouts.parse(dict(config), "random", SSMOptions())
    d, h, hkv = config["hidden_size"], config["num_attention_heads"], \
        config["num_key_value_heads"]
    dh, f, v = d // h, config["intermediate_size"], config["vocab_size"]
    shapes = {"q_proj": (h * dh, d), "k_proj": (hkv * dh, d), "v_proj": (hkv * dh, d),
              "o_proj": (d, h * dh), "gate_proj": (f, d), "up_proj": (f, d),
              "down_proj": (d, f), "embed_tokens": (v, d), "lm_head": (v, d)}

    def shape(name):
        for key, s in shapes.items():
            if f"{key}." in name:
                return s
        return (d,)   # norms

    count = sum(int(np.prod(shape(t.name))) for t in tensors)
    stamp = os.path.join(folder, "config.json")
    if os.path.exists(stamp) and pretrained.read_config(folder) == config:
        return count
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {t.name: (rng.standard_normal(shape(t.name), np.float32) * 0.02).astype(
        jnp.bfloat16) for t in tensors}
    pretrained._write_tensors(arrays, folder, 1 << 30)
    with open(stamp, "w") as fh:
        json.dump(config, fh, indent=2)
    return count


def _child(kind: str, folder: str, dtype: str) -> dict:
    import glob

    import jax
    import jax.numpy as jnp
    from flax import nnx
    from safetensors.numpy import load_file

    from lcattn import pretrained

    t0 = time.perf_counter()
    if kind == "lcattn":
        model = pretrained.load(folder, dtype=dtype)
        leaves = jax.tree.leaves(nnx.state(model))
    else:
        raw = {}
        for file in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
            raw.update(load_file(file))
        leaves = [jnp.asarray(x.astype(jnp.dtype(dtype))) for x in raw.values()]
    jax.block_until_ready(leaves)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"seconds": seconds, "peak_rss_bytes": peak,
            "param_bytes": int(sum(x.nbytes for x in leaves))}


def main(argv):
    del argv
    if _CHILD.value:
        print(json.dumps(_child(_CHILD.value, _FOLDER.value, _DTYPE.value)))
        return
    config = _config()
    t0 = time.perf_counter()
    params = _write_random(_FOLDER.value, config)
    print(f"[{time.perf_counter() - t0:.0f}s] random model ready: {params / 1e6:.0f}M "
          f"parameters in {_FOLDER.value}", file=sys.stderr, flush=True)
    report = {"machine": platform.processor() or platform.machine(),
              "cpu_count": os.cpu_count(), "parameters": params, "config": config,
              "dtype": _DTYPE.value, "results": {}}
    for kind in ("lcattn", "read_all"):
        out = subprocess.run([sys.executable, "-m", "experiments.benchmarks.pretrained_load",
                              f"--child={kind}", f"--folder={_FOLDER.value}",
                              f"--dtype={_DTYPE.value}"], capture_output=True, text=True,
                             check=True)
        report["results"][kind] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"[{time.perf_counter() - t0:.0f}s] {kind}: {report['results'][kind]}",
              file=sys.stderr, flush=True)
    ours, theirs = report["results"]["lcattn"], report["results"]["read_all"]
    report["ratio_seconds_read_all_over_lcattn"] = theirs["seconds"] / ours["seconds"]
    report["ratio_peak_rss_read_all_over_lcattn"] = theirs["peak_rss_bytes"] / \
        ours["peak_rss_bytes"]
    text = json.dumps(report, indent=1)
    print(text)
    if _OUT.value:
        with open(_OUT.value, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    app.run(main)
