import numpy as np
import pytest

from diffprune.pipeline.stage_params import RegisterParams
from diffprune.tracking.promotion import GateResult, gate, version_tags

PARAMS = RegisterParams(max_fid_ratio=1.3, max_macs_ratio=0.6, champion_margin=0.05)
GOOD = {"fid_ratio": 1.1, "macs_ratio": 0.5}


def test_good_candidate_without_champion_passes_every_check():
    result = gate(GOOD, None, PARAMS)
    assert result == GateResult(True, result.reasons)
    assert len(result.reasons) == 3
    assert all(r.startswith("pass") for r in result.reasons)
    assert "no champion" in result.reasons[2]


@pytest.mark.parametrize(("candidate", "failing"), [
    ({"fid_ratio": 1.31, "macs_ratio": 0.5}, "fid_ratio 1.31 > max_fid_ratio 1.3"),
    ({"fid_ratio": 1.1, "macs_ratio": 0.61}, "macs_ratio 0.61 > max_macs_ratio 0.6"),
])
def test_each_bound_refuses_on_its_own(candidate, failing):
    result = gate(candidate, None, PARAMS)
    assert not result.passed
    assert [r for r in result.reasons if r.startswith("fail")] == [f"fail: {failing}"]


def test_bounds_are_inclusive():
    assert gate({"fid_ratio": 1.3, "macs_ratio": 0.6}, None, PARAMS).passed


def test_champion_comparison_uses_the_margin():
    champion = {"fid_ratio": "1.0", "macs_ratio": "0.5"}  # registry tags are strings
    assert gate({"fid_ratio": 1.05, "macs_ratio": 0.5}, champion, PARAMS).passed
    refused = gate({"fid_ratio": 1.06, "macs_ratio": 0.5}, champion, PARAMS)
    assert not refused.passed
    assert refused.reasons[2] == "fail: fid_ratio 1.06 > champion's 1 × (1 + 0.05) = 1.05"


@pytest.mark.parametrize("candidate", [{}, {"fid_ratio": None, "macs_ratio": None}, {"fid_ratio": "n/a",
                                                                                      "macs_ratio": float("nan")}])
def test_missing_candidate_values_fail_with_reasons(candidate):
    result = gate(candidate, {"fid_ratio": "1.0"}, PARAMS)
    assert not result.passed
    assert result.reasons[0] == "fail: candidate fid_ratio is missing or not a number"
    assert result.reasons[1] == "fail: candidate macs_ratio is missing or not a number"
    assert "cannot compare with the champion" in result.reasons[2]


def test_champion_without_fid_ratio_refuses():
    result = gate(GOOD, {"macs_ratio": "0.5"}, PARAMS)
    assert not result.passed
    assert result.reasons[2] == "fail: champion fid_ratio is missing or not a number; cannot compare"


def test_version_tags_are_strings_and_skip_none():
    tags = version_tags({
        "criterion": "diff-pruning", "thr": 0.05, "pruning_ratio": None, "macs": 32_251_904,
        "fid": 1.23456789, "fid_ratio": np.float32(1.5), "teacher_fid": 1e-7, "n_samples": np.int64(359),
        "teacher": "builtin", "unrelated": "left out",
    })
    assert tags == {
        "criterion": "diff-pruning", "thr": "0.05", "macs": "32251904", "fid": "1.23457", "fid_ratio": "1.5",
        "teacher_fid": "1e-07", "n_samples": "359", "teacher": "builtin",
    }
