"""benchmarks/stats.py: the t distribution (against closed forms and tabulated quantiles), the paired interval,
p-value and verdict (properties with hypothesis), and the per-seed budget flags."""
import math
import sys
from pathlib import Path

import pytest
from hypothesis import example, given, settings, strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks import stats  # noqa: E402

# two-sided 95% critical values of Student's t (any statistics table; scipy.stats.t.ppf(0.975, df))
T975 = {1: 12.706204736174705, 2: 4.302652729911275, 3: 3.182446305284263, 4: 2.776445105197793,
        10: 2.228138851986274, 30: 2.042272456301238}


@pytest.mark.parametrize("df,want", sorted(T975.items()))
def test_t_quantile_matches_tabulated_values(df, want):
    assert stats.t_ppf(0.975, df) == pytest.approx(want, rel=1e-8)
    assert stats.t_ppf(0.025, df) == pytest.approx(-want, rel=1e-8)


@given(st.floats(-50, 50))
@example(3.8873393463439846e-06)  # found by hypothesis in CI: 1 - x cancelled near t = 0 (2.5e-12 off)
@example(1e-300)
def test_t_cdf_matches_the_closed_forms_of_one_and_two_degrees_of_freedom(t):
    assert stats.t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)
    assert stats.t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)


def test_t_cdf_approaches_the_normal_for_many_degrees_of_freedom():
    assert stats.t_cdf(1.959963984540054, 1e7) == pytest.approx(0.975, abs=1e-6)


def test_betainc_symmetry_and_a_known_value():
    assert stats.betainc(2.0, 3.0, 0.4) == pytest.approx(0.5248, abs=1e-12)  # 1 - sum_{j<2} C(4,j) .4^j .6^(4-j)
    assert stats.betainc(2.5, 0.5, 0.3) == pytest.approx(1 - stats.betainc(0.5, 2.5, 0.7), abs=1e-12)


values = st.lists(st.floats(0, 100, allow_nan=False), min_size=2, max_size=8)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_interval_contains_the_mean_and_p_is_a_probability(data):
    di = data.draw(values)
    e2e = data.draw(st.lists(st.floats(0, 100, allow_nan=False), min_size=len(di), max_size=len(di)))
    r = stats.paired(di, e2e)
    assert r["n"] == len(di)
    assert r["lo"] <= r["mean"] + 1e-9 and r["mean"] <= r["hi"] + 1e-9
    assert 0.0 <= r["p"] <= 1.0
    assert r["verdict"] in stats.VERDICTS
    # the verdict follows the interval, and an interval that excludes 0 is a p below 0.05
    if r["lo"] > 0:
        assert r["verdict"] == "DI better" and r["p"] <= 0.05 + 1e-9
    elif r["hi"] < 0:
        assert r["verdict"] == "E2E better" and r["p"] <= 0.05 + 1e-9
    else:
        assert r["verdict"] == "no difference at 95%" and (r["sd"] == 0 or r["p"] >= 0.05 - 1e-9)
    s = stats.paired(e2e, di)  # swapping the sides mirrors the interval and keeps p
    assert s["mean"] == pytest.approx(-r["mean"], abs=1e-9)
    assert (s["lo"], s["hi"]) == pytest.approx((-r["hi"], -r["lo"]), abs=1e-9)
    assert s["p"] == pytest.approx(r["p"], abs=1e-12)
    assert {r["verdict"], s["verdict"]} in ({"no difference at 95%"}, {"DI better", "E2E better"})


def test_paired_known_example_and_the_weak_old_rule():
    # paired differences -4.1, -1.9, -1.2 (-2.4 ± 1.5, as the depth-8 cell): the old rule (|gap| > spread) said
    # "E2E better"; the 95% interval crosses 0 and p is about 0.11
    r = stats.paired([26.0, 30.0, 30.0], [30.1, 31.9, 31.2])
    assert r["mean"] == pytest.approx(-2.4)
    assert r["p"] == pytest.approx(0.11, abs=0.01)
    assert abs(r["mean"]) > r["sd"]
    assert r["verdict"] == "no difference at 95%"
    assert r["hi"] - r["lo"] == pytest.approx(2 * T975[2] * r["sd"] / math.sqrt(3), rel=1e-8)
    assert r["p"] == pytest.approx(2 * stats.t_cdf(-abs(r["mean"]) / (r["sd"] / math.sqrt(3)), 2))
    assert stats.paired([32.0, 31.0, 35.0], [24.0, 22.5, 27.0])["verdict"] == "DI better"


def test_paired_edge_cases():
    assert stats.paired([1.0], [0.0])["lo"] is None
    same = stats.paired([3.0, 3.0], [1.0, 1.0])
    assert (same["lo"], same["hi"], same["p"], same["verdict"]) == (2.0, 2.0, 0.0, "DI better")
    assert stats.paired([1.0, 2.0], [1.0, 2.0])["p"] == 1.0
    with pytest.raises(ValueError, match="not paired"):
        stats.paired([1.0, 2.0], [1.0])


def test_seed_flags_name_each_seed_that_breaks_a_premise():
    base = {"seed": 0, "meta": 25.0, "di": 30.0, "e2e": 28.0, "di_flops": 1.0, "e2e_flops": 2.0,
            "di_hours": 0.1, "e2e_hours": 0.2}
    assert stats.seed_flags(base) == []
    worse = dict(base, seed=1, di_flops=2.5, di_hours=0.3, e2e=24.0)
    assert stats.seed_flags(worse) == ["DI more FLOPs", "DI more device-h", "E2E below meta"]
    assert stats.seed_flags(dict(base, di=20.0)) == ["DI below meta"]
    assert stats.flag_summary([base, worse, dict(worse, seed=2)]) == \
        "DI more FLOPs: 1,2; DI more device-h: 1,2; E2E below meta: 1,2"
