"""Figure 2 (LM-Infinite's diagnosis): entropy, running max, re-indexing by distance, PCA and
centroid separation against values worked out by hand; the per-row statistics against a dense
numpy computation; the figure end to end on a random tiny model (no training)."""
import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.figures import common
from experiments.figures import lminfinite_diagnosis as diag
from experiments.figures.runs import Pool
from lcattn import masks, normalizers
from lcattn.model import DecoderLM

INF = np.inf


def test_entropy_of_uniform_one_hot_and_zero_entries():
    np.testing.assert_allclose(diag.entropy(np.full(7, 1 / 7)), np.log(7), rtol=1e-6)
    assert float(diag.entropy(np.eye(5)[2])) == 0.0
    p = np.array([[0.5, 0.5, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
    np.testing.assert_allclose(diag.entropy(p), [np.log(2), np.log(4)], rtol=1e-6)
    np.testing.assert_allclose(diag.entropy(p.T, axis=0), [np.log(2), np.log(4)], rtol=1e-6)


def test_running_max_along_an_axis_skips_leading_minus_inf():
    np.testing.assert_array_equal(diag.running_max(np.array([1.0, 3, 2, 5, 4])), [1, 3, 3, 5, 5])
    x = np.array([[-INF, 2.0, 1.0], [0.0, -1.0, 4.0]])
    np.testing.assert_array_equal(diag.running_max(x), [[-INF, 2, 2], [0, 0, 4]])
    np.testing.assert_array_equal(diag.running_max(x, axis=0), [[-INF, 2, 1], [0, 2, 4]])


def test_by_distance_reads_each_row_backwards_from_its_position():
    m = np.arange(12.0).reshape(3, 4)            # rows at positions 1, 2, 3; keys 0..3
    got = diag.by_distance(m, np.array([1, 2, 3]))
    np.testing.assert_array_equal(got, [[1, 0, -INF, -INF],
                                        [6, 5, 4, -INF],
                                        [11, 10, 9, 8]])


def test_pca_of_points_on_a_line_and_of_an_axis_aligned_cloud():
    t = np.array([-2.0, -1, 0, 1, 5])
    u = np.array([0.6, 0.0, 0.8])
    scores, comps, ratio = diag.pca(t[:, None] * u + [1.0, 2.0, 3.0], 2)
    np.testing.assert_allclose(comps[0], u, atol=1e-12)
    np.testing.assert_allclose(scores[:, 0], t - t.mean(), atol=1e-12)
    np.testing.assert_allclose(ratio, [1.0, 0.0], atol=1e-12)
    # variances 4 : 1 along y and x
    x = np.array([[0.0, 2], [0, -2], [1, 0], [-1, 0]])
    _, comps, ratio = diag.pca(x, 2)
    np.testing.assert_allclose(np.abs(comps), [[0, 1], [1, 0]], atol=1e-12)
    np.testing.assert_allclose(ratio, [0.8, 0.2])


def test_centroid_separation_in_units_of_the_rest_spread():
    points = np.array([[1.0, 0], [-1, 0], [0, 1], [0, -1], [3, 4], [3, 4]])
    first = np.array([False] * 4 + [True] * 2)
    assert diag.centroid_separation(points, first) == pytest.approx(5.0)


def test_octave_mean_averages_the_octave_before_the_end():
    assert diag.octave_mean(np.arange(8.0), np.ones(8), 8) == pytest.approx(5.5)
    assert diag.octave_mean([0, 0, 6, 2], [0, 0, 3, 1], 4) == pytest.approx(2.0)


def test_row_stats_match_a_dense_numpy_computation():
    rng = np.random.default_rng(0)
    s_count, t, c, h, dh, train = 2, 7, 4, 2, 3, 3
    q = rng.normal(size=(s_count, t, h, dh)).astype(np.float32)
    k = rng.normal(size=(s_count, t, 1, dh)).astype(np.float32)
    rows = np.arange(3, 3 + c)
    out = diag._row_stats(jnp.asarray(q[:, rows]), jnp.asarray(k), jnp.asarray(rows),
                          mask=masks.Causal(), normalizer=normalizers.Softmax(),
                          train_length=train)
    run_sum, run_sq, count = np.zeros(t), np.zeros(t), np.zeros(t)
    at_sum, ent = np.zeros(t), np.zeros((s_count, c))
    near, far = -INF, -INF
    for b in range(s_count):
        for r, i in enumerate(rows):
            logits = np.array([[q[b, i, hh] @ k[b, j, 0] for j in range(i + 1)]
                               for hh in range(h)])                  # [H, i + 1]
            p = np.exp(logits - logits.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            ent[b, r] = -(p * np.log(p)).sum(1).mean()
            best = -INF
            for d in range(i + 1):
                m = logits[:, i - d].max()
                best = max(best, m)
                run_sum[d] += best
                run_sq[d] += best ** 2
                count[d] += 1
                at_sum[d] += m
                if d < train:
                    near = max(near, m)
                else:
                    far = max(far, m)
    for got, want in zip(out[:6], (run_sum, run_sq, count, at_sum, count, ent)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert float(out[6]) == pytest.approx(near, rel=1e-5)
    assert float(out[7]) == pytest.approx(far, rel=1e-5)


def _tiny_model():
    return DecoderLM(vocab_size=256, d_model=16, num_heads=2, num_kv_heads=1, head_dim=8,
                     mlp_dim=32, rngs=nnx.Rngs(0))


def _tokens(num, length):
    return np.random.default_rng(1).integers(0, 256, size=(num, length)).astype(np.int32)


# Both tests below read 2 sequences of 32 tokens (train length 2) in one chunk, so they share
# their compilations.
def test_analyse_walks_the_model_blocks():
    model, tokens = _tiny_model(), _tokens(2, 32)
    result = diag.analyse(model, tokens, train_length=2, chunk=32)
    want = nnx.jit(lambda m, x: m.forward_embeddings(m.embed(x)))(model, jnp.asarray(tokens))
    np.testing.assert_allclose(result["hidden"], want, rtol=1e-5, atol=1e-5)
    for layer in result["layers"]:
        np.testing.assert_array_equal(layer["count"], 2 * (32 - np.arange(32)))
        ent = layer["entropy"]
        assert np.all(ent[:, 0] == 0) and np.all(ent <= np.log(np.arange(32) + 1) + 1e-5)


def test_figure_end_to_end_on_a_random_model(tmp_path, monkeypatch):
    folder = tmp_path / "runs" / "softmax_rope_s0"
    folder.mkdir(parents=True)
    (folder / "eval.json").write_text(json.dumps({"length_unit": 2}))
    pool = Pool(str(tmp_path / "runs"), common.SCALES["smoke"])
    (folder / "figure_run.json").write_text(json.dumps(pool.config(common.SOFTMAX_ROPE, 0)))
    monkeypatch.setattr(diag, "_load", lambda folder: _tiny_model())
    monkeypatch.setattr(diag, "_validation", _tokens)
    data = common.make(diag, "smoke", str(tmp_path))
    assert data["length"] == 32 and len(data["layers"]) == 2
    assert len(data["pca"]["x"]) == len(data["pca"]["position"]) == 64
    for ext in ("png", "pdf", "json", "md"):
        assert (tmp_path / f"lminfinite_diagnosis.{ext}").exists()
    assert "| PCA plane (PC1, PC2) |" in (tmp_path / "lminfinite_diagnosis.md").read_text()
