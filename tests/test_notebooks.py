"""Notebooks: each jupytext ``py:percent`` source runs as a script in smoke mode, its ``.ipynb``
twin holds the same cells and no outputs, and one notebook runs through a real Jupyter kernel.

Smoke mode: ``LCATTN_SMOKE=1`` (sizes of seconds), ``LCATTN_WORKDIR`` (where a notebook writes),
``MPLBACKEND=Agg``. The selected notebooks' smoke runs start together, two at a time (a run is
mostly single-threaded XLA compilation): about 4 CPU-minutes in all, ~2 minutes on 2 idle cores.
Regenerate a twin after editing its source: ``jupytext --update --to ipynb notebooks/NAME.py``
(``notebooks/README.md``).
"""
import ast
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import jupytext
import nbformat
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, "notebooks")
BADGE = "https://colab.research.google.com/github/lcattn/lcattn/blob/main/notebooks/{}.ipynb"
# name -> files its smoke run must leave in LCATTN_WORKDIR
WRITES = {
    "00_quickstart": ["training_loss.png", "metrics.jsonl", "config.gin"],
    "01_masks_and_sparsity": ["mask_gallery.png", "mask_sparsity.png", "mask_sparsity.md",
                              "explore.png"],
    "02_normalizers": ["rows.png", "entropy_vs_n.png", "sharpening_with_p.png"],
    "10_length_generalization": ["lminfinite_nll.png", "lminfinite_nll.md",
                                 "lssar_extrapolation.png", "lssar_extrapolation.md"],
    "11_state_space_and_memory": ["state_collapse.png", "state_collapse.md",
                                  "hmt_segments.png", "hmt_segments.md"],
}
# CPU seconds of each smoke run (measured on 2 cores): the longest start first
COST = {"00_quickstart": 35, "01_masks_and_sparsity": 5, "02_normalizers": 10,
        "10_length_generalization": 75, "11_state_space_and_memory": 95}
SLOW = {"10_length_generalization", "11_state_space_and_memory"}  # they train several runs
MAX_FUNCTION_LINES = 8  # notebooks stay thin: logic lives in lcattn / experiments


def _path(name, ext):
    return os.path.join(NOTEBOOKS, name + ext)


def _smoke_env(workdir, **extra):
    """The environment of a smoke run: one CPU device (not the tests' 8), this checkout first
    on the path."""
    env = dict(os.environ, LCATTN_SMOKE="1", LCATTN_WORKDIR=str(workdir), JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
               **extra)
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if not f.startswith("--xla_force_host_platform_device_count"))
    env.pop("LCATTN_PRESET", None)
    return env


def _params(names):
    return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in names]


def test_every_notebook_has_its_twin_and_is_tested():
    sources = sorted(f[:-3] for f in os.listdir(NOTEBOOKS) if f.endswith(".py"))
    twins = sorted(f[:-6] for f in os.listdir(NOTEBOOKS) if f.endswith(".ipynb"))
    assert sources == twins == sorted(WRITES)


@pytest.mark.parametrize("name", sorted(WRITES))
def test_ipynb_is_the_output_free_twin_of_the_py(name):
    source = jupytext.read(_path(name, ".py"))
    twin = nbformat.read(_path(name, ".ipynb"), as_version=4)
    nbformat.validate(twin)
    regenerate = f"stale twin: run `jupytext --update --to ipynb notebooks/{name}.py`"
    assert ([(c.cell_type, c.source) for c in twin.cells]
            == [(c.cell_type, c.source) for c in source.cells]), regenerate
    for cell in twin.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, \
                f"{name}.ipynb stores outputs: {regenerate}"
    assert twin.metadata.kernelspec.name == "python3"
    assert twin.metadata.jupytext.formats == "ipynb,py:percent"


@pytest.mark.parametrize("name", sorted(WRITES))
def test_notebook_starts_with_badge_colab_install_devices_and_parameters(name):
    cells = jupytext.read(_path(name, ".py")).cells
    badge, install, devices, params = cells[:4]
    assert badge.cell_type == "markdown" and BADGE.format(name) in badge.source
    assert 'if "google.colab" in sys.modules:' in install.source
    assert "jax[tpu]" in install.source and "jax[cuda12]" in install.source
    assert "jax.default_backend()" in devices.source and "jax.devices()" in devices.source
    assert 'SMOKE = os.environ.get("LCATTN_SMOKE", "0") == "1"' in params.source
    assert "LCATTN_WORKDIR" in params.source


@pytest.mark.parametrize("name", sorted(WRITES))
def test_notebook_functions_are_a_few_lines(name):
    with open(_path(name, ".py")) as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.Lambda)):
            assert node.end_lineno - node.lineno + 1 <= MAX_FUNCTION_LINES, \
                f"{name}.py:{node.lineno}: move this logic into lcattn / experiments"


def _run_script(name, workdir):
    proc = subprocess.run([sys.executable, _path(name, ".py")], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=_smoke_env(workdir, MPLBACKEND="Agg"))
    return proc, workdir


@pytest.fixture(scope="module")
def smoke_runs(request, tmp_path_factory):
    """``name -> Future[(CompletedProcess, workdir)]`` for the notebooks this session runs."""
    names = [item.callspec.params["name"] for item in request.session.items
             if item.originalname == "test_notebook_runs_as_a_script_in_smoke_mode"]
    with ThreadPoolExecutor(max_workers=2) as pool:
        yield {name: pool.submit(_run_script, name, tmp_path_factory.mktemp(name))
               for name in sorted(names, key=COST.get, reverse=True)}


@pytest.mark.parametrize("name", _params(sorted(WRITES)))
def test_notebook_runs_as_a_script_in_smoke_mode(name, smoke_runs):
    proc, workdir = smoke_runs[name].result()
    assert proc.returncode == 0, f"{name}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert "backend: cpu" in proc.stdout and "SMOKE=True" in proc.stdout
    missing = [f for f in WRITES[name] if not (workdir / f).exists()]
    assert not missing, f"{name} did not write {missing}:\n{proc.stdout[-4000:]}"


def test_normalizers_notebook_runs_in_a_jupyter_kernel(tmp_path, monkeypatch):
    """The ``.ipynb`` itself through ipykernel: inline PNGs, treescope's HTML, IPython-only
    paths that a script never takes."""
    nbclient = pytest.importorskip("nbclient")
    env = _smoke_env(tmp_path)
    env.pop("MPLBACKEND", None)  # the kernel's own inline backend
    # the kernelspec runs `python` from PATH: make it this interpreter
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    for key in set(os.environ) - set(env):
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    nb = nbformat.read(_path("02_normalizers", ".ipynb"), as_version=4)
    nbclient.NotebookClient(nb, kernel_name="python3", timeout=300,
                            resources={"metadata": {"path": ROOT}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    text = "".join(o.get("text", "") for o in outputs)
    assert "backend: cpu" in text and "SMOKE=True" in text
    kinds = [kind for o in outputs for kind in o.get("data", {})]
    assert kinds.count("image/png") == 3, kinds
    assert "text/html" in kinds  # the treescope view
