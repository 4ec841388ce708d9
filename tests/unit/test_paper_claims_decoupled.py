"""benchmarks/paper_claims_decoupled.py: the decoupled baselines' FLOP budgets (each at least Deep Incubation's,
within one epoch), the budget-split cells (the same total, the shares moved), and the tables built from the per-seed
records of finished run directories (paired DI - baseline per seed). FLOPs are counted on the meta device; no
training runs here."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks import decoupled_tuning, paper_claims as pc, paper_claims_decoupled as pcd, tune_search  # noqa: E402


def test_each_decoupled_baseline_gets_at_least_di_planned_flops_within_one_epoch(tmp_path):
    extra = ["--set", f"data.demo_root={tmp_path / 'demo'}"]
    epochs, plan = pcd.baseline_epochs("debug", ["model.kernel_backend=torch"], extra)
    assert set(epochs) == {"e2e", "dgl", "infopro"}
    for m, n in epochs.items():
        per_epoch = plan[f"{m}_per_epoch"]
        assert n * per_epoch >= plan["di_total"] > (n - 1) * per_epoch, m
    # the auxiliary classifiers cost FLOPs, InfoPro's decoders more: counted, not assumed equal to E2E's
    assert plan["infopro_per_epoch"] > plan["dgl_per_epoch"] > plan["e2e_per_epoch"]


def test_split_cells_keep_the_default_total_and_move_the_shares(tmp_path):
    extra = ["--set", f"data.demo_root={tmp_path / 'demo'}"]
    base = ["model.kernel_backend=torch", "meta.epochs=8", "incubate.epochs=4", "finetune.epochs=4"]
    default, per_epoch = pcd.split_plan("debug", base, extra)
    assert pcd.split_sets(default, per_epoch, None) == ([], default)
    ft_shares = []
    for label, shares in pcd.SPLITS[1:]:
        own, plan = pcd.split_sets(default, per_epoch, shares)
        assert [s.split("=")[0] for s in own] == ["meta.epochs", "incubate.epochs", "finetune.epochs"]
        # whole epochs: each phase within half an epoch of its share of the default total
        for p, share, s in zip(("meta", "incubate", "finetune"), shares, own):
            assert abs(plan[p] - share * default["di_total"]) <= per_epoch[p] / 2 + 1e-6 * plan[p], (label, p)
        ft_shares.append(plan["finetune"] / plan["di_total"])
    # the plan by arithmetic is the one the cell's own settings give
    assert pc.e2e_epochs_for("debug", base + own, extra)[1]["di_total"] == pytest.approx(plan["di_total"])
    assert ft_shares == sorted(ft_shares) and ft_shares[-1] > 0.5 > ft_shares[0]


def _run(d: Path, top1: float, epochs: int, images: int, flops: float = 1e6, seconds: float = 36.0) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "run.json").write_text(json.dumps({"final": {"top1": top1}, "device_seconds": seconds, "epochs": epochs,
                                            "images_processed": images,
                                            "flops": {"train_step_per_image": flops}}))


def _seed_dir(root: Path, di: float, e2e: float, dgl: float, infopro: float) -> Path:
    for rel in ["meta", "finetune"] + [f"incubate/module_{i}" for i in range(4)]:
        _run(root / rel, 0.0, 1, 100)
    for m, v in (("e2e", e2e), ("dgl", dgl), ("infopro", infopro)):
        _run(root / m, v, 3, 300)
    (root / "summary.json").write_text(json.dumps({"deep_incubation": {
        "top1": di, "meta_top1": 20.0, "assembled_top1": 11.0, "device_hours": 0.06}}))
    return root


def test_decoupled_table_pairs_di_with_each_baseline_seed_by_seed(tmp_path):
    values = [(30.0, 25.0, 20.0, 21.0), (32.0, 26.0, 22.0, 20.0), (35.0, 27.5, 21.0, 25.0)]
    seeds = [pcd.collect_decoupled(_seed_dir(tmp_path / f"seed{i}", *v), i, {"e2e": 3}, {"di_total": 1.0})
             for i, v in enumerate(values)]
    assert seeds[0]["di_flops"] == 6 * 100 * 1e6 and seeds[0]["e2e_flops"] == 300 * 1e6
    assert seeds[0]["dgl_epochs"] == 3 and seeds[0]["infopro_hours"] == pytest.approx(0.01)
    failed = {"ok": False, "seed": 3, "error": "dgl failed, see log_dgl.txt"}
    table, rows = pcd.summarise("decoupled", [{"label": "DeiT-T-32", "seeds": seeds + [failed]}])
    paired = rows[0]["paired"]
    assert rows[0]["n_seeds"] == 3
    for k, m in enumerate(("e2e", "dgl", "infopro"), start=1):
        assert paired[m]["n"] == 3
        assert paired[m]["mean"] == pytest.approx(sum(v[0] - v[k] for v in values) / 3)
        assert paired[m]["lo"] < paired[m]["mean"] < paired[m]["hi"]
    assert "DeiT-T-32 seed 3: FAILED (dgl failed" in table
    assert "DeiT-T-32 seed 1: DI 32.0, E2E 26.0, DGL 22.0, InfoPro 20.0" in table
    # paper_claims' summarise (the one --from uses) gives the same table for a decoupled result
    assert pc.summarise("decoupled", [{"label": "DeiT-T-32", "seeds": seeds}])[0] == \
        pcd.summarise("decoupled", [{"label": "DeiT-T-32", "seeds": seeds}])[0]
    assert pcd.collect_decoupled(tmp_path / "nothing", 0, {}, {}) is None  # unfinished: not a record


def test_decoupled_collect_only_shows_the_baselines_that_finished(tmp_path):
    d = _seed_dir(tmp_path / "seed0", 30.0, 25.0, 20.0, 21.0)
    (d / "infopro" / "run.json").unlink()  # InfoPro still training
    assert pcd.collect_decoupled(d, 0, {}, {}) is None  # a run's own record waits for every method
    rec = pcd.collect_decoupled(d, 0, {}, {}, partial=True)
    assert rec["unfinished"] == ["infopro"] and rec["infopro"] is None and rec["dgl"] == 20.0
    full = pcd.collect_decoupled(_seed_dir(tmp_path / "seed1", 31.0, 24.0, 22.0, 23.0), 1, {}, {}, partial=True)
    table, rows = pcd.summarise("decoupled", [{"label": "c", "seeds": [rec, full]}])
    assert rows[0]["paired"]["dgl"]["n"] == 2 and rows[0]["paired"]["infopro"]["n"] == 1
    assert "c seed 0: DI 30.0, E2E 25.0, DGL 20.0 (meta 20.0)" in table and "unfinished: InfoPro" in table


def test_split_table_pairs_each_split_with_the_default_split_of_the_same_seed(tmp_path):
    def row(label, di):
        return {"label": label, "planned": {"di_total": 3e12, "finetune": 1e12},
                "epochs": {} if label == "default" else {"meta": "9", "incubate": "3", "finetune": "14"},
                "seeds": [{"ok": True, "seed": s, "meta": 20.0, "assembled": 10.0, "di": v} for s, v in enumerate(di)]}

    table, rows = pcd.summarise("split", [row("default", [30.0, 31.0, 35.0]), row("ft heavy", [33.0, 35.0, 36.0])])
    assert rows[1]["paired"]["mean"] == pytest.approx(8.0 / 3)
    assert "9/3/14" in table and "=/=/=" in table
    if pcd.plot_split(rows, tmp_path / "split.png"):  # accuracy against the fine-tune share, where matplotlib is
        assert (tmp_path / "split.png").stat().st_size > 1000


def test_unknown_experiment_is_refused_naming_the_decoupled_ones(capsys):
    assert pc.main(["--experiments", "tab2", "--workdir", "/nonexistent"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "decoupled" in err and "split" in err


def test_default_tuning_grid_strings_are_unchanged_by_the_decoupled_methods():
    """The depth/data cells' grid points (their strings are in the tuning runs' directory keys) stay DI's and E2E's
    sections only: finished runs are found again."""
    from benchmarks import tuning

    assert tuning.grid_sets("lr 8e-3 wu 1") == [
        "meta.clip_grad=1.0", "incubate.clip_grad=1.0", "finetune.clip_grad=1.0", "e2e.clip_grad=1.0",
        "meta.lr=8e-3", "incubate.lr=8e-3", "finetune.lr=8e-3", "e2e.lr=8e-3",
        "meta.warmup_epochs=1", "incubate.warmup_epochs=1", "e2e.warmup_epochs=1"]
    every = tuning.grid_sets("lr 8e-3 wu 1", pcd.tune_methods())
    assert set(tuning.grid_sets("lr 8e-3 wu 1")) < set(every)
    for m in pcd.BASELINES:  # every baseline's phase gets the point's rate, warm-up and clipping, like E2E's
        sec = pcd.registry.phase(pcd._phase(m)).config_section
        assert {f"{sec}.lr=8e-3", f"{sec}.warmup_epochs=1", f"{sec}.clip_grad=1.0"} <= set(every), m


def _fake_pipeline(calls: list, top1):
    """pc._pipeline writing what a finished run leaves (nothing trained): DI's summary and phase records, or the
    baseline's run record, its top-1 `top1(method, lr)`."""
    def pipeline(out, method, recipe, sets, extra, timeout):
        sec = "meta" if method == "di" else pcd.registry.phase(pcd._phase(method)).config_section
        lr = [s for s in sets if s.startswith(f"{sec}.lr=")][0].split("=")[1]
        calls.append((method, lr, out))
        if method == "di":
            _seed_dir(out, top1(method, lr), 0, 0, 0)
            for m in pcd.BASELINES:
                (out / m / "run.json").unlink()
        else:
            _run(out / pcd._run_json(Path(""), method).parent.name, top1(method, lr), 3, 300)
        (out / ("finetune" if method == "di" else pcd._run_json(Path(""), method).parent.name)
         / "MANIFEST.json").write_text("{}")
        return True
    return pipeline


