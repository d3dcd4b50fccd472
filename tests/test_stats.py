"""Benchmark statistics: t intervals and paired comparisons against hand-computed values."""

from __future__ import annotations

import math

import pytest

from crossmodal_kd.bench import markdown_table, summarize
from crossmodal_kd.stats import estimate, holm, paired


def test_t_interval_matches_hand_values():
    est = estimate([1.0, 2.0, 3.0])
    assert (est.n, est.mean, est.std) == (3, 2.0, 1.0)
    assert est.half_width == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)  # t(0.975, 2) = 4.302653
    single = estimate([0.5])
    assert (single.mean, single.std, single.half_width) == (0.5, 0.0, 0.0)


def test_paired_difference_and_p_value():
    cmp = paired([1.0, 2.0, 3.0, 4.0], [0.0, 2.0, 1.0, 3.0])  # differences 1, 0, 2, 1
    assert cmp.diff.mean == 1.0 and cmp.diff.std == pytest.approx(math.sqrt(2 / 3))
    # t = 1 / (0.8165 / 2) = 2.449 on 3 df: two-sided p = 0.0917; CI 1 +- 3.182446 * 0.8165 / 2
    assert cmp.p_value == pytest.approx(0.0917, abs=5e-4)
    assert cmp.diff.low == pytest.approx(1 - 3.182446 * math.sqrt(2 / 3) / 2, rel=1e-5)
    assert not cmp.separated
    assert paired([2.0, 3.0, 4.0, 5.0], [1.0, 1.9, 3.1, 3.9]).separated
    with pytest.raises(ValueError, match="matched pairs"):
        paired([1.0], [1.0, 2.0])


def test_identical_differences_get_the_exact_sign_flip_p_value_not_zero():
    """Discrete accuracies make every pair differ by the same amount at a few seeds: the t-test is undefined
    there, and two such pairs must not read as outside the noise."""
    two = paired([0.8755, 0.8850], [0.6245, 0.6340])  # both +25.10 pp, up to float rounding
    assert two.diff.constant and two.diff.low == pytest.approx(two.diff.high)
    assert two.p_value == 0.5 and not two.separated
    ten = paired([0.70] * 10, [0.65] * 10)
    assert ten.p_value == pytest.approx(2.0 ** -9) and ten.separated
    same = paired([0.6, 0.7], [0.6, 0.7])
    assert same.p_value == 1.0 and not same.separated


def test_summary_compares_each_row_with_the_reference_by_seed():
    acc = {"no KD": [0.60, 0.62, 0.61], "KD": [0.63, 0.66, 0.64], "other": [0.60, 0.63, 0.60]}
    records = [
        {"method": m, "variant": "image", "seed": s, "test_accuracy": a, "test_macro_f1": a, "val_accuracy": a,
         "train_time_s": 1.0, "samples_per_s": 10.0, "peak_memory_mb": 1.0}
        for m, values in acc.items() for s, a in enumerate(values)
    ]
    rows = {r["method"]: r for r in summarize(records, reference="no KD")}
    assert "vs_reference_diff" not in rows["no KD"]
    assert rows["KD"]["vs_reference_diff"] == pytest.approx(0.0333333, abs=1e-6)
    assert rows["KD"]["vs_reference_separated"] and not rows["other"]["vs_reference_separated"]
    table = markdown_table(list(rows.values()), reference="no KD")
    assert "| image | KD | - | 3 | 64.33 ± 1.53 |" in table and "+3.33 [" in table and "* (n=3)" in table
    assert "n.s. (n=3)" in table


def test_holm_adjustment_matches_hand_values():
    # sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 -> max(0.06, 0.04) = 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    adjusted = holm([math.nan, 0.2])
    assert math.isnan(adjusted[0]) and adjusted[1] == pytest.approx(0.2)  # NaN is no test: m = 1
    assert holm([0.6, 0.7]) == [1.0, 1.0]
    assert holm([]) == []


def test_one_nominal_difference_among_many_tests_is_not_called_outside_the_noise():
    base = [0.60, 0.60, 0.60, 0.60]
    rows_acc = {"no KD": base, "A": [0.61, 0.62, 0.63, 0.61], "B": [0.60, 0.61, 0.59, 0.60], "C": [0.61, 0.59, 0.60, 0.60]}
    records = [
        {"method": m, "variant": "image", "seed": s, "test_accuracy": a, "test_macro_f1": a, "val_accuracy": a,
         "train_time_s": 1.0, "samples_per_s": 10.0, "peak_memory_mb": 1.0}
        for m, values in rows_acc.items() for s, a in enumerate(values)
    ]
    rows = {r["method"]: r for r in summarize(records, reference="no KD")}
    a = rows["A"]
    assert a["vs_reference_p"] == pytest.approx(0.0354, abs=1e-4) and a["vs_reference_separated"]
    assert a["vs_reference_tests"] == 3 and a["vs_reference_p_holm"] == pytest.approx(3 * a["vs_reference_p"])
    assert not a["vs_reference_significant"]
    table = markdown_table(list(rows.values()), reference="no KD")
    assert "(Holm 0.106) nominal (n=4)" in table and "* (n=4)" not in table
    assert "adjusted over the 3 comparisons" in table
