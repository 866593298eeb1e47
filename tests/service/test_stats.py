"""service/stats.py against hand-computed values."""

from __future__ import annotations

import math

import pytest

from service import stats


def test_mean_se_is_the_textbook_standard_error():
    values = [1.0, 2.0, 3.0, 4.0]
    mean, se = stats.mean_se(values)
    sd = math.sqrt(sum((v - 2.5) ** 2 for v in values) / 3)  # sample sd, n - 1
    assert mean == 2.5 and se == pytest.approx(sd / 2)
    assert stats.mean_se([7.0]) == (7.0, None)
    with pytest.raises(ValueError):
        stats.mean_se([])


def test_a_two_valued_reward_has_the_se_of_a_proportion():
    """The reference world's reward per prompt is nearly two-valued: a share p of +a and
    1 - p of -b has sd |a + b| sqrt(p (1 - p)) (times sqrt(n / (n - 1)) for the sample sd)."""
    n, p = 100, 0.3
    values = [3.4] * int(n * p) + [-4.0] * int(n * (1 - p))
    _, se = stats.mean_se(values)
    assert se == pytest.approx(7.4 * math.sqrt(p * (1 - p)) * math.sqrt(n / (n - 1)) / 10)


def test_identical_records_give_a_zero_width_interval():
    a = [0.5, -1.0, 2.0, 3.0]
    iv = stats.paired_interval(a, list(a))
    assert (iv.mean, iv.lo, iv.hi, iv.se, iv.n) == (0.0, 0.0, 0.0, 0.0, 4)
    assert not iv.excludes_zero
    shifted = stats.paired_interval([x + 1 for x in a], a)  # a constant shift: no spread
    assert shifted.to_list() == [pytest.approx(1.0), pytest.approx(1.0)] and shifted.excludes_zero


def test_paired_interval_is_the_student_t_interval_of_the_differences():
    a, b = [1.0, 2.0, 4.0, 3.0, 5.0], [0.5, 2.5, 2.0, 3.0, 3.0]
    d = [x - y for x, y in zip(a, b)]  # 0.5, -0.5, 2, 0, 2
    mean = sum(d) / 5
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / 4 / 5)
    iv = stats.paired_interval(a, b)
    t = 2.7764451051977987  # t(0.975, 4)
    assert iv.mean == pytest.approx(0.8) and iv.se == pytest.approx(se)
    assert iv.to_list() == pytest.approx([0.8 - t * se, 0.8 + t * se])
    # the unpaired SE would be larger: what is common to a record cancels when paired
    assert iv.se < math.hypot(stats.mean_se(a)[1], stats.mean_se(b)[1])
    with pytest.raises(ValueError, match="same records"):
        stats.paired_interval(a, b[:3])


def test_ratio_influence_gives_the_delta_method_se_of_a_ratio_of_sums():
    totals, counts = [1.0, 0.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]
    ratio, infl = stats.ratio_influence(totals, counts)
    assert ratio == 0.75 and sum(infl) == pytest.approx(0.0)
    # with unit counts the influence is the centred value: the SE is the mean's
    assert stats.se_of(infl) == pytest.approx(stats.mean_se(totals)[1])
    ratio, infl = stats.ratio_influence([2.0, 6.0], [1.0, 3.0])  # NLL over tokens
    assert ratio == 2.0 and infl == pytest.approx([0.0, 0.0])  # both texts at 2 per token


def test_combine_weights_independent_figures():
    value, se = stats.combine([(1.0, 0.1, 0.03), (3.0, 0.2, 0.04)])
    assert value == pytest.approx((0.1 + 0.6) / 4)
    assert se == pytest.approx(math.sqrt((0.25 * 0.03) ** 2 + (0.75 * 0.04) ** 2))
    assert stats.combine([(1.0, 0.1, None), (1.0, 0.2, 0.01)])[1] is None


def test_upper_bound_is_one_sided():
    assert stats.upper_bound(0.08, 0.01, 0.95) == pytest.approx(0.08 + 1.6448536 * 0.01)
    assert stats.upper_bound(0.08, None, 0.95) == 0.08
    assert stats.upper_bound(0.08, 0.01, None) == 0.08
    assert stats.lower_bound_of(0.08, 0.01, 0.95) == pytest.approx(0.08 - 1.6448536 * 0.01)
    assert stats.lower_bound_of(0.08, None, 0.95) == 0.08