def _tune_decoupled(tmp_path, monkeypatch, peak: dict, ran: list, jobs: int = 1, tune_from: str = "",
                    baselines: tuple = pcd.BASELINES):
    """decoupled_tuning.tune_decoupled with every run replaced by a record whose top-1 falls off with the distance
    (ladder steps) from that method's `peak`: the search alone."""
    import argparse

    from benchmarks import tuning

    def top1(m, lr):
        return 50.0 - abs(tuning.LADDER.index(lr) - tuning.LADDER.index(peak[m]))

    monkeypatch.setattr(pc, "_pipeline", _fake_pipeline(ran, top1))
    monkeypatch.setattr(pcd, "baseline_epochs", lambda recipe, sets, extra: ({m: 3 for m in pcd.BASELINES}, {}))
    monkeypatch.setattr(pc, "e2e_epochs_for", lambda recipe, sets, extra: (3, {"samples_per_epoch": 64}))
    monkeypatch.setattr(tuning, "tune_extra", lambda *a: ["--train", "t", "--val", "v"])
    args = argparse.Namespace(collect_only=False, tune_data="", tune_per_class=5, tune_seed=0, timeout=60,
                              tune_extend=2, jobs=jobs, tune_from=tune_from, baselines=baselines)
    return decoupled_tuning.tune_decoupled(tmp_path, "demo", ["model.depth=32"], [], args)


