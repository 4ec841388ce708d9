"""Deep Incubation's own ablations at the tuned point (benchmarks/ablations.py, `paper_claims.py --tune
--experiments meta,...`): each cell's DI at the default cell's DI point with its own overrides on top, paired with
the default cell's tuned E2E, and every cell's DI paired with the default's. Runs are replaced by a pipeline that
writes what a finished run leaves (top-1 from the settings): the bookkeeping alone, no training."""
from __future__ import annotations

import json

import pytest

from benchmarks import ablations, common, paper_claims as pc, stats, tuning

CHOICE = {"di": "lr 1.6e-2 wu 3", "e2e": "lr 4e-3 wu 3"}


def _run_json(out, phase: str) -> None:
    (out / phase).mkdir(exist_ok=True)
    (out / phase / "run.json").write_text(json.dumps({"phase": phase, "images_processed": 1000,
                                                      "flops": {"train_step_per_image": 1e9}}))


def _fake_pipeline(calls: list):
    def pipeline(out, method, recipe, sets, extra, timeout):
        final = dict(s.split("=", 1) for s in sets)
        seed = int(final["seed"])
        calls.append((method, out, final))
        out.mkdir(parents=True, exist_ok=True)
        summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else {}
        if method == "di":
            top1 = 30.0 + seed + {"tunable": 1.0, "random": -4.0}.get(final.get("incubate.meta_model"), 0.0) \
                + (2.0 if final.get("finetune.lr") == "8e-3" else 0.0)
            summary["deep_incubation"] = {"top1": top1, "meta_top1": 25.0, "assembled_top1": 10.0,
                                          "incubate_top1": [20.0], "device_hours": 0.01}
            for phase in ("meta", "finetune"):
                _run_json(out, phase)
            (out / "finetune" / "MANIFEST.json").write_text("{}")
        else:
            summary["e2e"] = {"top1": 28.0 + seed, "epochs": int(final["e2e.epochs"]), "device_hours": 0.01}
            _run_json(out, "e2e")
            (out / "e2e" / "MANIFEST.json").write_text("{}")
        (out / "summary.json").write_text(json.dumps(summary))
        return True
    return pipeline


@pytest.fixture
def tuned(tmp_path, monkeypatch):
    """A work directory whose default cell (the depth-8 CPU cell) has a finished search (CHOICE)."""
    calls: list = []
    monkeypatch.setattr(pc, "_pipeline", _fake_pipeline(calls))
    monkeypatch.setattr(pc, "e2e_epochs_for", lambda recipe, sets, extra: (14, {"samples_per_epoch": 3000}))
    monkeypatch.setattr(pc, "code_commit", lambda: "0123abc")
    monkeypatch.setattr(common, "RESULTS", tmp_path / "results")
    tune = tmp_path / "cpu" / "tune"
    tune.mkdir(parents=True)
    lrs = ["2e-3", "4e-3", "8e-3", "1.6e-2", "3.2e-2"]
    scores = {lb: {m: 30.0 if lb == CHOICE[m] else 20.0 for m in tuning.METHODS} for lb, _ in tuning.grid(lrs)}
    (tune / f"choice_{pc.cell_key('demo', pc.CPU_BASE)}.json").write_text(
        json.dumps(dict(CHOICE, lrs=lrs, edge=[], seed=0, scores=scores)))
    return tmp_path, calls


def _result(tmp_path, exp):
    return json.loads(next((tmp_path / "results").glob(f"paper_claims_{exp}_tuned_*.json")).read_text())


def test_a_tuned_ablation_trains_each_cells_di_at_the_default_di_point_and_pairs_with_the_default_tuned_e2e(tuned):
    tmp_path, calls = tuned
    assert pc.main(["--tune", "--experiments", "meta", "--seeds", "0,1", "--workdir", str(tmp_path)]) == 0
    di = [c for c in calls if c[0] == "di"]
    e2e = [c for c in calls if c[0] == "e2e"]
    assert len(e2e) == 2 and all(c[2]["e2e.lr"] == "4e-3" and c[2]["meta.warmup_epochs"] == "3" for c in e2e)
    assert len(di) == 6  # the default and the two ablation cells, two seeds each; E2E only for the default
    assert all(c[2]["meta.lr"] == c[2]["incubate.lr"] == "1.6e-2" and c[2]["incubate.clip_grad"] == "1.0" for c in di)
    assert sorted(c[2].get("incubate.meta_model", "fixed") for c in di) == ["fixed"] * 2 + ["random"] * 2 + \
        ["tunable"] * 2
    rec = _result(tmp_path, "meta")
    rows = {r["label"]: r for r in rec["rows"]}
    assert list(rows) == ["fixed tuned", "tunable tuned", "random tuned"]
    assert rows["fixed tuned"]["default"] and rows["fixed tuned"]["tuning"]["di"] == CHOICE["di"]
    assert rows["random tuned"]["tuned_at"] == CHOICE and "tuning" not in rows["random tuned"]
    # every cell pairs with the default cell's tuned E2E of the same seed
    assert [s["e2e"] for s in rows["random tuned"]["seeds"]] == [28.0, 29.0]
    assert rows["random tuned"]["vs_default"]["mean"] == pytest.approx(-4.0)
    assert rows["tunable tuned"]["vs_default"]["mean"] == pytest.approx(1.0) and rows["fixed tuned"]["vs_default"] is None
    header = rec["table"][0]
    assert "DI - default DI [95% CI] p" in header
    assert any(line.startswith("fixed tuned") and "default" in line for line in rec["table"][2:])
    assert rec["table"][-1].startswith("every other cell: Deep Incubation at the default cell's DI point")
    calls.clear()  # a second run finds every run finished; --collect-only rebuilds the same table
    assert pc.main(["--tune", "--experiments", "meta", "--seeds", "0,1", "--workdir", str(tmp_path)]) == 0
    assert calls == []
    assert pc.main(["--tune", "--collect-only", "--experiments", "meta", "--seeds", "0,1",
                    "--workdir", str(tmp_path)]) == 0
    assert calls == [] and _result(tmp_path, "meta")["table"] == rec["table"]


