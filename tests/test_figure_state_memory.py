"""Figures 4 (state collapse) and 5 (HMT segments): their data functions against values worked
out by hand, their runs' configuration, and draw/table on a small hand-made result (no
training here; the notebook tests run the figures end to end in the smoke preset)."""
import matplotlib.pyplot as plt
import numpy as np
import pytest

from experiments.figures import hmt_segments, state_collapse


def test_excess_loss_is_longest_minus_training_length_loss():
    losses = {"64": 1.75, "512": 1.73, "4096": 1.70}     # eval.json: length string -> loss
    assert state_collapse.excess_loss(losses, 64) == pytest.approx(-0.05)
    assert state_collapse.excess_loss(losses, 512) == pytest.approx(-0.03)
    with pytest.raises(ValueError, match="training length 128 is not an eval length"):
        state_collapse.excess_loss(losses, 128)


def test_max_tokens_cut_the_same_text_for_every_eval_length():
    size = {"eval_sequences": 4, "unit": 64, "multipliers": (1, 8, 64)}
    n = state_collapse.max_tokens(size)
    assert n == 4 * 4096 + 1
    # evaluate cuts (n - 1) // L sequences of L + 1 tokens: the same n - 1 targets for each L
    assert {((n - 1) // length) * length for length in (64, 512, 4096)} == {n - 1}


def test_passkey_matrix_puts_depth_zero_on_top_and_sorts_lengths():
    # eval.json layout: accuracy[length][depth]; lengths and depths given out of order
    lengths, depths = [1024, 256], [1.0, 0.0, 0.5]
    accuracy = [[0.1, 0.2, 0.3],          # 1024: depth 1.0, 0.0, 0.5
                [0.4, 0.5, 0.6]]          # 256
    matrix, ls, ds = state_collapse.depth_by_length(accuracy, lengths, depths)
    assert ls == [256, 1024] and ds == [0.0, 0.5, 1.0]
    # rows: depth 0, 0.5, 1; columns: 256, 1024
    np.testing.assert_allclose(matrix, [[0.5, 0.2], [0.6, 0.3], [0.4, 0.1]])


def test_state_size_and_the_papers_forget_threshold_fit():
    assert state_collapse.state_size(2, 4, 64, 64) == 32768
    # T_forget = 5.172 S - 4.469 (K tokens, S in M): S = 1M -> 703 tokens; S = 0 -> negative
    assert state_collapse.forget_threshold(1_000_000) == pytest.approx(703.0)
    assert state_collapse.forget_threshold(32768) < 0


def test_band_is_mean_and_sample_std_over_seeds():
    b = state_collapse.band([[1.0, 2.0], [3.0, 2.0]])
    np.testing.assert_allclose(b["mean"], [2.0, 2.0])
    np.testing.assert_allclose(b["std"], [np.sqrt(2.0), 0.0])
    assert state_collapse.band([[1.0, 5.0]])["std"] == [0.0, 0.0]


def test_within_segment_averages_segments_after_the_first():
    curve = np.array([9.0, 9.0, 1.0, 2.0, 3.0, 4.0, 0.0])  # 3 segments of 2, one extra position
    np.testing.assert_allclose(hmt_segments.within_segment(curve, 2), [2.0, 3.0])
    with pytest.raises(ValueError, match="at least 2 segments"):
        hmt_segments.within_segment(curve[:3], 2)


def test_power_of_two_position_bins_and_their_means():
    assert hmt_segments.position_bins(16) == [0, 1, 2, 4, 8, 16]
    assert hmt_segments.position_bins(12) == [0, 1, 2, 4, 8, 12]
    curve = np.arange(8, dtype=float)     # value = position
    np.testing.assert_allclose(hmt_segments.bin_means(curve, [0, 1, 2, 4, 8]),
                               [0.0, 1.0, 2.5, 5.5])
    assert hmt_segments._bin_labels([0, 1, 2, 4, 8]) == ["0", "1", "2-3", "4-7"]


def test_state_collapse_runs_keep_tokens_per_step_and_mitigate_the_shortest():
    trained, mitigated = state_collapse.runs("quick")
    size = state_collapse.SIZES["quick"]
    for length, run in trained.items():
        assert run.name == f"mamba2_train{length}"
        assert f"train.batch_size = {size['tokens_per_step'] // length}" in run.bindings
        assert f"SEQ_LEN = {length}" in run.bindings
    shortest = min(trained)
    assert set(mitigated) == set(state_collapse.MITIGATIONS)
    for run in mitigated.values():
        assert run.checkpoint_from == trained[shortest] and run.name.startswith("mamba2_")
        assert "tasks.Passkey.trials = 0" in run.bindings
    assert mitigated["window"].bindings[-1] == f"ssm.SSMOptions.window = {shortest}"


def test_hmt_runs_are_the_sweep_variants_with_chunked_rows():
    runs = hmt_segments.runs("quick")
    size = hmt_segments.SIZES["quick"]
    assert [r.name for r in runs.values()] == ["hmt_segment_only", "hmt_sliding_window",
                                               "hmt_hmt"]
    for run in runs.values():
        assert f"train.seq_len = {size['segment'] * size['segments_per_row']}" in run.bindings
        assert "data.DataConfig.packing = 'chunk'" in run.bindings
    assert "memory.HMTConfig.num_memories = 0" in runs["segment_only"].bindings
    assert runs["sliding_window"].gin == ("configs/attention/sliding_window.gin",)


def _summary(level, passkey):
    out = {"positions": [1.5, 6.0, 24.0], "mean": [level + 1, level, level], "std": [0.1] * 3,
           "excess": [0.0, 0.1], "loss_by_length": {"64": [level, level], "256": [level] * 2},
           "lengths": [64, 256]}
    if passkey:
        out["passkey"] = {"accuracy": [[0.0, 1.0], [0.5, 0.0]], "lengths": [256, 512],
                          "depths": [0.0, 1.0], "prompts_per_cell": 4}
    return out


def test_state_collapse_draw_and_table_on_hand_made_data():
    data = {"seeds": [0, 1], "scale_seeds": [0, 1, 2], "state_params": 32768,
            "train_lengths": [64, 128], "shortest": 64, "lengths": [64, 256],
            "mitigation_lengths": [64, 256],
            "forget_threshold": -4300.0,
            "trained": {"64": _summary(2.0, True), "128": _summary(1.5, True)},
            "mitigations": {"none": {"label": "none", **_summary(2.0, True)},
                            "decay1.5": {"label": "decay", **_summary(2.1, False)}}}
    text = state_collapse.table(data, "quick")
    assert "| 64 | 2.000 ± 0.000 | 2.000 ± 0.000 | 0.050 ± 0.071 |" in text
    assert "Seeds used: [0, 1] of the preset's [0, 1, 2]" in text
    assert "| 128 | 0.25 | 0.50 |" in text            # passkey: mean over depths per length
    fig = state_collapse.draw(data, "quick")
    assert len(fig.axes) == 5                        # (a), (b), two heatmaps, colorbar
    assert fig.axes[2].get_images()[0].get_cmap().name == "RdYlGn"
    plt.close(fig)


def test_hmt_table_reports_most_minus_one_segment_per_seed():
    data = {"seeds": [0, 1], "scale_seeds": [0, 1], "segment": 4, "segments": [1, 4],
            "bin_edges": [0, 1, 2, 4],
            "variants": {name: {"loss": {"mean": [2.0, 1.5], "std": [0.0, 0.0]},
                                "loss_by_seed": [[2.0, 1.4], [2.0, 1.6]],
                                "inside_by_seed": [[3.0, 2.0, 1.0], [3.0, 2.0, 1.0]],
                                "inside_minus_segment_only": {"mean": [0.0] * 3,
                                                              "std": [0.0] * 3}}
                         for name in hmt_segments.VARIANTS}}
    text = hmt_segments.table(data, "quick")
    assert "| hmt | 2.000 ± 0.000 | 1.500 ± 0.141 | -0.500 ± 0.141 |" in text
    assert "| pos. 0 | pos. 1 | pos. 2-3 |" in text
    assert "Seeds used" not in text
    plt.close(hmt_segments.draw(data, "quick"))
