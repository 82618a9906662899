"""Figure 6 (masks and block sparsity): the effective-distance grid against matrices written
out by hand, and the tile classes and counts against a dense count of visible pairs per tile."""
import numpy as np
import pytest

from experiments.figures import common, mask_sparsity
from lcattn import masks
from lcattn.attention import AttentionSpec

N = np.nan


def test_effective_distance_of_a_small_lambda_mask_by_hand():
    # Lambda(window=3, n_global=1), D=3: inside the window i - j; key 0 beyond it at D.
    spec = AttentionSpec(mask=masks.Lambda(3, 1), distance_limit=3)
    want = [[0, N, N, N, N, N],
            [1, 0, N, N, N, N],
            [2, 1, 0, N, N, N],
            [3, 2, 1, 0, N, N],
            [3, N, 2, 1, 0, N],
            [3, N, N, 2, 1, 0]]
    np.testing.assert_array_equal(mask_sparsity.effective_distance(spec, 6), want)
    # two sinks and D=2 < window: every sink beyond the window sits at distance 2
    spec = AttentionSpec(mask=masks.Lambda(3, 2), distance_limit=2)
    want = [[0, N, N, N, N, N],
            [1, 0, N, N, N, N],
            [2, 1, 0, N, N, N],
            [2, 2, 1, 0, N, N],
            [2, 2, 2, 1, 0, N],
            [2, 2, N, 2, 1, 0]]
    np.testing.assert_array_equal(mask_sparsity.effective_distance(spec, 6), want)


def test_effective_distance_without_a_limit_is_the_causal_distance():
    got = mask_sparsity.effective_distance(AttentionSpec(), 5)
    i, j = np.indices((5, 5))
    np.testing.assert_array_equal(got, np.where(i >= j, i - j, np.nan))


@pytest.mark.parametrize("name, visible", [
    ("causal", lambda q, k: q >= k),
    ("local", lambda q, k: (q - k >= 0) & (q - k < 12)),
    ("lambda", lambda q, k: (q >= k) & ((q - k < 12) | (k < 3))),
])
def test_tile_classes_and_counts_match_a_dense_count(name, visible):
    mask = {"causal": masks.Causal(), "local": masks.Local(12),
            "lambda": masks.Lambda(12, 3)}[name]
    t, b = 64, 8
    q, k = np.indices((t, t))
    pairs = visible(q, k).reshape(t // b, b, t // b, b).sum(axis=(1, 3))
    want = np.where(pairs == 0, 0, np.where(pairs == b * b, 2, 1))
    classes = mask_sparsity.tile_map(mask, t, b)
    np.testing.assert_array_equal(classes, want)
    assert mask_sparsity.tile_counts(classes) == {
        "total": 64, "visited": int((pairs > 0).sum()), "full": int((pairs == b * b).sum()),
        "partial": int(((pairs > 0) & (pairs < b * b)).sum())}


def test_figure_writes_its_files(tmp_path, monkeypatch):
    small = dict(mask_sparsity.SIZES["smoke"], lengths=(1024, 2048), drawn_tiles=8)
    monkeypatch.setitem(mask_sparsity.SIZES, "smoke", small)
    data = common.make(mask_sparsity, "smoke", str(tmp_path))
    assert data["masks"]["Causal"]["1024"]["counts"] == {
        "total": 64, "visited": 36, "full": 28, "partial": 8}
    for ext in ("png", "pdf", "json", "md"):
        assert (tmp_path / f"mask_sparsity.{ext}").exists()
    assert "| Lambda(4096, 64) | 2048 |" in (tmp_path / "mask_sparsity.md").read_text()
