"""The figures package: registry and presets, the run pool's bookkeeping, and the data
functions of figures 1 and 3 against values worked out by hand (no training here; the
notebook tests run the figures end to end in the smoke preset)."""
import numpy as np
import pytest

from experiments.figures import FIGURES, common, lminfinite_nll, load, lssar_extrapolation
from experiments.figures.runs import Pool, Run


def test_unknown_figure_and_preset_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown --figure 'nope'.*lminfinite_nll"):
        load("nope")
    with pytest.raises(ValueError, match="--preset must be one of"):
        common.make(lminfinite_nll, "huge", str(tmp_path))
    assert set(FIGURES) == {"lminfinite_nll", "lminfinite_diagnosis", "lssar_extrapolation",
                            "state_collapse", "hmt_segments", "mask_sparsity"}


def test_pool_folders_seed_bindings_and_name_clash(tmp_path):
    pool = Pool(str(tmp_path), common.SCALES["quick"])
    assert pool.directory(common.LMINFINITE, 2) == str(tmp_path / "lminfinite_s2")
    variant = pool._variant(common.LMINFINITE, 2)
    assert variant["checkpoint_from"] == "softmax_rope_s2"
    assert variant["bindings"][-2:] == ["train.seed = 2", "build_model.seed = 2"]
    pool._register(common.LSSAR_P3)
    with pytest.raises(ValueError, match="two different runs are both named 'lssar_p3'"):
        pool._register(Run("lssar_p3", gin=common.LSSAR_P3.gin))


def test_log_bins_average_positions_in_log_spaced_bins():
    curve = np.arange(16, dtype=float)             # value = position
    centres, means = lminfinite_nll.log_bins(curve, num_bins=4)
    # edges geomspace(1, 16, 5) = 1, 2, 4, 8, 16: bins [1,2), [2,4), [4,8), [8,16)
    np.testing.assert_allclose(means, [1.0, 2.5, 5.5, 11.5])
    np.testing.assert_allclose(centres, np.sqrt([2, 8, 32, 128]))


def test_ratios_divide_each_seed_by_its_own_first_length():
    ratios = lssar_extrapolation.ratios({256: [2.0, 3.0], 128: [1.0, 2.0], 512: [4.0, 3.0]})
    assert list(ratios) == [128, 256, 512]
    np.testing.assert_allclose(ratios[256], [2.0, 1.5])
    np.testing.assert_allclose(ratios[512], [4.0, 1.5])


def test_mean_std_and_format():
    assert common.mean_std([1.0, 3.0]) == (2.0, pytest.approx(np.sqrt(2.0)))
    assert common.fmt([1.5]) == "1.500"
    assert common.fmt([1.0, 3.0], 2) == "2.00 ± 1.41"


def test_pool_reuses_a_finished_run_only_with_its_own_configuration(tmp_path):
    """A finished run folder is reused (no training) when its ``figure_run.json`` says the
    same configuration; a folder from another preset is a clear error, never reused."""
    import json

    quick = Pool(str(tmp_path), common.SCALES["quick"])
    folder = tmp_path / "lssa_s0"
    folder.mkdir()
    (folder / "eval.json").write_text(json.dumps({"loss": {"128": 1.5}}))
    (folder / "figure_run.json").write_text(json.dumps(quick.config(common.LSSA, 0)))
    assert quick.evaluation(common.LSSA, 0) == {"loss": {"128": 1.5}}
    smoke = Pool(str(tmp_path), common.SCALES["smoke"])
    with pytest.raises(ValueError, match="lssa_s0 holds run 'lssa' made with another"):
        smoke.ensure(common.LSSA, 0)
