"""A model setting searched alike for DI and E2E, on top of `paper_claims.py --tune` (issue 24: "baselines tuned as
carefully as the method").

`paper_claims.py --tune` searches learning rate x warm-up for both methods in one cell. A model setting such as
LayerScale's initial value (`model.layer_scale_init`: 0 = off, 1e-1, 1e-4 ...) is a further dimension: run one tuned
cell per value (`--set model.layer_scale_init=V --name lsV`), each with both methods' whole search on the held-out
split, then this script takes, per method, the value whose best grid point scored highest on that split (never on the
validation set the tables report) and pairs the two methods' seeds at their own choices (seed by seed: DI's runs from
its cell, E2E's from its cell). The cells must differ in `--key` alone (same recipe, label and other overrides); a
cell without the key is the value `--default` (the recipe's, 0 for LayerScale). A cell whose search is unfinished
(`--tune-stop-after`) or that has no seeds is shown and left out of the choice, and the table says so.

    python benchmarks/setting_search.py --key model.layer_scale_init --label "32 tuned" \\
        benchmarks/results/paper_claims_depth_tuned_builtin_cpu2_2026-12-06.json \\
        benchmarks/results/paper_claims_depth_tuned_ls1e-4_cpu2_2026-12-07.json ...

Writes benchmarks/results/setting_search_<key>_<device>_<date>.{json,txt} (the record names its source files).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common, stats  # noqa: E402

METHODS = ("di", "e2e")
NAMES = {"di": "DI", "e2e": "E2E"}


def value_of(overrides: list[str], key: str, default: str) -> str:
    """The cell's value of `key` (the last override of it wins, as in `apply_overrides`), else `default`."""
    vals = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0] == key]
    return vals[-1] if vals else default


def cells(files: list[Path], key: str, label: str, default: str) -> list[dict]:
    """Every tuned row labelled `label` in `files`, with its value of `key`; ValueError where two rows have the same
    value or the rows differ in anything but `key`."""
    out = []
    for f in files:
        for row in json.loads(f.read_text()).get("rows", []):
            if row.get("label") == label and row.get("tuning"):
                base = (row.get("recipe"), [o for o in row.get("overrides", []) if o.split("=", 1)[0] != key])
                out.append(dict(row, value=value_of(row.get("overrides", []), key, default), base=base, file=str(f)))
    if not out:
        raise ValueError(f"no tuned row labelled {label!r} in {', '.join(map(str, files))}")
    if any(c["base"] != out[0]["base"] for c in out):
        raise ValueError(f"the rows labelled {label!r} differ in more than {key}: not one search")
    values = [c["value"] for c in out]
    if len(set(values)) != len(values):
        raise ValueError(f"two rows with the same {key} ({values}): pass one file per value")
    return out


def ready(cell: dict) -> bool:
    """A finished search and seeds: a cell that can be chosen."""
    return not cell["tuning"].get("partial") and any(s.get("ok") for s in cell["seeds"])


def tune_score(cell: dict, method: str) -> float | None:
    """`method`'s held-out top-1 at its own chosen grid point of the cell's search."""
    t = cell["tuning"]
    return None if t.get("partial") or method not in t else (t["scores"].get(t[method]) or {}).get(method)


def choose(cs: list[dict], method: str) -> dict | None:
    """The cell whose best grid point scored highest for `method` on the held-out split (ready cells only)."""
    scored = [c for c in cs if ready(c) and tune_score(c, method) is not None]
    return max(scored, key=lambda c: tune_score(c, method)) if scored else None


def _by_seed(cell: dict, method: str) -> dict[int, float]:
    return {s["seed"]: s[method] for s in cell["seeds"] if s.get("ok") and s.get(method) is not None}


def summarise(cs: list[dict], key: str) -> tuple[str, dict]:
    """The table (one line per value, then each method's choice and the paired DI - E2E at the choices)."""
    rows = []
    for c in cs:
        t = c["tuning"]
        search = f"unfinished ({len(t['scores'])} of {len(t['grid'])} points)" if t.get("partial") else "done"
        rows.append([c["value"], search] + [f"{t[m]}: {tune_score(c, m)}" if tune_score(c, m) is not None else "-"
                                            for m in METHODS] +
                    [stats.mean_std(list(_by_seed(c, m).values())) for m in METHODS] +
                    [len(_by_seed(c, "di")), stats.mean_std([s.get("meta") for s in c["seeds"] if s.get("ok")])])
    table = common.table([key, "search", "DI point: tune top-1", "E2E point: tune top-1", "DI top-1", "E2E top-1",
                          "seeds", "meta alone"], rows)
    chosen = {m: choose(cs, m) for m in METHODS}
    summary = {"choice": {m: c and {"value": c["value"], "point": c["tuning"][m], "file": c["file"]}
                          for m, c in chosen.items()}}
    if None in chosen.values():
        table += "\nno choice yet: a method has no cell with a finished search and seeds"
        return table, dict(summary, paired=None)
    di, e2e = _by_seed(chosen["di"], "di"), _by_seed(chosen["e2e"], "e2e")
    seeds = sorted(set(di) & set(e2e))
    paired = stats.paired([di[s] for s in seeds], [e2e[s] for s in seeds])
    choices = "; ".join(f"{NAMES[m]} chose {key}={c['value']} at {c['tuning'][m]}" for m, c in chosen.items())
    table += f"\n{choices} (best held-out top-1 of every finished search)\nDI - E2E at their choices, seeds " \
        f"{','.join(map(str, seeds))}: {stats.fmt_interval(paired)}: {paired['verdict']}"
    left = [c["value"] for c in cs if not ready(c)]
    if left:
        table += f"\nleft out of the choice (search unfinished or no seeds): {key}={', '.join(left)}"
    return table, dict(summary, paired=paired, seeds=seeds)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", type=Path, help="tuned paper_claims result .json files, one value each")
    p.add_argument("--key", required=True, help="the searched setting, e.g. model.layer_scale_init")
    p.add_argument("--label", required=True, help="the row label of the cell in every file, e.g. '32 tuned'")
    p.add_argument("--default", default="0", help="the value of a cell without the key (default 0)")
    args = p.parse_args(argv)
    try:
        cs = cells(args.files, args.key, args.label, args.default)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    table, summary = summarise(cs, args.key)
    name = f"setting_search_{args.key.replace('.', '_')}"
    record = dict(common.header(name), key=args.key, label=args.label, files=[str(f) for f in args.files],
                  values=[c["value"] for c in cs], **summary)
    path = common.write_result(name, record, table)
    print(f"{table}\n-> {path} (+ .txt)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