def test_the_fine_tune_rate_ablation_names_each_cells_rate_and_its_tuned_default_is_the_grid_points_rate(tuned):
    """Under --tune the default cell fine-tunes at the DI point's rate (1.6e-2 here): that label is the default row
    (the same runs), and 8e-3, the demo's rate, becomes a cell of its own."""
    tmp_path, calls = tuned
    assert pc.main(["--tune", "--experiments", "ft_lr", "--seeds", "0,1,2", "--workdir", str(tmp_path)]) == 0
    ft = sorted({c[2]["finetune.lr"] for c in calls if c[0] == "di"})
    assert ft == ["1.6e-2", "4e-3", "8e-3"] and len([c for c in calls if c[0] == "di"]) == 9
    rows = {r["label"]: r for r in _result(tmp_path, "ft_lr")["rows"]}
    assert [lb for lb, r in rows.items() if r["default"]] == ["1.6e-2 tuned"]
    assert rows["8e-3 tuned"]["vs_default"]["mean"] == pytest.approx(2.0)
    assert rows["8e-3 tuned"]["vs_default"]["lo"] == pytest.approx(2.0)  # the same +2 in every seed


def test_untuned_ablation_rows_mark_their_default_cell_and_the_committed_tables_stay_as_they_were():
    assert [ablations.is_default("demo", pc.CPU_BASE + own, pc.CPU_BASE) for _, own in ablations.ABLATIONS["ft_lr"][1]] \
        == [False, True, False]
    assert [lb for lb, own in ablations.ABLATIONS["meta"][1]
            if ablations.is_default("demo", pc.CPU_BASE + own, pc.CPU_BASE)] == ["fixed"]
    old = json.loads((common.ROOT / "benchmarks/results/paper_claims_meta_abl_cpu2_2026-12-07.json").read_text())
    table, rows = pc.summarise("meta", old["rows"])
    assert table.splitlines() == old["table"] and "vs_default" not in rows[0]  # written before the mark
    marked = [dict(r, default=r["label"] == "fixed") for r in old["rows"]]
    table, rows = pc.summarise("meta", marked)
    ref = {s["seed"]: s["di"] for s in old["rows"][0]["seeds"]}
    want = stats.paired([s["di"] for s in old["rows"][2]["seeds"]], [ref[s["seed"]] for s in old["rows"][2]["seeds"]])
    assert rows[2]["vs_default"] == want and stats.fmt_interval(want) in table.splitlines()[4]


def test_a_tuned_ablation_restores_the_default_cells_search_from_the_depth_result_whose_settings_match(tmp_path):
    """The depth experiment's depth-8 row lists `model.depth=8` twice over the base: the same final settings, so
    `--tune-from` that committed file gives the ablations their default cell's search."""
    path = tmp_path / "tune" / "choice.json"
    path.parent.mkdir(parents=True)
    src = common.ROOT / "benchmarks/results/paper_claims_depth_tuned_builtin_cpu2_2026-12-06.json"
    saved = tuning.restore(path, "demo", list(pc.CPU_BASE), tuning.METHODS, str(src))
    assert saved is not None and (saved["di"], saved["e2e"]) == ("lr 1.6e-2 wu 3", "lr 4e-3 wu 3")
    assert tuning.restore(path, "demo", pc.CPU_BASE + ["model.depth=12"], tuning.METHODS, str(src)) is None


@pytest.mark.parametrize("exp", sorted(ablations.ABLATIONS))
def test_every_ablation_cell_is_a_valid_config_at_every_grid_point_a_tuned_default_can_choose(exp):
    """A tuned point's warm-up (3 epochs) must fit every cell's phases (the reuse cells' 2 meta epochs name their
    own warm-up), so no ablation fails for its tuned point rather than for its factor."""
    from dsincubate import recipes
    from dsincubate.config import apply_overrides

    for label, _ in tuning.grid(tuning.LADDER):
        for _, own in ablations.ABLATIONS[exp][1]:
            sets = pc.CPU_BASE + tuning.grid_sets(label) + [s.replace("{e2e}", "/x/model.safetensors") for s in own]
            apply_overrides(recipes.get("demo"), sets + ["e2e.epochs=14"])  # validates every phase
