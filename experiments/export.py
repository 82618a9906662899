r"""Export a trained run as a Hugging Face-format folder (``config.json`` + ``*.safetensors``).

``python -m experiments.export --workdir=RUN --out=PATH`` reads ``RUN/config.gin``, restores the
newest checkpoint and writes it with ``lcattn.pretrained.save`` (``max_position_embeddings`` =
the run's training length), so ``lcattn.pretrained.load(PATH)``, ``experiments.evaluate
--pretrained=PATH`` and ``transformers``' ``AutoModelForCausalLM.from_pretrained(PATH)`` open it.
lcattn's byte-level runs have no ``tokenizer.json`` (token = byte, vocabulary 256). Runs with no
transformers equivalent (HMT, hybrid layer patterns, ALiBi / NoPE / LSSA) are an error naming why.
"""
from __future__ import annotations

if __name__ == "__main__":  # run the importable module, so gin sees one copy of each configurable
    from experiments.export import run

    run()
    raise SystemExit(0)

import json
import logging
import os

from absl import app, flags

from experiments import configurables
from experiments.evaluate import restore_model
from lcattn import memory, pretrained

OUT = flags.DEFINE_string("out", None, "Folder to write the Hugging Face-format model into.")
log = logging.getLogger("lcattn.export")


def export(workdir: str, out: str) -> dict:
    """Write ``workdir``'s newest checkpoint to ``out``; returns the written config."""
    model, step = restore_model(workdir)
    if isinstance(model, memory.HMT):
        raise ValueError(f"export: {workdir} is an HMT run, which has no transformers "
                         "architecture; export its backbone's own runs instead")
    with open(os.path.join(workdir, "run.json")) as f:
        seq_len = json.load(f)["seq_len"]
    pretrained.save(model, out, max_position_embeddings=seq_len)
    log.info("step %d of %s written to %s", step, workdir, out)
    return pretrained.read_config(out)


def main(argv):
    del argv
    if not configurables.WORKDIR.value or not OUT.value:
        raise app.UsageError("--workdir and --out are required")
    config = os.path.join(configurables.WORKDIR.value, "config.gin")
    if not os.path.isfile(config):
        raise FileNotFoundError(f"--workdir: {config} not found; train first")
    configurables.parse([], [], run_config=config)
    print(json.dumps(export(configurables.WORKDIR.value, OUT.value), indent=1))


def run():
    configurables.setup_logging()
    app.run(main)