@pytest.mark.parametrize("jobs", [1, 3])
def test_decoupled_tuning_runs_one_grid_for_all_methods_and_each_takes_its_own_best(tmp_path, monkeypatch, jobs):
    from benchmarks import tuning

    ran: list = []
    peak = {"di": "8e-3", "e2e": "4e-3", "dgl": "1.6e-2", "infopro": "8e-3"}
    choice = _tune_decoupled(tmp_path, monkeypatch, peak, ran, jobs)
    assert choice["lrs"] == ["2e-3", "4e-3", "8e-3", "1.6e-2", "3.2e-2"]  # grown both ways: E2E low, DGL high
    assert {m: choice[m].split()[1] for m in peak} == peak and choice["edge"] == []
    assert len(ran) == 10 * 4 and len({(m, lr, o) for m, lr, o in ran}) == 40  # every method at every point once
    dirs: dict = {}
    for m, lr, o in ran:
        dirs.setdefault(o, set()).add(m)
    assert sorted(map(sorted, dirs.values())) == sorted([["di", "e2e"]] * 10 + [["dgl"]] * 10 + [["infopro"]] * 10)
    # DI and E2E run in the directory the depth experiment's tuning of the same cell uses: its runs are found again
    per = ["data.samples_per_epoch=64"]
    assert {o for o, ms in dirs.items() if "di" in ms} == {
        tmp_path / "tune" / pc.cell_key("demo", ["model.depth=32"] + tuning.grid_sets(label) + per) / "seed0"
        for label in choice["scores"]}
    assert all(set(s) >= set(peak) for s in choice["scores"].values())  # every method scored at every point
    assert next((tmp_path / "tune").glob("choice_*.json")).name.startswith("choice_decoupled_")
    ran.clear()
    assert _tune_decoupled(tmp_path, monkeypatch, peak, ran)["dgl"] == choice["dgl"] and ran == []  # saved


