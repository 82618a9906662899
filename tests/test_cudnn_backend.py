"""``backend="cudnn"``: the translation of a spec into ``jax.nn.dot_product_attention``'s
arguments, checked on CPU through jax's XLA implementation of the same call (cuDNN itself
needs a GPU), and a clear error for every spec cuDNN cannot express."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lcattn
from lcattn import masks, normalizers, positions
from lcattn.backends import cudnn
from tests.helpers import qkv

SUPPORTED = {"full": masks.Full(), "causal": masks.Causal(), "local": masks.Local(5)}


@pytest.mark.parametrize("mask", list(SUPPORTED))
@pytest.mark.parametrize("heads, pos", [((4, 4), positions.RoPE()), ((4, 2), positions.NoPE()),
                                        ((6, 2), positions.RoPE(theta=500.0))])
def test_translation_equals_reference(mask, heads, pos, monkeypatch):
    monkeypatch.setattr(cudnn, "IMPLEMENTATION", "xla")
    spec = lcattn.AttentionSpec(mask=SUPPORTED[mask], position=pos,
                                normalizer=normalizers.Softmax(scale=0.3 if mask == "full"
                                                               else None))
    q, k, v = (x.astype(jnp.bfloat16) for x in qkv(4, 2, 24, 24, heads[0], heads[1], 16))
    cot = jnp.asarray(np.random.default_rng(3).normal(size=q.shape), jnp.float32)

    def loss(backend):
        return lambda q, k, v: jnp.sum(lcattn.attend(q, k, v, spec, backend=backend)
                                       .astype(jnp.float32) * cot)

    out, grads = jax.value_and_grad(loss("cudnn"), argnums=(0, 1, 2))(q, k, v)
    ref, ref_grads = jax.value_and_grad(loss("reference"), argnums=(0, 1, 2))(
        *(x.astype(jnp.float32) for x in (q, k, v)))
    np.testing.assert_allclose(lcattn.attend(q, k, v, spec, backend="cudnn").astype(np.float32),
                               lcattn.attend(*(x.astype(jnp.float32) for x in (q, k, v)), spec,
                                             backend="reference"), atol=3e-2)
    np.testing.assert_allclose(out, ref, rtol=3e-2)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g.astype(np.float32), r, atol=0.1, rtol=0.05)


@pytest.mark.parametrize("spec, kw, match", [
    (lcattn.AttentionSpec(normalizer=normalizers.Softplus()), {}, "normalizer"),
    (lcattn.AttentionSpec(normalizer=normalizers.Softmax(softcap=30.0)), {}, "softcap"),
    (lcattn.AttentionSpec(mask=masks.Lambda(4, 2)), {}, "mask"),
    (lcattn.AttentionSpec(mask=masks.Lambda(4, 2), distance_limit=4), {}, "distance_limit"),
    (lcattn.AttentionSpec(position=positions.ALiBi()), {}, "ALiBi"),
    (lcattn.AttentionSpec(), dict(q_segment_ids=np.ones((1, 8), np.int32),
                                  kv_segment_ids=np.ones((1, 8), np.int32)), "segment ids"),
    (lcattn.AttentionSpec(), dict(q_positions=np.arange(8)[None], k_positions=np.arange(8)[None]),
     "explicit positions"),
    (lcattn.AttentionSpec(), dict(dtype=jnp.float32), "float32"),
])
def test_what_cudnn_cannot_express_is_a_clear_error(spec, kw, match):
    dtype = kw.pop("dtype", jnp.bfloat16)
    q, k, v = (x.astype(dtype) for x in qkv(5, 1, 8, 8, 2, 2, 8))
    with pytest.raises(ValueError, match=f"backend='cudnn' cannot express.*{match}"):
        lcattn.attend(q, k, v, spec, backend="cudnn", **kw)
