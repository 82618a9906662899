"""The backend registry: names, validation through it, and the ``"auto"`` table."""
import pytest
from flax import nnx

import lcattn
from lcattn import backends
from lcattn.layers import Attention
from lcattn.model import DecoderLM


def test_names_and_kinds():
    assert lcattn.BACKENDS == backends.names() == ("auto", "reference", "xla", "pallas_tpu",
                                                   "pallas_gpu", "cudnn", "pallas_triton")
    assert not backends.REGISTRY["cudnn"].streaming and backends.REGISTRY["pallas_gpu"].streaming
    assert backends.REGISTRY["pallas_triton"].streaming
    assert not backends.REGISTRY["reference"].streaming
    assert backends.REGISTRY["xla"].streaming and backends.REGISTRY["pallas_tpu"].streaming
    assert callable(backends.REGISTRY["xla"].load().pass_fn)
    assert callable(backends.REGISTRY["reference"].load().attend)


@pytest.mark.parametrize("platform", ["cpu", "gpu", "tpu"])
def test_auto_resolves_through_the_table_and_cites_a_measurement(platform):
    assert backends.resolve_backend("auto", lcattn.AttentionSpec(), platform).name == "xla"
    assert backends.resolve_backend("reference", None, platform).name == "reference"
    assert all("BENCHMARKS.md" in rule.measured for rule in backends.AUTO)
    assert {rule.backend for rule in backends.AUTO} <= set(backends.REGISTRY)


def test_unknown_names_fail_where_they_are_given():
    with pytest.raises(ValueError, match=r"`backend` must be one of \('auto', 'reference'"):
        backends.resolve_backend("pallas_cuda")
    with pytest.raises(ValueError, match="Attention: `backend`.*'cuda'"):
        Attention(8, 2, 1, 4, rngs=nnx.Rngs(0), backend="cuda")
    with pytest.raises(ValueError, match="DecoderLM: `backend`.*'cuda'"):
        DecoderLM(vocab_size=8, d_model=8, num_heads=2, num_kv_heads=1, head_dim=4, mlp_dim=8,
                  backend="cuda", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="already registered"):
        backends.register(backends.Backend("xla", "lcattn.backends.xla", streaming=True))