@pytest.mark.parametrize("jobs", [1, 2])
def test_tuned_decoupled_seed_runs_each_method_at_its_own_point_and_pairs_them(tmp_path, monkeypatch, jobs):
    import argparse

    from benchmarks import tuning

    calls, bonus = [], {"4e-3": 1.0, "8e-3": 2.0, "1.6e-2": 3.0}
    base = {"di": 30.0, "e2e": 20.0, "dgl": 20.0, "infopro": 20.0}
    monkeypatch.setattr(pc, "_pipeline", _fake_pipeline(calls, lambda m, lr: base[m] + bonus[lr]))
    monkeypatch.setattr(pcd, "baseline_epochs", lambda recipe, sets, extra: ({m: 3 for m in pcd.BASELINES}, {}))
    choice = {"di": "lr 8e-3 wu 3", "e2e": "lr 4e-3 wu 3", "dgl": "lr 8e-3 wu 3", "infopro": "lr 1.6e-2 wu 1"}
    args = argparse.Namespace(collect_only=False, timeout=60, jobs=jobs)
    rec = decoupled_tuning.run_tuned_decoupled_seed(tmp_path, "demo", ["model.depth=32"], choice, 0, [], args)
    assert sorted((m, lr) for m, lr, _ in calls) == [("dgl", "8e-3"), ("di", "8e-3"), ("e2e", "4e-3"),
                                                     ("infopro", "1.6e-2")]
    out = {m: o for m, _, o in calls}
    assert [m for m, _, _ in calls if m in ("di", "e2e")] == ["di", "e2e"]  # the pair in order
    assert len(set(out.values())) == 4  # DGL chose DI's point, yet runs in a directory of its own settings
    # DI's and E2E's seed runs are the depth experiment's tuned ones of the same cell (tuning.run_tuned_seed)
    assert out["di"] == tmp_path / pc.cell_key("demo", ["model.depth=32"] + tuning.grid_sets(choice["di"])) / "seed0"
    assert out["e2e"] == tmp_path / pc.cell_key("demo", ["model.depth=32"] + tuning.grid_sets(choice["e2e"])) / "seed0"
    assert rec["ok"] and rec["di"] == 32.0 and rec["e2e"] == 21.0 and rec["dgl"] == 22.0 and rec["infopro"] == 23.0
    assert rec["settings"] == choice
    tuned = dict(choice, lrs=["4e-3", "8e-3", "1.6e-2"], seed=0, edge=["infopro"])
    table, _ = pcd.summarise("decoupled", [{"label": "DeiT-T-32 tuned", "tuning": tuned, "seeds": [rec]}])
    assert "DeiT-T-32 tuned: DI at lr 8e-3 wu 3, E2E at lr 4e-3 wu 3, DGL at lr 8e-3 wu 3, InfoPro at lr 1.6e-2 " \
        "wu 1 (lr 4e-3 to 1.6e-2 searched, held-out split, seed 0; at an end: InfoPro)" in table
    calls.clear()
    args.collect_only = True
    assert decoupled_tuning.run_tuned_decoupled_seed(tmp_path, "demo", ["model.depth=32"], choice, 0, [], args)["di"] == 32.0
    assert calls == []


