"""Paired statistics of E2E against Deep Incubation over seeds, and per-seed budget flags (issue 24 item 2).

DI and E2E of one seed share the seed of the data order and of the meta model, so each seed gives one paired
difference d = DI top-1 - E2E top-1. `paired` reports the mean difference, its 95% Student-t confidence interval
(mean ± t_{0.975, n-1} sd / sqrt(n)) and the two-sided paired t-test p-value; the verdict follows the interval:
"DI better" when it lies above 0, "E2E better" below 0, else "no difference at 95%". With 3 seeds the interval is
wide (t_{0.975, 2} = 4.30): that is the honest width, not a defect. `seed_flags` names, per seed, where DI used more
training FLOPs or more device-hours than E2E, and where either method ended below the meta model alone.

The t distribution comes from the regularized incomplete beta function (continued fraction, Numerical Recipes
6.4), so no SciPy is needed: P(T <= t) = 1 - I_{df/(df+t^2)}(df/2, 1/2) / 2 for t >= 0. The quantile inverts the
CDF by bisection. tests/unit/test_stats.py checks both against closed forms (df = 1, 2) and tabulated quantiles.

    from benchmarks.stats import paired; paired([32.1, 30.0, 34.5], [24.0, 22.8, 28.2])
"""
from __future__ import annotations

import math
import statistics

LEVEL = 0.95
VERDICTS = ("DI better", "E2E better", "no difference at 95%")


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz), Numerical Recipes' betacf."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10000):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
            last = d * c
        if abs(last - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), for a, b > 0 and 0 <= x <= 1."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x={x} outside [0, 1]")
    if x in (0.0, 1.0):
        return x
    lbt = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    # the continued fraction converges fast for x < (a + 1) / (a + b + 2); use the symmetry I_x(a,b) = 1 - I_1-x(b,a)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(lbt) * _betacf(a, b, x) / a
    return 1.0 - math.exp(lbt) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) of Student's t distribution with df > 0 degrees of freedom."""
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    t2 = t * t
    if t2 < df:
        # near 0, x = df / (df + t^2) rounds towards 1 and 1 - x cancels: take P(0 < T < |t|) from y = 1 - x directly
        centre = 0.5 * betainc(0.5, df / 2.0, t2 / (df + t2))
        return 0.5 + centre if t >= 0 else 0.5 - centre
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t2))  # P(T > |t|)
    return 1.0 - tail if t >= 0 else tail


def t_ppf(q: float, df: float) -> float:
    """The q-quantile of Student's t (0 < q < 1), by bisection on t_cdf (monotone)."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"q={q} outside (0, 1)")
    if q < 0.5:
        return -t_ppf(1.0 - q, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < q:
        hi *= 2.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        if t_cdf(mid, df) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return (lo + hi) / 2.0


def paired(di: list[float], e2e: list[float], level: float = LEVEL) -> dict:
    """Paired difference DI - E2E over seeds: n, mean, sd, the `level` t interval [lo, hi], t, the two-sided
    p-value and the verdict (None fields where n < 2 gives no interval)."""
    if len(di) != len(e2e):
        raise ValueError(f"{len(di)} DI values against {len(e2e)} E2E values: not paired")
    d = [a - b for a, b in zip(di, e2e)]
    n = len(d)
    out = {"n": n, "mean": statistics.mean(d) if d else None, "sd": None, "lo": None, "hi": None, "t": None,
           "p": None, "level": level, "verdict": "fewer than 2 seeds: no interval"}
    if n < 2:
        return out
    sd = statistics.stdev(d)
    mean = out["mean"]
    half = t_ppf(0.5 + level / 2.0, n - 1) * sd / math.sqrt(n)
    if sd == 0.0:  # every seed gave the same difference: the interval is that point
        t, p = (math.inf if mean > 0 else -math.inf if mean < 0 else 0.0), (1.0 if mean == 0 else 0.0)
    else:
        t = mean / (sd / math.sqrt(n))
        p = min(1.0, 2.0 * t_cdf(-abs(t), n - 1))
    lo, hi = mean - half, mean + half
    verdict = VERDICTS[0] if lo > 0 else VERDICTS[1] if hi < 0 else VERDICTS[2]
    return dict(out, sd=sd, lo=lo, hi=hi, t=t, p=p, verdict=verdict)


def seed_flags(record: dict) -> list[str]:
    """What one seed's record shows against the comparison's premises: DI used more training FLOPs or more
    device-hours than E2E; E2E or DI ended below the meta model alone."""
    flags = []
    g = record.get
    if None not in (g("di_flops"), g("e2e_flops")) and g("di_flops") > g("e2e_flops"):
        flags.append("DI more FLOPs")
    if None not in (g("di_hours"), g("e2e_hours")) and g("di_hours") > g("e2e_hours"):
        flags.append("DI more device-h")
    if None not in (g("meta"), g("e2e")) and g("e2e") < g("meta"):
        flags.append("E2E below meta")
    if None not in (g("meta"), g("di")) and g("di") < g("meta"):
        flags.append("DI below meta")
    return flags


def flag_summary(records: list[dict]) -> str:
    """The flags of a cell's seeds as 'flag: seeds', e.g. 'E2E below meta: 0,1,2; DI more device-h: 1'."""
    by_flag: dict[str, list[str]] = {}
    for r in records:
        for f in seed_flags(r):
            by_flag.setdefault(f, []).append(str(r.get("seed", "?")))
    return "; ".join(f"{f}: {','.join(s)}" for f, s in by_flag.items())


def fmt_interval(p: dict) -> str:
    """'+8.3 [+5.1, +11.5] p=0.008' (the mean paired difference, its interval and p), '-' without an interval."""
    if p.get("mean") is None:
        return "-"
    if p.get("lo") is None:
        return f"{p['mean']:+.1f} (n={p['n']})"
    return f"{p['mean']:+.1f} [{p['lo']:+.1f}, {p['hi']:+.1f}] p={p['p']:.3f}"


def mean_std(values: list) -> str:
    """"mean ± std" of the values that are not None (one decimal); "-" where none are."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    return f"{sum(values) / len(values):.1f} ± {(statistics.stdev(values) if len(values) > 1 else 0.0):.1f}"
