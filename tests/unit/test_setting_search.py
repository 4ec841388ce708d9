"""benchmarks/setting_search.py: a model setting searched alike for DI and E2E across tuned cells: each method takes
the value whose search scored best on the held-out split (not the seeds' validation top-1), the seeds are paired at
the two choices, unfinished cells are shown but never chosen, and cells that differ in more than the key are refused.

    pytest tests/unit/test_setting_search.py -q
"""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks import setting_search as ss  # noqa: E402

BASE = ["model.depth=32", "meta.epochs=16"]


def _cell(tmp_path, value, tune: dict, seeds: dict, partial=False, extra=()):
    """A result file with one tuned row: `tune` {method: held-out top-1 at its point}, `seeds` {method: [top-1]}."""
    over = BASE + list(extra) + ([f"model.layer_scale_init={value}"] if value is not None else [])
    scores = {f"lr {m} wu 1": {m: v} for m, v in tune.items()}
    tuning = {"scores": scores, "grid": [[k, []] for k in scores], "lrs": ["4e-3"]}
    tuning.update({"partial": True} if partial else {m: f"lr {m} wu 1" for m in tune})
    n = len(next(iter(seeds.values()))) if seeds else 0
    recs = [{"ok": True, "seed": i, "meta": 20.0, **{m: v[i] for m, v in seeds.items()}} for i in range(n)]
    f = tmp_path / f"r_{value}.json"
    f.write_text(json.dumps({"rows": [{"label": "32 tuned", "recipe": "demo", "overrides": over, "tuning": tuning,
                                       "seeds": recs}]}))
    return f


def test_each_method_takes_the_value_its_held_out_search_scored_best_and_the_seeds_pair_at_the_choices(tmp_path):
    files = [_cell(tmp_path, None, {"di": 34.0, "e2e": 21.0}, {"di": [34, 35, 33], "e2e": [19, 20, 18]}),
             # E2E's held-out best is LayerScale 1e-4; its seeds there are not the highest: the split decides
             _cell(tmp_path, "1e-4", {"di": 30.0, "e2e": 33.0}, {"di": [28, 29, 27], "e2e": [31, 30, 32]}),
             _cell(tmp_path, "1e-1", {"di": 33.0, "e2e": 25.0}, {"di": [36, 37, 35], "e2e": [33, 34, 35]})]
    cs = ss.cells(files, "model.layer_scale_init", "32 tuned", "0")
    assert [c["value"] for c in cs] == ["0", "1e-4", "1e-1"]
    table, summary = ss.summarise(cs, "model.layer_scale_init")
    assert summary["choice"]["di"]["value"] == "0" and summary["choice"]["e2e"]["value"] == "1e-4"
    assert summary["seeds"] == [0, 1, 2] and summary["paired"]["mean"] == pytest.approx(3.0)  # (34-31, 35-30, 33-32)
    assert "DI chose model.layer_scale_init=0" in table and "E2E chose model.layer_scale_init=1e-4" in table


def test_an_unfinished_search_or_a_cell_without_seeds_is_shown_but_never_chosen(tmp_path):
    files = [_cell(tmp_path, None, {"di": 30.0, "e2e": 20.0}, {"di": [30, 31], "e2e": [20, 21]}),
             _cell(tmp_path, "1e-4", {"di": 99.0, "e2e": 99.0}, {"di": [50, 50], "e2e": [50, 50]}, partial=True),
             _cell(tmp_path, "1e-6", {"di": 98.0, "e2e": 98.0}, {})]
    table, summary = ss.summarise(ss.cells(files, "model.layer_scale_init", "32 tuned", "0"), "model.layer_scale_init")
    assert {m: c["value"] for m, c in summary["choice"].items()} == {"di": "0", "e2e": "0"}
    assert "unfinished (2 of 2 points)" in table and "left out of the choice" in table and "1e-4, 1e-6" in table
    only = ss.cells(files[1:2], "model.layer_scale_init", "32 tuned", "0")
    assert ss.summarise(only, "model.layer_scale_init")[1]["paired"] is None  # nothing to choose yet


def test_cells_that_differ_in_more_than_the_key_or_repeat_a_value_are_refused_with_one_line(tmp_path, capsys):
    a = _cell(tmp_path, None, {"di": 1.0, "e2e": 1.0}, {"di": [1, 2], "e2e": [1, 2]})
    b = _cell(tmp_path, "1e-4", {"di": 1.0, "e2e": 1.0}, {"di": [1, 2], "e2e": [1, 2]}, extra=["model.depth=16"])
    for files, why in (([a, b], "differ in more than"), ([a, a], "same model.layer_scale_init")):
        assert ss.main([*map(str, files), "--key", "model.layer_scale_init", "--label", "32 tuned"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error: ") and why in err, err
    assert ss.main([str(a), "--key", "model.layer_scale_init", "--label", "8 tuned"]) == 2
    assert "no tuned row labelled '8 tuned'" in capsys.readouterr().err
