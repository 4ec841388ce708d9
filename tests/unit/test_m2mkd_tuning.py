"""`m2mkd_vs_e2e.py --tune` (benchmarks/m2mkd_tuning.py): both V-MoE students get the same search; a grid point
reaches each student's own phases and never the reused meta model; the search grows where a choice sits at an end,
keeps every finished point and is restored from a committed result; the student E2E's budget is FLOPs alone.

    pytest tests/unit/test_m2mkd_tuning.py -q
"""
import json
import sys
from argparse import Namespace
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from benchmarks import m2mkd_tuning as mt, m2mkd_vs_e2e, paper_claims as pc, tuning  # noqa: E402
from dsincubate import recipes  # noqa: E402
from dsincubate.config import apply_overrides  # noqa: E402


def _args(tmp_path, **kw):
    return Namespace(collect_only=False, tune_from="", tune_extend=2, tune_seed=0, **kw)


def _keys(sets):
    return {s.split("=")[0] for s in sets}


@pytest.mark.parametrize("label", [lb for lb, _ in tuning.grid(tuning.LADDER, ("e2e",))])
def test_a_grid_point_sets_each_students_own_phases_alike_and_never_the_reused_meta_model(label):
    kd, e2e = mt.point_sets(label, "m2mkd"), mt.point_sets(label, "e2e")
    assert not any(s.startswith("meta.") for s in kd + e2e)
    assert _keys(kd) == {"m2mkd.lr", "m2mkd.clip_grad", "m2mkd_finetune.lr", "m2mkd_finetune.clip_grad",
                         "m2mkd.warmup_epochs"}  # the assembled student keeps its own half epoch of warm-up
    assert _keys(e2e) == {"e2e.lr", "e2e.clip_grad", "e2e.warmup_epochs"}
    lr, wu = label.split()[1], label.split()[3]
    values = {s.split("=")[1] for s in kd + e2e}
    assert values == {lr, wu, "1.0"}
    # every point is a valid config of the student cell (with DI's meta point and a teacher named)
    cfg = apply_overrides(recipes.get("demo"), pc.CPU_BASE + m2mkd_vs_e2e.VMOE + m2mkd_vs_e2e.KD +
                          mt.meta_sets("lr 1.6e-2 wu 3") + kd + e2e)
    assert cfg.m2mkd.lr == cfg.m2mkd_finetune.lr == cfg.e2e.lr == float(lr)


def test_the_students_meta_settings_are_the_di_points_meta_settings_only():
    sets = mt.meta_sets("lr 1.6e-2 wu 3")
    assert sorted(sets) == ["meta.clip_grad=1.0", "meta.lr=1.6e-2", "meta.warmup_epochs=3"]
    assert set(sets) <= set(tuning.grid_sets("lr 1.6e-2 wu 3"))


def _fake_scores(best: dict):
    """Top-1 that peaks at each method's `best` learning rate (warm-up 3 a point better)."""
    calls = []

    def run_point(label, seed=0):
        calls.append(label)
        lr, wu = tuning.LADDER.index(label.split()[1]), int(label.split()[3])
        return {m: 50.0 - 5 * abs(lr - tuning.LADDER.index(b)) + wu / 3 for m, b in best.items()}
    return run_point, calls


def test_the_search_grows_the_same_grid_for_both_students_while_a_choice_sits_at_an_end(tmp_path):
    run_point, calls = _fake_scores({"m2mkd": "3.2e-2", "e2e": "8e-3"})
    choice = mt.search(tmp_path, ["x=1"], run_point, _args(tmp_path))
    assert choice["m2mkd"] == "lr 3.2e-2 wu 3" and choice["e2e"] == "lr 8e-3 wu 3"
    assert choice["lrs"] == ["4e-3", "8e-3", "1.6e-2", "3.2e-2", "6.4e-2"] and choice["edge"] == []
    assert len(calls) == len(set(calls)) == 10  # every point of the grown grid once, for both students
    saved = json.loads(next((tmp_path / "tune").glob("choice_m2mkd_*.json")).read_text())
    assert saved["m2mkd"] == choice["m2mkd"] and not saved.get("partial")


def test_a_saved_search_runs_no_point_again_and_collect_only_finds_nothing_where_none_ran(tmp_path):
    run_point, calls = _fake_scores({"m2mkd": "8e-3", "e2e": "8e-3"})
    first = mt.search(tmp_path, ["x=1"], run_point, _args(tmp_path))
    assert len(calls) == 6 and first["lrs"] == list(tuning.LRS)
    again = mt.search(tmp_path, ["x=1"], run_point, _args(tmp_path))
    assert len(calls) == 6 and again["m2mkd"] == first["m2mkd"]
    fresh = _args(tmp_path)
    fresh.collect_only = True
    assert mt.search(tmp_path / "none", ["x=1"], run_point, fresh) is None


def test_a_search_restored_from_a_committed_result_runs_no_grid_point(tmp_path):
    run_point, calls = _fake_scores({"m2mkd": "1.6e-2", "e2e": "4e-3"})
    choice = mt.search(tmp_path / "a", ["x=1"], run_point, _args(tmp_path))
    n = len(calls)
    result = tmp_path / "m2mkd_vs_e2e_tuned.json"
    result.write_text(json.dumps({"rows": [], "tuning": choice}))
    args = _args(tmp_path)
    args.tune_from = str(result)
    restored = mt.search(tmp_path / "b", ["x=1"], run_point, args)
    assert len(calls) == n and restored["m2mkd"] == choice["m2mkd"] and restored["e2e"] == choice["e2e"]
    assert "m2mKD at lr 1.6e-2 wu 3, E2E at lr" in mt.describe(restored)


def test_the_tuned_students_e2e_budget_is_m2mkds_flops_alone_and_the_default_keeps_the_larger(tmp_path):
    def run(rel, flops, seconds, epochs=1, images=10):
        d = tmp_path / rel
        d.mkdir(parents=True)
        (d / "run.json").write_text(json.dumps({
            "flops": {"train_step_per_image": flops}, "images_processed": images, "epochs": epochs,
            "device_seconds": seconds, "world_size": 1, "history": [{"epoch_seconds": seconds / epochs}]}))
    from benchmarks import common
    dirs = common.train_dirs("m2mkd", 2)
    for rel in dirs[:-1]:
        run(rel, 1.0, 2000.0)  # slow distillation: many device-seconds, few FLOPs
    run(dirs[-1], 1.0, 100.0, epochs=2, images=20)  # the assembled student: 10 FLOPs, 50 s an epoch
    by_flops, plan = m2mkd_vs_e2e.e2e_epochs(tmp_path, 2, "flops")
    both, _ = m2mkd_vs_e2e.e2e_epochs(tmp_path, 2)
    assert plan["kd_flops"] == 50.0 and by_flops == 5  # 3 x 10 + 20 FLOPs at 10 an epoch
    assert both == 122  # ceil(6100 s / 50 s): the untuned comparison also matches device-seconds
