"""benchmarks/tuning.py's ladders: a cell searches the ladder of the optimizer its phases train with (AdamW's or
SGD's), every point of the SGD ladder is a valid SGD config of every decoupled method's phase, a cell with two
optimizers (or one without a ladder) is refused before anything runs, and the shared search loop (`grow`) stops at
--tune-stop-after and resumes for m2mKD's students as for every other search. No training runs here.

    pytest tests/unit/test_tuning_ladders.py -q
"""
import argparse
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks import m2mkd_tuning as mt, paper_claims as pc, paper_claims_decoupled as pcd, tune_search, tuning  # noqa: E402,E501
from dsincubate import recipes  # noqa: E402
from dsincubate.config import apply_overrides  # noqa: E402
from dsincubate.errors import UserError  # noqa: E402

SGD_CELL = next(c for c in pcd.DECOUPLED_CELLS if c[0] == "resnet110_cifar_sgd")


def _args(**kw):
    return argparse.Namespace(collect_only=False, tune_data="", tune_per_class=5, tune_seed=0, timeout=60,
                              tune_extend=2, tune_from="", **kw)


def _fake_cells(monkeypatch, ladder, peak: dict, ran: list):
    """Every DI/E2E run replaced by a top-1 that falls off with the ladder distance from each method's `peak`."""
    def run_cell(out, recipe, sets, seed, extra, timeout, budget):
        lr = [s.split("=")[1] for s in sets if s.startswith("e2e.lr=")][0]
        ran.append(lr)
        return {m: 50.0 - abs(ladder.index(lr) - ladder.index(peak[m])) for m in tuning.METHODS} | {"ok": True}

    monkeypatch.setattr(pc, "run_cell", run_cell)
    monkeypatch.setattr(pc, "e2e_epochs_for", lambda recipe, sets, extra: (3, {"samples_per_epoch": 64}))
    monkeypatch.setattr(tuning, "tune_extra", lambda *a: ["--train", "t", "--val", "v"])


def test_an_sgd_cell_searches_the_sgd_ladder_from_infopros_rate_and_grows_along_it(tmp_path, monkeypatch):
    sgd = tuning.LADDERS["sgd"]
    ran: list = []
    _fake_cells(monkeypatch, sgd, {"di": "1.6", "e2e": "4e-1"}, ran)
    choice = tuning.tune_cell(tmp_path, SGD_CELL[0], SGD_CELL[2], [], _args())
    assert tuning.start(sgd) == ("2e-1", "4e-1", "8e-1")  # InfoPro's 0.1 per 128 images in the middle
    # DI's choice sat at the top twice (8e-1, then 1.6): two steps up the SGD ladder; E2E's stayed inside
    assert choice["lrs"] == ["2e-1", "4e-1", "8e-1", "1.6", "3.2"]
    assert choice["di"] == "lr 1.6 wu 1" and choice["e2e"] == "lr 4e-1 wu 1" and choice["edge"] == []
    assert sorted(set(ran), key=sgd.index) == choice["lrs"] and len(ran) == 10  # every point once, on SGD's ladder
    # the runs it keyed are SGD configs at the point's rate
    cfg = apply_overrides(recipes.get(SGD_CELL[0]), SGD_CELL[2] + tuning.grid_sets(choice["di"]))
    assert cfg.meta.optimizer == cfg.e2e.optimizer == "sgd" and cfg.meta.lr == cfg.e2e.lr == 1.6


def test_an_adamw_cell_keeps_the_adamw_ladder_and_its_first_grid():
    assert tuning.ladder_for("resnet110_cifar", pcd._RESNET) == tuning.LADDER
    assert tuning.ladder_for("demo", pc.CPU_BASE, pcd.tune_methods()) == tuning.LADDER
    assert tuning.start() == tuning.LRS == ("4e-3", "8e-3", "1.6e-2")


@pytest.mark.parametrize("label", tuning.labels(tuning.LADDERS["sgd"]))
def test_every_sgd_grid_point_is_a_valid_sgd_config_of_every_decoupled_methods_phases(label):
    methods = pcd.tune_methods()
    cfg = apply_overrides(recipes.get(SGD_CELL[0]), SGD_CELL[2] + tuning.grid_sets(label, methods))
    lr, wu = float(label.split()[1]), float(label.split()[3])
    for section in tuning.lr_sections(methods):
        tc = getattr(cfg, section)
        assert (tc.optimizer, tc.momentum, tc.lr, tc.clip_grad) == ("sgd", 0.9, lr, 1.0), section
    assert {getattr(cfg, s).warmup_epochs for s in tuning.warmup_sections(methods)} == {wu}
    # DI's fine-tune keeps the cell's own warm-up (it starts from an assembled, trained model)
    assert cfg.finetune.warmup_epochs == apply_overrides(recipes.get(SGD_CELL[0]), SGD_CELL[2]).finetune.warmup_epochs


@pytest.mark.parametrize("recipe, sets", [("demo", ["e2e.optimizer=sgd"]), ("demo", ["meta.optimizer=lamb"]),
                                          ("deit3_b16", [])])
def test_a_cell_with_two_optimizers_or_one_without_a_ladder_is_refused_before_any_run(tmp_path, monkeypatch,
                                                                                      recipe, sets):
    monkeypatch.setattr(pc, "run_cell", lambda *a, **k: pytest.fail("a grid point ran"))
    with pytest.raises(UserError, match="one optimizer with a learning-rate ladder"):
        tuning.tune_cell(tmp_path, recipe, sets, [], _args())


def test_an_unknown_grid_point_is_refused_and_every_ladders_points_resolve():
    with pytest.raises(UserError, match="unknown grid point"):
        tuning.grid_sets("lr 3e-3 wu 1")
    for ladder in tuning.LADDERS.values():
        for label in tuning.labels(ladder):
            assert f"e2e.lr={label.split()[1]}" in tuning.grid_sets(label)


def test_the_m2mkd_search_stops_at_its_time_limit_and_a_later_run_goes_on_with_the_saved_points(tmp_path,
                                                                                                 monkeypatch):
    calls = []

    def run_point(label, seed=0):
        calls.append(label)
        return {"m2mkd": 40.0 - tuning.LADDER.index(tuning.point_lr(label)), "e2e": 30.0}

    budget = iter([False, False, True])  # two points, then --tune-stop-after has passed
    monkeypatch.setattr(tune_search, "out_of_time", lambda args: next(budget))
    part = mt.search(tmp_path, ["x=1"], run_point, _args())
    assert part["partial"] and len(part["scores"]) == 2 and calls == tuning.labels(tuning.LRS)[:2]
    assert json.loads(next((tmp_path / "tune").glob("choice_m2mkd_*.json")).read_text())["partial"]
    monkeypatch.setattr(tune_search, "out_of_time", lambda args: False)
    done = mt.search(tmp_path, ["x=1"], run_point, _args())
    assert not done.get("partial") and len(calls) == len(set(calls))  # no point ran twice
    assert done["m2mkd"] == "lr 1e-3 wu 1" and done["lrs"][0] == "1e-3"  # grown down to the ladder's end


def test_a_benchmark_that_meets_bad_settings_mid_run_exits_2_with_one_line(capsys):
    from benchmarks import common

    def main():  # what paper_claims.main meets on a cell with two optimizers, before any run
        return tuning.ladder_for("demo", ["e2e.optimizer=sgd"])

    with pytest.raises(SystemExit) as e:
        common.exit_with(main)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: tuning needs one optimizer")