def test_a_search_restored_from_a_committed_result_runs_no_grid_point_in_a_fresh_work_directory(tmp_path, monkeypatch):
    import json

    ran: list = []
    peak = {"di": "8e-3", "e2e": "4e-3", "dgl": "1.6e-2", "infopro": "8e-3"}
    choice = _tune_decoupled(tmp_path / "a", monkeypatch, peak, ran)
    result, other = tmp_path / "result.json", tmp_path / "other.json"
    row = {"label": "DeiT-T-32 tuned", "recipe": "demo", "overrides": ["model.depth=32"], "tuning": choice}
    result.write_text(json.dumps({"rows": [dict(row, recipe="resnet110_cifar"), row]}))
    other.write_text(json.dumps({"rows": [dict(row, overrides=["model.depth=16"])]}))
    ran.clear()
    again = _tune_decoupled(tmp_path / "b", monkeypatch, peak, ran, tune_from=f"{other},{result}")
    assert ran == [] and {m: again[m] for m in peak} == {m: choice[m] for m in peak}  # the seeds only are left
    assert again["scores"] == choice["scores"] and "tune_args" not in again  # the source machine's paths dropped
    assert next((tmp_path / "b" / "tune").glob("choice_decoupled_*.json")).is_file()  # saved where a run looks
    assert _tune_decoupled(tmp_path / "c", monkeypatch, peak, ran, tune_from=str(other)) and len(ran) == 40  # no row


