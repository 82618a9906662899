"""Every backend in ``tests/cases.py`` against the ``reference`` oracle, forward and gradients:
masks x normalizers x GQA x dtypes with packed documents, position and normalizer options,
decode rows against a cache; and the argument checks they share. Backend-specific checks stay
in ``test_xla_backend.py`` and ``test_pallas_tpu.py``."""
import pytest

import lcattn
from tests import cases
from tests.helpers import compare_with_reference, qkv


def case_id(case):
    """A ``Case``'s own id, or a plan tuple's values joined by ``-``."""
    return case.id if isinstance(case, cases.Case) else "-".join(map(str, case))


def by_backend(plan):
    """pytest params ``(backend, case)`` over every backend's ``plan(backend)``."""
    return [pytest.param(backend, case, id=f"{backend.name}-{case_id(case)}")
            for backend in cases.BACKENDS.values() for case in plan(backend)]


@pytest.mark.parametrize("backend,case", by_backend(cases.matrix))
def test_matches_reference(backend, case):
    """``backend.seq`` tokens padded to the blocks; masks sized to span several tiles."""
    q, k, v, spec, kw = case.inputs(backend)
    compare_with_reference(q, k, v, spec, backend.name, backend.blocks, **kw)


@pytest.mark.parametrize("backend,case", by_backend(cases.options))
def test_positions_and_normalizer_options(backend, case):
    q, k, v, spec = cases.options_inputs(*case)
    compare_with_reference(q, k, v, spec, backend.name, backend.blocks)


@pytest.mark.parametrize("backend,case", by_backend(cases.decode))
def test_decode_rows_against_a_cache(backend, case):
    """Few queries at the end of a longer key range: ``Tq != Tk``, static query positions."""
    q, k, v, spec, qpos = cases.decode_inputs(backend, *case)
    compare_with_reference(q, k, v, spec, backend.name, backend.decode_blocks, q_positions=qpos)


@pytest.mark.parametrize("blocks,name", [((0, 16), "block_q"), ((16, True), "block_k")])
@pytest.mark.parametrize("backend", cases.BACKENDS)
def test_bad_block_sizes(backend, blocks, name):
    q, k, v = qkv(0, 1, 32, 32, 2, 2, 8)
    with pytest.raises(ValueError, match=rf"{name}`? must be an integer >= 1"):
        lcattn.attend(q, k, v, lcattn.AttentionSpec(), backend=backend, block_sizes=blocks)


def test_unknown_backend_lists_every_backend():
    q, k, v = qkv(0, 1, 8, 8, 1, 1, 8)
    for bad in ("pallas", "pallas_cuda"):
        with pytest.raises(ValueError, match="backend") as err:
            lcattn.attend(q, k, v, lcattn.AttentionSpec(), backend=bad)
        assert all(name in str(err.value) for name in cases.BACKENDS)
