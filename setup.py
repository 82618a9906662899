"""lcattn: long-context sequence mixing in JAX (see README.md)."""
from setuptools import find_packages, setup

setup(
    name="lcattn",
    version="0.1.0",
    description="Long-context attention, memory and state layers in JAX/Flax NNX.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["lcattn", "lcattn.*", "pallas_kernels", "pallas_kernels.*",
                                    "experiments", "experiments.*"]),
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax",
        "orbax-checkpoint",
        "tensorstore",
        "absl-py",
        "gin-config",
        "grain",
        "numpy",
        "matplotlib",
        "safetensors",  # lcattn.pretrained: Hugging Face-format weights (numpy, no torch)
        "tokenizers",   # lcattn.pretrained.load_tokenizer
        "tensorboardX",  # experiments.tracking: TensorBoard event files without TensorFlow
    ],
    extras_require={"test": ["pytest", "pytest-xdist", "hypothesis", "ruff",
                             # tests/test_notebooks.py: jupytext pairs, a real kernel
                             "jupytext", "nbformat", "nbclient", "ipykernel",
                             # tests/test_tracking.py reads the event files back
                             "tensorboard"]},
)
