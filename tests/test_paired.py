"""The paired comparison against numbers worked out by hand."""

import math

import pytest

from diffprune.paired import methods_table, paired, per_seed_table, render, seeds_needed


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
    assert "| 1 | -0.300 | – | 1/1 | too few seeds |" in text


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