def test_an_unreadable_tune_from_file_is_one_error_line_before_anything_runs(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{\"no\": \"rows\"}")
    for f in (tmp_path / "missing.json", bad):
        assert pc.main(["--tune", "--experiments", "depth", "--tune-from", str(f), "--workdir", str(tmp_path / "w")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith(f"error: --tune-from {f}"), err
    assert not (tmp_path / "w").exists()


def test_tune_is_refused_for_the_split_experiment(capsys):
    assert pc.main(["--tune", "--experiments", "split", "--workdir", "/nonexistent"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "split" in err


def test_a_search_stopped_by_its_time_limit_is_saved_partial_and_a_later_tune_from_finishes_it_as_one_search(
        tmp_path, monkeypatch):
    from benchmarks import tuning

    peak = {"di": "8e-3", "e2e": "4e-3", "dgl": "1.6e-2", "infopro": "8e-3"}
    ran: list = []
    whole = _tune_decoupled(tmp_path / "whole", monkeypatch, peak, ran)
    n = len(ran)
    ran.clear()
    limit = iter([False, False] + [True] * 1000)  # two grid points start, then the time is up
    monkeypatch.setattr(tune_search, "out_of_time", lambda args: next(limit))
    part = _tune_decoupled(tmp_path / "a", monkeypatch, peak, ran)
    assert part["partial"] and len(part["scores"]) == 2 and len(ran) == 2 * 4 and not set(peak) & set(part)
    assert all("git_commit" in s for s in part["scores"].values())  # each point says what code scored it
    saved = json.loads(next((tmp_path / "a" / "tune").glob("choice_decoupled_*.json")).read_text())
    assert saved["partial"] and saved["scores"] == part["scores"]
    table, _ = pcd.summarise("decoupled", [{"label": "DeiT-T-32 tuned", "tuning": part, "seeds": []}])
    assert "DeiT-T-32 tuned: search unfinished (2 of 6 grid points scored" in table
    result = tmp_path / "result.json"  # the committed result of the stopped run, read on a fresh machine
    result.write_text(json.dumps({"rows": [{"label": "DeiT-T-32 tuned", "recipe": "demo",
                                            "overrides": ["model.depth=32"], "tuning": part, "seeds": []}]}))
    monkeypatch.setattr(tune_search, "out_of_time", lambda args: False)
    ran.clear()
    done = _tune_decoupled(tmp_path / "b", monkeypatch, peak, ran, tune_from=str(result))
    assert len(ran) == n - 2 * 4 and not done.get("partial")  # only the points the stopped search had not scored
    assert {m: done[m] for m in peak} == {m: whole[m] for m in peak} and done["lrs"] == whole["lrs"]


def test_tune_stop_after_counts_minutes_from_the_first_check_and_zero_never_stops():
    import argparse
    import time

    from benchmarks import tune_search as tuning

    assert not tuning.out_of_time(argparse.Namespace(tune_stop_after=0.0))
    args = argparse.Namespace(tune_stop_after=1.0)
    assert not tuning.out_of_time(args) and args.tune_started <= time.monotonic()  # the clock starts here
    args.tune_started -= 59
    assert not tuning.out_of_time(args)
    args.tune_started -= 2
    assert tuning.out_of_time(args)


def test_a_cell_whose_search_is_unfinished_runs_no_seed(tmp_path, monkeypatch):
    import argparse

    from benchmarks import tuning

    part = {"partial": True, "scores": {}, "grid": [], "lrs": ["4e-3"], "seed": 0}
    monkeypatch.setattr(tuning, "tune_cell", lambda *a, **k: part)
    monkeypatch.setattr(tuning, "run_tuned_seed", lambda *a, **k: pytest.fail("a seed ran"))
    row = pc.tuned_row(tmp_path, "demo", "8", ["model.depth=8"], [], argparse.Namespace(seeds="0,1"))
    assert row["seeds"] == [] and row["tuning"] is part
    table, _ = pc.summarise("depth", [dict(row, label="8 tuned")])
    assert "8 tuned: search unfinished (0 of 0 grid points scored" in table


@pytest.mark.parametrize("value", ["-5", "soon"])
def test_a_negative_or_unreadable_stop_after_is_refused_before_anything_runs(tmp_path, capsys, value):
    with pytest.raises(SystemExit) as e:
        pc.main(["--tune", "--experiments", "depth", "--tune-stop-after", value, "--workdir", str(tmp_path / "w")])
    assert e.value.code == 2 and "--tune-stop-after: minutes at least 0" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_a_decoupled_search_of_some_baselines_runs_only_di_and_those_and_is_saved_apart(tmp_path, monkeypatch):
    ran: list = []
    peak = {"di": "8e-3", "infopro": "4e-3"}
    choice = _tune_decoupled(tmp_path, monkeypatch, peak, ran, baselines=("infopro",))
    assert {m for m, _, _ in ran} == {"di", "infopro"} and {m: choice[m].split()[1] for m in peak} == peak
    assert "e2e" not in choice and all(set(v) >= {"di", "infopro"} and "dgl" not in v for v in choice["scores"].values())
    saved = sorted(p.name for p in (tmp_path / "tune").glob("choice_*.json"))
    assert len(saved) == 1 and saved[0].startswith("choice_decoupled_infopro_")  # not the full search's file
    ran.clear()  # a search of every baseline does not take the subset's search, but finds its finished runs
    full = _tune_decoupled(tmp_path, monkeypatch, dict(peak, e2e="8e-3", dgl="8e-3"), ran)
    assert {m for m, _, _ in ran} == {"e2e", "dgl"} and full["infopro"] == choice["infopro"]
    assert all(set(v) >= {"di", "e2e", "dgl", "infopro"} for v in full["scores"].values())


def test_a_table_of_some_baselines_shows_di_against_those_only(tmp_path):
    seeds = [pcd.collect_decoupled(_seed_dir(tmp_path / f"seed{i}", 30.0 + i, 0, 0, 20.0 + 2 * i), i, {}, {},
                                   baselines=("infopro",)) for i in range(3)]
    assert all("e2e" not in r and r["infopro"] == 20.0 + 2 * r["seed"] for r in seeds)
    table, rows = pcd.summarise("decoupled", [{"label": "ResNet-20", "baselines": ["infopro"], "seeds": seeds}])
    assert set(rows[0]["paired"]) == {"infopro"} and rows[0]["paired"]["infopro"]["mean"] == pytest.approx(9.0)
    head = table.splitlines()[0]
    assert "InfoPro" in head and "DI-InfoPro" in head and "E2E" not in head and "DGL" not in head
    assert "ResNet-20 seed 1: DI 31.0, InfoPro 22.0 (meta 20.0); epochs InfoPro 3" in table


def test_an_unknown_baseline_is_refused_by_the_command_line(capsys):
    with pytest.raises(SystemExit) as e:
        pc.parse_args(["--experiments", "decoupled", "--baselines", "infopro,sgd"])
    assert e.value.code == 2 and "unknown baseline(s) ['sgd']" in capsys.readouterr().err
    assert pc.parse_args(["--baselines", "infopro, dgl"]).baselines == ("dgl", "infopro")  # the registry's order
    assert pc.parse_args([]).baselines == pcd.BASELINES
