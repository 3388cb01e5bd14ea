"""The paired comparison against numbers worked out by hand."""

import math

import pytest
from scipy import stats

from diffprune.evaluation.paired import holm, methods_table, paired, per_seed_table, render, seeds_needed


def _rows(method, fids, target=0.6):
    return [{"method": method, "target_macs": target, "seed": s, "fid": f} for s, f in enumerate(fids)]


def test_paired_difference_interval_and_wins_by_hand():
    dp = [1.00, 1.10, 0.90, 1.05, 0.95]
    other = [1.10, 1.15, 1.00, 1.20, 1.00]  # differences −0.10 −0.05 −0.10 −0.15 −0.05
    rows = _rows("diff-pruning-thr0.05", dp) + _rows("taylor", other) + _rows("taylor", [9.0], target=0.35)
    (p,) = paired(rows)
    d = [-0.10, -0.05, -0.10, -0.15, -0.05]
    mean = sum(d) / 5
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 4)
    half = 2.7764451051977987 * sd / math.sqrt(5)  # t(0.975, 4)
    assert p["versus"] == "taylor" and p["seeds"] == 5 and p["wins"] == 5
    assert p["mean"] == pytest.approx(mean) and p["low"] == pytest.approx(mean - half)
    assert p["high"] == pytest.approx(mean + half) and p["verdict"] == "lower FID"
    table = {t["method"]: t for t in methods_table(rows) if t["target_macs"] == 0.6}
    assert table["taylor"]["fid"] == pytest.approx(sum(other) / 5)
    assert table["taylor"]["fid_sd"] == pytest.approx(math.sqrt(sum((x - 1.09) ** 2 for x in other) / 4))


def test_noisy_differences_are_reported_as_no_difference_and_unpaired_seeds_are_left_out():
    rows = (_rows("diff-pruning-thr0.05", [1.0, 1.2, 0.9]) + _rows("magnitude", [1.1, 1.0])  # seed 2 unfinished
            + [{"method": "magnitude", "target_macs": 0.6, "seed": 2, "error": "killed", "fid": None}])
    (p,) = paired(rows)
    assert p["seeds"] == 2 and p["wins"] == 1 and p["verdict"] == "no difference shown"
    text = render(rows)
    assert "the data show no difference over 2 paired seeds" in text


def test_one_seed_says_so():
    (p,) = paired(_rows("diff-pruning-thr0.05", [1.0]) + _rows("random", [1.3]))
    assert p["verdict"] == "too few seeds"
    text = render(_rows("diff-pruning-thr0.05", [1.0]) + _rows("random", [1.3]))
    assert "| 1 | -0.300 | – | 1/1 | – | – | too few seeds |" in text


def test_two_variants_of_diff_pruning_are_compared_once():
    rows = (_rows("diff-pruning-thr0.05", [1.0, 1.1]) + _rows("diff-pruning-thr0.05-paper", [1.2, 1.0])
            + _rows("taylor", [1.1, 1.1]))
    pairs = {(p["method"], p["versus"]) for p in paired(rows)}
    assert pairs == {("diff-pruning-thr0.05", "diff-pruning-thr0.05-paper"), ("diff-pruning-thr0.05", "taylor"),
                     ("diff-pruning-thr0.05-paper", "taylor")}


def test_seeds_needed_matches_the_textbook_paired_t_test_sample_sizes():
    # two-sided 5 %, 80 % power, paired t-test (G*Power): effect size 0.5 → 34 pairs, 1.0 → 10
    assert seeds_needed(0.05, 0.10) == 34
    assert seeds_needed(-0.10, 0.10) == 10
    assert seeds_needed(0.0, 0.10) is None  # no gap: no number of seeds finds one
    rows = _rows("diff-pruning-thr0.05", [1.0, 1.2, 0.9]) + _rows("random", [1.1, 1.1, 1.0])
    (p,) = paired(rows)  # differences −0.1, +0.1, −0.1: mean −1/30, sd 0.1155
    assert p["seeds_needed"] == seeds_needed(-0.1 / 3, math.sqrt(0.04 / 3))
    assert f"| no difference shown | {p['seeds_needed']} |" in render(rows)


def test_per_seed_table_lines_up_seeds_and_marks_missing_ones():
    rows = _rows("diff-pruning-thr0.05", [1.0, 1.2, 0.9]) + _rows("magnitude", [1.1, 1.0])
    header, _, dp, mag = per_seed_table(rows)
    assert header == "| method | MACs target | seed 0 | seed 1 | seed 2 |"
    assert dp == "| diff-pruning-thr0.05 | 0.6 | 1.000 | 1.200 | 0.900 |"
    assert mag == "| magnitude | 0.6 | 1.100 | 1.000 | – |"


def test_p_values_are_the_paired_t_test_and_holm_adjusts_them_over_the_table():
    dp = [1.00, 1.10, 0.90, 1.05, 0.95]
    rows = (_rows("diff-pruning-thr0.05", dp) + _rows("taylor", [1.10, 1.15, 1.00, 1.20, 1.00])
            + _rows("random", [1.02, 1.08, 0.95, 1.10, 0.97]))
    pairs = {p["versus"]: p for p in paired(rows)}
    for other, fids in (("taylor", [1.10, 1.15, 1.00, 1.20, 1.00]), ("random", [1.02, 1.08, 0.95, 1.10, 0.97])):
        assert pairs[other]["p"] == pytest.approx(stats.ttest_rel(dp, fids).pvalue)
    low, high = sorted((pairs["taylor"]["p"], pairs["random"]["p"]))
    assert sorted(p["p_holm"] for p in pairs.values()) == pytest.approx([2 * low, max(2 * low, high)])
    # by hand: step-down, monotone, capped at 1, untested pairs neither adjusted nor counted
    assert holm([0.01, 0.04, 0.03, math.nan, 0.005]) == pytest.approx([0.03, 0.06, 0.06, math.nan, 0.02], nan_ok=True)
    assert holm([0.6, 0.7]) == [1.0, 1.0]


def test_a_difference_that_does_not_survive_holm_is_said_so():
    dp = [1.00, 1.10, 0.90]
    rows = _rows("diff-pruning-thr0.05", dp) + _rows("taylor", [1.06, 1.15, 0.97])  # d = −.06 −.05 −.07: p ≈ 0.013
    rows += [r for i, m in enumerate(("magnitude", "random", "reinit", "x", "y"))
             for r in _rows(m, [1.0 + i / 50, 1.2, 0.8])]
    (taylor,) = [p for p in paired(rows) if p["versus"] == "taylor"]
    assert taylor["verdict"] == "lower FID" and taylor["p"] < 0.05 <= taylor["p_holm"]
    assert "not after Holm's adjustment for the table's comparisons" in render(rows)
