"""Benchmark bookkeeping: device-seconds accounting from run.json, the equal-accuracy saving factor of
benchmarks/gpu_hours.py (interpolation, bounds, no extrapolation), step_cost's ideal ratios and target checks, result
file names, the tune helpers and the process utilities (dsincubate.procutil) they share. Pure arithmetic on synthetic
records: no timings are asserted."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks import common, gpu_hours, step_cost  # noqa: E402
from dsincubate import accounting, checkpoint as ckpt, procutil, tune  # noqa: E402


def _phase(root: Path, rel: str, wall: float, world: int, top1: float, epochs: int = 1) -> None:
    d = root / rel
    d.mkdir(parents=True)
    rec = {"wall_seconds": wall, "world_size": world, "device_seconds": accounting.device_seconds(wall, world),
           "device_name": "cpu (2 cores)", "device_type": "cpu", "epochs": epochs, "final": {"top1": top1}}
    ckpt.atomic_write_json(d / "run.json", rec)
    ckpt.write_manifest(d, ["run.json"])


def test_device_seconds_is_wall_times_devices():
    assert accounting.device_seconds(12.5, 8) == pytest.approx(100.0)
    assert gpu_hours.device_hours({"device_seconds": 7200.0, "wall_seconds": 1.0, "world_size": 1}) == 2.0
    assert gpu_hours.device_hours({"wall_seconds": 1800.0, "world_size": 4}) == 2.0  # fallback: wall x world


def test_collect_counts_every_phase_including_meta(tmp_path):
    _phase(tmp_path, "meta", 360, 2, 40.0, 3)
    for i, w in enumerate([720, 540, 540, 360]):
        _phase(tmp_path, f"incubate/module_{i}", w, 1, 50.0 + i, 2)
    _phase(tmp_path, "finetune", 900, 4, 70.0, 2)
    _phase(tmp_path, "e2e", 1800, 4, 65.0, 6)
    row = gpu_hours.collect(tmp_path, 4)
    want = (360 * 2 + 720 + 540 + 540 + 360 + 900 * 4) / 3600
    assert row["di"]["device_hours"] == pytest.approx(want)
    assert row["di"]["phases_hours"]["meta"] == pytest.approx(0.2)
    assert row["di"]["top1"] == 70.0 and row["e2e"]["top1"] == 65.0
    assert row["e2e"]["device_hours"] == pytest.approx(2.0)
    summary = accounting.summarize(tmp_path, 4)  # the pipeline's own summary agrees
    assert summary["deep_incubation"]["device_hours"] == pytest.approx(want)
    assert summary["e2e"]["device_hours"] == pytest.approx(2.0)


def test_collect_ignores_incomplete_phases(tmp_path):
    _phase(tmp_path, "meta", 10, 1, 1.0)
    _phase(tmp_path, "e2e", 10, 1, 1.0)
    (tmp_path / "finetune").mkdir()
    (tmp_path / "finetune" / "run.json").write_text(json.dumps({"wall_seconds": 1}))  # no manifest: not finished
    row = gpu_hours.collect(tmp_path, 4)
    assert "di" not in row and "e2e" in row


def test_scaled_epochs_round_up_and_keep_one():
    assert gpu_hours.scaled_epochs({"meta": 6, "incubate": 3, "finetune": 4, "e2e": 20}, 0.2) == \
        {"meta": 2, "incubate": 1, "finetune": 1, "e2e": 4}
    assert gpu_hours.scaled_epochs({"e2e": 300}, 1.0) == {"e2e": 300}
    assert gpu_hours.scaled_epochs({"e2e": 1}, 0.01) == {"e2e": 1}


def test_hours_to_reach_interpolates_linearly():
    pts = [(4.0, 70.0), (1.0, 50.0), (2.0, 60.0)]  # unsorted on purpose
    assert gpu_hours.hours_to_reach(pts, 55.0) == (pytest.approx(1.5), True)
    assert gpu_hours.hours_to_reach(pts, 65.0) == (pytest.approx(3.0), True)
    assert gpu_hours.hours_to_reach(pts, 70.0) == (pytest.approx(4.0), True)
    assert gpu_hours.hours_to_reach(pts, 45.0) == (1.0, False)  # smallest budget already there: an upper bound
    assert gpu_hours.hours_to_reach(pts, 71.0) == (None, False)  # never reached: no extrapolation


def test_hours_to_reach_uses_first_crossing_of_a_non_monotone_curve():
    pts = [(1.0, 50.0), (2.0, 62.0), (3.0, 58.0), (4.0, 66.0)]
    assert gpu_hours.hours_to_reach(pts, 60.0)[0] == pytest.approx(1 + 10 / 12)
    assert gpu_hours.hours_to_reach(pts, 64.0)[0] == pytest.approx(3.75)


def test_saving_factor_at_equal_accuracy():
    e2e = [(4.0, 60.0), (8.0, 70.0), (16.0, 75.0)]
    di = [(1.0, 62.0), (2.0, 72.0), (4.0, 78.0)]
    s = gpu_hours.saving_factor(e2e, di, 70.0)
    # E2E reaches 70 at 8 h; DI at 1 + (70-62)/10 = 1.8 h
    assert s["factor"] == pytest.approx(8.0 / 1.8)
    assert s["kind"] == "exact"
    s = gpu_hours.saving_factor(e2e, di, 61.0)  # DI's smallest budget (62) already above: factor is a lower bound
    assert s["kind"] == "lower_bound" and s["factor"] == pytest.approx(4.4 / 1.0)
    s = gpu_hours.saving_factor(e2e, di, 77.0)  # E2E never reaches 77
    assert s["factor"] is None and s["kind"] == "not_reached"


def test_compare_headline_is_best_common_accuracy():
    e2e = [(4.0, 60.0), (8.0, 70.0), (16.0, 75.0)]
    di = [(1.0, 55.0), (2.0, 65.0), (4.0, 80.0)]
    c = gpu_hours.compare(e2e, di, levels=2)
    h = c["headline"]
    assert h["accuracy"] == 75.0 and h["kind"] == "exact"
    assert h["factor"] == pytest.approx(16.0 / (2 + 2 * 10 / 15))
    assert [lv["accuracy"] for lv in c["levels"]] == [pytest.approx(67.5), pytest.approx(75.0)]
    assert gpu_hours.compare([], di)["headline"] is None


def test_step_cost_ratios_and_targets_from_synthetic_rows():
    class A:
        stages = 2
        warmup, steps, grad_checkpointing = 1, 3, False

    def row(kind, flops, sec, peak):
        return {"kind": kind, "label": kind, "ok": True, "flops": {"train_step_per_image": flops},
                "step_seconds_median": sec, "peak_bytes": peak, "peak_delta_bytes": peak}
    rows = [row("e2e", 100.0, 1.0, 1000), row("incubate0", 40.0, 0.44, 800), row("incubate1", 30.0, 0.5, 900)]
    res = step_cost.analyse("tiny", 8, 32, 8, "fp32", rows, A)
    inc0, inc1 = res["rows"][1], res["rows"][2]
    assert inc0["ideal_ratio"] == pytest.approx(0.4) and inc0["time_ratio"] == pytest.approx(0.44)
    assert inc0["time_within_15pct"] and not inc1["time_within_15pct"]  # 0.5 / 0.3 is 67% over
    assert inc0["peak_below_e2e"] and inc1["peak_below_e2e"]
    assert res["targets"] == {"incubate_time_within_15pct_of_flop_ideal": False, "incubate_peak_memory_below_e2e": True}
    assert "incubate0" in step_cost.format_table(res)


def test_step_cost_models_have_the_right_trainable_part():
    import torch

    with torch.device("meta"):
        e2e = step_cost.build("e2e", "tiny", 4, device="meta")
        hyb = step_cost.build("incubate2", "tiny", 4, device="meta")
        meta = step_cost.build("meta", "tiny", 4, device="meta")
    n = lambda m, t: sum(p.numel() for p in m.parameters() if p.requires_grad == t)  # noqa: E731
    assert n(e2e, False) == 0
    assert n(hyb, True) == sum(p.numel() for p in hyb.target_stage.parameters())
    assert n(hyb, False) == sum(p.numel() for i, s in enumerate(hyb.stages) if i != 2 for p in s.parameters())
    assert len(meta.stages) == 4 and sum(len(s.blocks) for s in meta.stages) == 4


def test_common_table_and_device_kind():
    t = common.table(["a", "b"], [["x", 1.23456], ["yy", None]], ["", ".2f"])
    assert t.splitlines()[2].split() == ["x", "1.23"] and t.splitlines()[3].split() == ["yy", "-"]
    assert common.device_kind({"type": "cpu", "cores": 2}) == "cpu2"
    assert common.device_kind({"type": "cuda", "name": "NVIDIA H100 80GB HBM3"}) == "h100"
    assert common.device_kind({"type": "cuda", "name": "NVIDIA A100-SXM4-40GB"}) == "a100"


def test_result_files_carry_device_and_date_and_never_overwrite(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    dev = {"type": "cpu", "cores": 2, "name": "cpu (2 cores)"}
    record = {"benchmark": "x", "date": "2026-11-23T10:00:00+00:00", "device": dev}
    first = common.write_result("x", record, "a table")
    assert first.name == "x_cpu2_2026-11-23.json" and first.with_suffix(".txt").read_text() == "a table\n"
    assert json.loads(first.read_text())["table"] == ["a table"]
    second = common.write_result("x", dict(record, run=2), "another")
    assert second.name == "x_cpu2_2026-11-23_2.json" and json.loads(first.read_text()).get("run") is None
    assert common.write_result("x", record, kind="gpu-node").name == "x_gpu-node_2026-11-23.json"
    assert common.result_path("x", dev, "2026-11-24").name == "x_cpu2_2026-11-24.json"
    out = tmp_path / "named.json"  # --out names the file itself
    assert common.write_result("x", record, None, out) == out and out.is_file()


def test_tune_helpers():
    assert tune.parse_size("512M") == 512 * 2**20 and tune.parse_size("2G") == 2 * 2**30 and tune.parse_size("") == 0
    with pytest.raises(Exception):
        tune.parse_size("lots")
    assert procutil.classify_failure(-9, "").startswith("killed")
    assert procutil.classify_failure(1, "RuntimeError: DefaultCPUAllocator: can't allocate memory") == "out of memory"


def test_failure_reasons():
    oom = ["torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", "MemoryError",
           "terminate called after throwing an instance of 'std::bad_alloc'",
           "OSError: [Errno 12] Cannot allocate memory",
           "RuntimeError: failed to allocate 123 bytes"]
    assert all(procutil.classify_failure(1, t) == "out of memory" for t in oom)
    assert procutil.classify_failure(1, "[launch.py] exiting: return code = -9").startswith("killed")
    assert procutil.classify_failure(137, "").startswith("killed")
    assert procutil.classify_failure(-11, "").startswith("crashed (segmentation fault)")
    assert procutil.classify_failure(2, "Traceback\nValueError: bad\nexiting") == "exit 2: ValueError: bad"
    assert procutil.is_out_of_memory("CUDA out of memory") and not procutil.is_out_of_memory("ValueError: x")


def test_child_result_round_trip_and_failures(capsys, tmp_path):
    procutil.emit_result({"ok": True, "x": 1.5})
    out = capsys.readouterr().out
    assert procutil.parse_result("noise\n[rank0]: " + out + "more noise\n") == {"ok": True, "x": 1.5}
    assert procutil.parse_result("no result here\n") is None
    py = sys.executable
    ok = procutil.run_child([py, "-c", "from dsincubate import procutil; procutil.emit_result({'v': 3})"], timeout=60)
    assert ok == {"v": 3, "ok": True}
    bad = procutil.run_child([py, "-c", "raise ValueError('broken')"], timeout=60)
    assert not bad["ok"] and bad["error"] == "exit 1: ValueError: broken" and bad["returncode"] == 1
    slow = procutil.run_child([py, "-c", "import time; time.sleep(30)"], timeout=1)
    assert not slow["ok"] and slow["error"] == "timeout after 1s"


def test_process_memory_and_port():
    assert procutil.status_bytes("VmSize") > procutil.status_bytes("VmRSS") > 0
    assert procutil.status_bytes("NoSuchField") == 0
    assert procutil.peak_rss_bytes() >= procutil.current_rss_bytes() > 0
    assert procutil.max_rss_bytes() > 0
    port = procutil.free_port()
    assert 0 < port < 65536


def test_gpu_session_commands_use_real_scripts_and_options():
    import re
    import subprocess
    root = Path(__file__).resolve().parents[2]
    p = subprocess.run(["bash", str(root / "benchmarks" / "gpu_session.sh"), "all"], capture_output=True, text=True,
                       env={"DRY_RUN": "1", "PATH": "/usr/bin:/bin"}, timeout=60)
    assert p.returncode == 0, p.stderr
    lines = [line for line in p.stdout.splitlines() if line.startswith("+ [")]
    parts = [line[3:].split(",")[0] for line in lines]
    assert parts[:4] == ["tests", "kernels", "mfu", "loader"]  # (+ loader_dali where dataloader.py has --backend)
    assert all(re.match(r"\+ \[\w+, timeout \d+s\] ", line) for line in lines)  # each part its own timeout
    assert sum(int(re.search(r"timeout (\d+)s", line).group(1)) for line in lines) < 600
    cmds = [line.split("] ", 1)[1].split() for line in lines]
    mfu = cmds[2]
    assert mfu[mfu.index("--presets") + 1] == "vit_b16,vit_l16,vit_h14" and "--recipe" not in mfu
    for cmd in cmds:
        script = next((a for a in cmd if a.endswith(".py")), None)
        if script is None:  # the pytest call
            assert cmd[:3] == ["python3", "-m", "pytest"] and "gpu" in cmd and (root / "tests" / "ops").is_dir()
            continue
        src = (root / script).read_text()
        for opt in (a for a in cmd if a.startswith("--")):
            assert re.search(rf'add_argument\("{re.escape(opt)}"', src), f"{script} has no option {opt}"
    bad = subprocess.run(["bash", str(root / "benchmarks" / "gpu_session.sh"), "nope"], capture_output=True,
                         text=True, env={"DRY_RUN": "1", "PATH": "/usr/bin:/bin"}, timeout=60)
    assert bad.returncode == 2


def test_paper_claims_gives_e2e_at_least_di_flops_and_device_seconds(tmp_path):
    from benchmarks import paper_claims

    def run(rel, device_seconds, epoch_seconds=None):
        d = tmp_path / rel
        d.mkdir(parents=True)
        rec = {"device_seconds": device_seconds, "world_size": 2,
               "history": [{"epoch_seconds": s} for s in (epoch_seconds or [1.0])]}
        (d / "run.json").write_text(json.dumps(rec))

    run("meta", 10.0)
    for i in range(4):
        run(f"incubate/module_{i}", 5.0)
    run("finetune", 12.0, [2.0, 4.0])  # 3 s per epoch on each of 2 devices = 6 device-seconds per E2E epoch
    assert paper_claims.e2e_epochs_for_hours(tmp_path) == 7  # ceil(42 / 6)
    n, plan = paper_claims.e2e_epochs_for("debug", ["model.kernel_backend=torch"],
                                          ["--set", f"data.demo_root={tmp_path / 'demo'}"])
    assert n * plan["e2e_per_epoch"] >= plan["di_total"] > (n - 1) * plan["e2e_per_epoch"]
    assert plan["di_total"] == pytest.approx(plan["meta"] + plan["incubate"] + plan["finetune"])


def test_paper_claims_verdict_follows_the_paired_interval_and_cells_are_shared():
    from benchmarks import paper_claims as pc, stats

    # the depth-8 cell's seeds: -2.4 ± 1.5 paired was "E2E better" under the old |gap| > spread rule; p = 0.105
    d8 = stats.paired([26.0, 30.0, 30.0], [30.1, 31.9, 31.2])
    assert pc.verdict((10.0, 1.0), (28.7, 5.1), (31.1, 4.0), d8) == "no difference at 95%"
    d32 = stats.paired([32.0, 29.5, 35.1], [24.0, 22.8, 28.2])
    assert pc.verdict((10.0, 1.0), (32.2, 2.8), (25.0, 3.8), d32) == "DI better"
    assert pc.verdict((33.0, 1.0), (32.2, 2.8), (25.0, 3.8), stats.paired([30.0, 29.0], [31.0, 29.5])) == \
        "no difference at 95%; meta alone best: no reward for the large model"
    assert pc.verdict((None, None), (1.0, 0.0), (1.0, 0.0), d8) == "incomplete"
    depth8 = [c for c in pc.cells("depth", "cpu") if c[1] == "8"][0]
    full = [c for c in pc.cells("data", "cpu") if c[1] == "100%"][0]
    assert pc.cell_key(depth8[0], depth8[2]) == pc.cell_key(full[0], full[2])  # one run serves both tables
    assert len({pc.cell_key(r, s) for r, _, s in pc.cells("depth", "cpu")}) == 3


def test_paper_claims_ablation_cells_take_only_phases_with_an_identical_config_key(tmp_path):
    """An ablation of the fine-tune takes the default cell's meta model and modules; one of incubation takes the
    meta model only; one of the meta model takes nothing (it would train another model)."""
    from benchmarks import paper_claims as pc
    from dsincubate import checkpoint as ckpt, phases, recipes
    from dsincubate.config import apply_overrides
    from dsincubate.layout import RunLayout

    base = pc.CPU_BASE + ["seed=1"]
    src = tmp_path / "default"
    cfg = apply_overrides(recipes.get("demo"), base)
    for name, i in [("meta", None)] + [("incubate", i) for i in range(cfg.model.num_stages)]:
        d = RunLayout(src).phase_dir(name, i)
        d.mkdir(parents=True)
        key = dict(phases.make(name, cfg, src, 1, i, resolve=False).config_key())
        if name == "incubate":
            key["meta_sha256"] = "ab" * 32
        ckpt.atomic_write_json(d / "config_key.json", json.loads(json.dumps(key, default=str)))
        (d / "weights.bin").write_bytes(b"x")
        ckpt.atomic_write_json(d / ckpt.MANIFEST, {"files": {"weights.bin": {}}})

    def copied(extra_sets, **kw):
        return pc.reuse_phases(src, tmp_path / str(len(list(tmp_path.iterdir()))), "demo", base + extra_sets, [], **kw)

    modules = [f"incubate/module_{i}" for i in range(4)]
    assert copied(["finetune.epochs=8"]) == ["meta"] + modules
    assert copied(["finetune.lr=1.6e-2"], modules=False) == ["meta"]
    assert copied(["incubate.imitation=true"]) == ["meta"]
    assert copied(["incubate.epochs=7"]) == ["meta"]
    assert copied(["meta.epochs=2"]) == []
    assert copied(["seed=2"]) == []
    assert copied(["model.depth=16"]) == []


def test_paper_claims_merge_keeps_earlier_rows_not_run_again():
    from benchmarks import paper_claims as pc

    seed = {"ok": True, "seed": 0, "meta": 20.0, "di": 30.0, "e2e": 28.0, "assembled": 10.0,
            "di_flops": 1e12, "e2e_flops": 2e12, "di_hours": 0.1, "e2e_hours": 0.1}
    old = [{"label": lb, "seeds": [dict(seed, di=float(lb))], "stats": {}, "verdict": "x"} for lb in ("8", "16", "32")]
    new = [{"label": "32", "seeds": [dict(seed, di=99.0)]}]
    rows = pc.merged("depth", new, "results/old.json", old)
    assert [r["label"] for r in rows] == ["8", "16", "32"]
    assert rows[2]["seeds"][0]["di"] == 99.0 and "merged_from" not in rows[2]  # this run's cell replaces the old one
    assert rows[0]["merged_from"] == "results/old.json" and "verdict" not in rows[0]
    table, out = pc.summarise("depth", rows)
    assert "8*" in table and "16*" in table and "old.json" in table.splitlines()[-1]
    ft = pc.merged("ft", [{"label": "16", "seeds": []}, {"label": "1", "seeds": []}], "", [])
    assert [r["label"] for r in ft] == ["1", "16"]
    assert len({pc.cell_key(r, s) for r, _, s in pc.cells("ft", "cpu")}) == 5
    assert pc.cell_key(*pc.cells("ft", "cpu")[2][::2]) == pc.cell_key(*pc.cells("depth", "cpu")[0][::2])
    assert pc.cell_key(*pc.cells("ft_lr", "cpu")[1][::2]) == pc.cell_key(*pc.cells("depth", "cpu")[0][::2])
    # `--set model.depth=32`: the ablation's default cell is the depth experiment's depth-32 cell (its runs reused)
    ft_default = pc.cells("ft", "cpu")[2]
    assert pc.cell_key(ft_default[0], ft_default[2] + ["model.depth=32"]) == pc.cell_key(
        *pc.cells("depth", "cpu", [32])[0][::2])


_PC_ROOT = Path(__file__).resolve().parents[2]


def _columns(line: str) -> list[str]:
    import re

    return re.split(r"\s{2,}", line.strip())


def test_paper_claims_committed_tables_are_reproduced_with_intervals_and_seed_flags():
    """Every committed paper_claims table, recomputed from the per-seed records its file holds: the columns it had
    come out the same, and each row gains the paired 95% interval with p and the per-seed flags (issue 24); a table
    that has the interval already comes out identical."""
    import re

    from benchmarks import paper_claims as pc

    results = _PC_ROOT / "benchmarks" / "results"
    files = sorted(p for p in [*results.glob("paper_claims_*.json"), *(results / "archive").glob("paper_claims_*.json")]
                   if not p.stem.endswith("_stats"))
    assert len(files) >= 11
    for f in files:
        rec = json.loads(f.read_text())
        table, rows = pc.summarise(rec["experiment"], rec["rows"])
        old, new = rec["table"], table.splitlines()
        if "[95% CI]" in old[0]:  # written with the interval already (2026-12-06 on): recomputed to the character
            assert old == new, f.name
            continue
        assert len(old) == len(new), f.name
        for o, n in zip(old[2:], new[2:]):
            if o.startswith("*"):
                assert o == n
                continue
            o, n = _columns(o), _columns(n)
            assert o[:7] + o[7:11] == n[:7] + n[8:12], f.name  # label .. paired mean ± std, TFLOP, hours
            assert n[7] == "-" or re.fullmatch(r"[+-]\d+\.\d \[[+-]\d+\.\d, [+-]\d+\.\d\] p=\d\.\d{3}", n[7]), n[7]
    depth = json.loads((_PC_ROOT / "benchmarks/results/paper_claims_depth_cpu2_2026-12-05.json").read_text())
    _, rows = pc.summarise("depth", depth["rows"])
    d32 = rows[2]
    assert d32["paired"]["verdict"] == "DI better" and d32["paired"]["p"] < 0.01
    assert "E2E below meta: 0,1,2" in d32["flags"]
    assert rows[0]["verdict"] == "no difference at 95%"  # depth 8: the old rule's "E2E better", p = 0.105
    assert rows[1]["flags"].startswith("DI more device-h: 0,1,2")


def test_paper_claims_from_recomputes_a_result_and_flags_its_unclean_commit(tmp_path, capsys):
    from benchmarks import paper_claims as pc

    src = tmp_path / "paper_claims_k_cpu2_2026-11-23.json"  # committed with an empty git_commit
    src.write_text((_PC_ROOT / "benchmarks/results/archive" / src.name).read_text())
    assert pc.main(["--from", str(src)]) == 0
    out = json.loads((tmp_path / "paper_claims_k_cpu2_2026-11-23_stats.json").read_text())
    assert out["recomputed_from"] == str(src) and out["source_git_commit"] == ""
    assert all("paired" in r and "flags" in r for r in out["rows"])
    assert any("WARNING: the source result records git_commit ''" in line for line in out["table"])
    assert pc.main(["--from", str(tmp_path / "nope.json")]) == 2


@pytest.mark.parametrize("sha", ["", "unknown", "0123abc+dirty"])
def test_paper_claims_refuses_to_run_without_a_clean_commit(monkeypatch, capsys, sha):
    from benchmarks import paper_claims as pc

    monkeypatch.setattr(pc, "code_commit", lambda: sha)
    assert pc.main(["--experiments", "depth", "--depths", "8", "--workdir", "/nonexistent"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert pc.commit_problem(sha) is not None and pc.commit_problem("0123abc") is None


def test_tuning_grid_is_the_same_for_both_methods_and_valid_for_every_cell():
    from benchmarks import paper_claims as pc, tuning
    from dsincubate import recipes
    from dsincubate.config import apply_overrides

    assert len(tuning.GRID) == 6 and len({lb for lb, _ in tuning.GRID}) == 6  # lr x warm-up, 3 x 2
    for label, _ in tuning.GRID:
        sets = tuning.grid_sets(label)
        for _, _, cell in pc.cells("depth", "cpu"):
            cfg = apply_overrides(recipes.get("demo"), cell + sets + ["e2e.epochs=20"])  # validates every phase
            assert cfg.meta.lr == cfg.incubate.lr == cfg.finetune.lr == cfg.e2e.lr  # one rate for both methods
            assert cfg.meta.warmup_epochs == cfg.incubate.warmup_epochs == cfg.e2e.warmup_epochs
            assert cfg.meta.clip_grad == cfg.incubate.clip_grad == cfg.finetune.clip_grad == cfg.e2e.clip_grad == 1.0
    with pytest.raises(Exception, match="unknown grid point"):
        tuning.grid_sets("lr 1 wu 1")


def test_tuning_selects_each_methods_best_point_and_refuses_an_unfinished_grid():
    from benchmarks import tuning
    from dsincubate.errors import UserError

    labels = [lb for lb, _ in tuning.GRID]
    scores = {lb: {"di": 30.0 + i, "e2e": 40.0 - i} for i, lb in enumerate(labels)}
    assert tuning.select(scores) == {"di": labels[-1], "e2e": labels[0]}
    scores[labels[3]] = {"di": None, "e2e": 50.0}
    with pytest.raises(UserError, match="tuning incomplete for di: 5 of 6"):
        tuning.select(scores)


def _run_tune_cell(tmp_path, monkeypatch, peak: dict, extend: int, ran: list):
    """tuning.tune_cell on a cell whose runs are replaced by a top-1 that falls off with the distance (in ladder
    steps) of the grid point's learning rate from each method's `peak`: the search logic alone, no training."""
    import argparse
    from benchmarks import paper_claims as pc, tuning

    def run_cell(out, recipe, sets, seed, extra, timeout, budget):
        lr = [s.split("=")[1] for s in sets if s.startswith("e2e.lr=")][0]
        ran.append(lr)
        return {m: 50.0 - abs(tuning.LADDER.index(lr) - tuning.LADDER.index(peak[m])) for m in ("di", "e2e")} | \
            {"meta": 1.0, "ok": True}

    monkeypatch.setattr(pc, "run_cell", run_cell)
    monkeypatch.setattr(pc, "e2e_epochs_for", lambda recipe, sets, extra: (3, {"samples_per_epoch": 64}))
    monkeypatch.setattr(tuning, "tune_extra", lambda *a: ["--train", "t", "--val", "v"])
    args = argparse.Namespace(collect_only=False, tune_data="", tune_per_class=5, tune_seed=0, timeout=60,
                              tune_extend=extend)
    return tuning.tune_cell(tmp_path, "demo", ["model.depth=8"], [], args)


def test_tuning_extends_the_same_grid_for_both_methods_while_a_choice_sits_at_an_end(tmp_path, monkeypatch):
    from benchmarks import tuning

    ran: list = []
    choice = _run_tune_cell(tmp_path, monkeypatch, {"di": "8e-3", "e2e": "1e-3"}, 2, ran)
    assert choice["lrs"] == ["1e-3", "2e-3", "4e-3", "8e-3", "1.6e-2"]  # two steps down for E2E, none up
    assert choice["e2e"].startswith("lr 1e-3 ") and choice["di"].startswith("lr 8e-3 ")
    assert choice["edge"] == ["e2e"]  # still at the end: the ladder stops there
    assert sorted(ran, key=tuning.LADDER.index) == [lr for lr in choice["lrs"] for _ in tuning.WARMUPS]  # each once
    assert set(choice["scores"]) == {lb for lb, _ in choice["grid"]}  # DI got every point E2E got


def test_tuning_extension_respects_its_limit_and_extends_a_saved_choice_later(tmp_path, monkeypatch):
    ran: list = []
    first = _run_tune_cell(tmp_path, monkeypatch, {"di": "3.2e-2", "e2e": "6.4e-2"}, 0, ran)
    assert first["lrs"] == ["4e-3", "8e-3", "1.6e-2"] and first["edge"] == ["di", "e2e"] and len(ran) == 6
    path = next((tmp_path / "tune").glob("choice_*.json"))
    path.write_text(json.dumps({k: v for k, v in first.items() if k not in ("lrs", "edge")}))  # an older save
    assert _run_tune_cell(tmp_path, monkeypatch, {"di": "3.2e-2", "e2e": "6.4e-2"}, 0, ran)["edge"] == ["di", "e2e"]
    assert json.loads(path.read_text())["lrs"] == ["4e-3", "8e-3", "1.6e-2"] and len(ran) == 6  # recorded, no runs
    ran.clear()
    later = _run_tune_cell(tmp_path, monkeypatch, {"di": "3.2e-2", "e2e": "6.4e-2"}, 1, ran)
    assert ran == ["3.2e-2", "3.2e-2"]  # only the new points ran; the saved six were kept
    assert later["lrs"][-1] == "3.2e-2" and later["di"].startswith("lr 3.2e-2 ") and later["edge"] == ["di", "e2e"]
    ran.clear()
    again = _run_tune_cell(tmp_path, monkeypatch, {"di": "3.2e-2", "e2e": "6.4e-2"}, 1, ran)
    assert again == json.loads(json.dumps(later)) and ran == []  # the saved choice, read back


def test_tuning_grid_stays_put_where_no_choice_sits_at_an_end(tmp_path, monkeypatch):
    ran: list = []
    choice = _run_tune_cell(tmp_path, monkeypatch, {"di": "8e-3", "e2e": "8e-3"}, 2, ran)
    assert choice["lrs"] == ["4e-3", "8e-3", "1.6e-2"] and choice["edge"] == [] and len(ran) == 6


def test_tuning_holdout_of_training_shards_is_class_balanced_disjoint_and_complete(tmp_path):
    import numpy as np

    from benchmarks import tuning
    from dsincubate.data.sources import load_index
    from dsincubate.data.writer import Sample, image_bytes, write_shards

    rng = np.random.default_rng(0)
    imgs = [image_bytes(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in range(40)]
    write_shards([Sample(key=f"s{i:03d}", label=i % 4, ext="png", size=len(b), read=lambda b=b: b)
                  for i, b in enumerate(imgs)], str(tmp_path / "src"), ["a", "b", "c", "d"], maxcount=7,
                 progress=False)
    train, tune = tuning.holdout(tmp_path / "src", tmp_path / "out", per_class=3)
    ti, vi = load_index(str(train)), load_index(str(tune))
    assert vi.samples_per_class() == [3, 3, 3, 3] and ti.samples_per_class() == [7, 7, 7, 7]
    tk = {k for s in ti.shards for k in s.keys}
    vk = {k for s in vi.shards for k in s.keys}
    assert not tk & vk and tk | vk == {f"s{i:03d}" for i in range(40)}
    with pytest.raises(Exception, match="too few to hold out"):
        tuning.holdout(tmp_path / "src", tmp_path / "out2", per_class=10)


def test_tuning_runs_read_the_held_out_split_never_the_validation_set(tmp_path):
    from benchmarks import tuning
    from dsincubate.errors import UserError

    extra = ["--set", "x=1", "--train", "/d/train", "--val", "/d/val"]
    assert tuning.tune_extra("/d/train,/d/tune", extra, tmp_path, 5) == \
        ["--set", "x=1", "--train", "/d/train", "--val", "/d/tune"]
    with pytest.raises(UserError, match="needs --tune-data"):
        tuning.tune_extra("", extra, tmp_path, 5)
    with pytest.raises(UserError, match="TRAIN,TUNE"):
        tuning.tune_extra("/d/train", [], tmp_path, 5)


def test_paper_claims_tuned_rows_show_the_default_e2e_and_the_choices():
    from benchmarks import paper_claims as pc

    seed = {"ok": True, "meta": 20.0, "assembled": 10.0, "di_flops": 1e12, "e2e_flops": 2e12, "di_hours": 0.1,
            "e2e_hours": 0.2}
    seeds = [dict(seed, seed=i, di=30.0 + i, e2e=32.0 + 2 * i, e2e_default=25.0 + i) for i in range(3)]
    row = {"label": "16 tuned", "seeds": seeds, "tuning": {"di": "lr 8e-3 wu 1", "e2e": "lr 4e-3 wu 3", "seed": 0}}
    table, out = pc.summarise("depth", [row])
    head, line = _columns(table.splitlines()[0]), _columns(table.splitlines()[2])
    assert head[6] == "E2E default" and line[6] == "26.0 ± 1.0" and line[5] == "34.0 ± 2.0"
    assert "16 tuned: DI at lr 8e-3 wu 1, E2E at lr 4e-3 wu 3" in table.splitlines()[-1]


# ---------------------------------------------------------------- honest throughput rows (issue 21 item 6)

def _meta_count(recipe: str, sets: list[str]) -> dict:
    from dsincubate import recipes
    from dsincubate.config import apply_overrides

    return common.model_params(apply_overrides(recipes.get(recipe), sets))


def test_param_check_refuses_a_preset_shaped_by_the_debug_recipes_depth_and_width():
    # what `throughput.py --recipe debug --presets vit_h14` used to time as "ViT-H": 4 blocks of width 48
    m = _meta_count("debug", ["model.preset=vit_h14"])
    assert m["depth"] == 4 and m["embed_dim"] == 48
    err = common.check_params("vit_h14", m["params"], m["num_classes"], m["embed_dim"])
    assert err and "vit_h14" in err and "632" in err
    assert common.check_params("vit_b16", 86_000_000, 1000, 768)  # 0.7% short of ViT-B/16: refused too
    assert common.check_params("tiny", 5, 10, 48) is None  # presets without a reference count are not checked


@pytest.mark.parametrize("preset,millions", [("vit_b16", 86.6), ("vit_l16", 304.3), ("vit_h14", 632.0)])
def test_benchmark_presets_are_the_real_models_whatever_recipe_they_start_from(preset, millions):
    from benchmarks import throughput

    m = throughput.preset_model(*throughput.preset_setup("debug", preset), preset)  # the old default recipe
    assert m["error"] is None and m["num_classes"] == 1000
    assert m["params"] / 1e6 == pytest.approx(millions, rel=2e-3)
    assert throughput.preset_setup("", preset)[0] == preset  # the new default: the preset's own recipe
    sc = step_cost.check_preset(preset, 4)
    assert sc["error"] is None and sc["params"] / 1e6 == pytest.approx(millions, rel=2e-3)


def test_expected_params_follow_the_head_size():
    # ViT-H/14 without a head (timm's default for it): 632.0 M - 1280 x 1000 - 1000
    assert common.expected_params("vit_h14", 0, 1280) == pytest.approx(632e6 - 1_281_000)
    assert common.check_params("vit_h14", 630_764_800, 0, 1280) is None


@pytest.mark.parametrize("name,entry,tflops", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM", 989.0), ("NVIDIA H100 PCIe", "H100 PCIe", 756.0),
    ("NVIDIA H200", "H200", 989.0), ("NVIDIA A100-SXM4-80GB", "A100", 312.0), ("NVIDIA A100 80GB PCIe", "A100", 312.0)])
def test_peak_table_matches_device_names_as_torch_reports_them(name, entry, tflops):
    assert common.peak_bf16_tflops(name) == (entry, tflops)


@pytest.mark.parametrize("name", ["NVIDIA H100 NVL", "NVIDIA GH200 480GB", "Tesla V100-SXM2-32GB",
                                  "AMD EPYC 7763 64-Core Processor (2 cores)"])
def test_devices_not_in_the_peak_table_get_no_peak(name):
    assert common.peak_bf16_tflops(name) is None


def test_mfu_is_model_flops_per_device_over_the_peak():
    # ViT-B/16 at 224: about 3 x 17.6 GFLOP per trained image; 4 devices share 8000 img/s
    assert common.mfu(52.8e9, 8000.0, 4, 989.0) == pytest.approx(52.8e9 * 2000 / 989e12)
    assert common.mfu(52.8e9, 8000.0, 4, 989.0) == pytest.approx(0.10677, rel=1e-4)
    assert common.mfu(52.8e9, 8000.0, 4, None) is None  # unknown device: no MFU, not a made-up one


def test_git_commit_is_dirty_for_changed_code_but_not_for_result_files_beside_it(tmp_path):
    """A worktree that other runs are writing results into still ran clean code; a changed code file is +dirty."""
    import subprocess

    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    (tmp_path / "dsincubate").mkdir()
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "dsincubate" / "m.py").write_text("x = 1\n")
    subprocess.run(git[:3] + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "-A"], check=True)
    subprocess.run(git + ["commit", "-qm", "c"], check=True)
    (tmp_path / "benchmarks" / "results" / "r.json").write_text("{}\n")
    sha = common.git_commit(tmp_path)
    assert len(sha) == 40 and not sha.endswith("+dirty")
    (tmp_path / "dsincubate" / "m.py").write_text("x = 2\n")
    assert common.git_commit(tmp_path) == sha + "+dirty"


def test_e2e_controls_on_a_tuned_cell_train_each_variant_on_e2es_point_and_pair_with_dis(tmp_path, monkeypatch):
    """benchmarks/e2e_controls.py --tuned: DI from its own grid point's directory, each variant on top of E2E's
    point (budget_x2 at twice E2E's epochs), differences paired by seed. Runs are replaced by a pipeline that
    writes what a finished run leaves (top-1 from the settings): the bookkeeping alone."""
    from benchmarks import e2e_controls as ec, paper_claims as pc, tuning

    recipe, _, sets = pc.cells("depth", "cpu", [32])[0]
    root = tmp_path / "cpu"
    choice = {"di": "lr 4e-3 wu 3", "e2e": "lr 8e-3 wu 1"}
    (root / "tune").mkdir(parents=True)
    (root / "tune" / f"choice_{pc.cell_key(recipe, sets)}.json").write_text(json.dumps(choice))
    di_dir = root / pc.cell_key(recipe, sets + tuning.grid_sets(choice["di"]))
    e2e_dir = root / pc.cell_key(recipe, sets + tuning.grid_sets(choice["e2e"]))
    for s in (0, 1):
        (di_dir / f"seed{s}").mkdir(parents=True)
        (di_dir / f"seed{s}" / "summary.json").write_text(json.dumps({"deep_incubation": {"top1": 34.0 + s}}))
        (e2e_dir / f"seed{s}" / "e2e").mkdir(parents=True)
        (e2e_dir / f"seed{s}" / "e2e" / "MANIFEST.json").write_text("{}")
        (e2e_dir / f"seed{s}" / "summary.json").write_text(json.dumps({"e2e": {"top1": 19.0 + 2 * s, "epochs": 14}}))
    calls = []

    def pipeline(out, method, recipe_, sets_, extra, timeout):
        calls.append((out.name, sets_))
        if method == "di":  # --di-too: DI with the model variant, at DI's own point
            (out / "finetune").mkdir(parents=True)
            (out / "finetune" / "MANIFEST.json").write_text("{}")
            (out / "summary.json").write_text(json.dumps({"deep_incubation": {
                "top1": 36.0, "meta_top1": 30.0, "device_hours": 0.1}}))
            return True
        epochs = int([x for x in sets_ if x.startswith("e2e.epochs=")][-1].split("=")[1])
        top1 = 19.0 + (epochs - 14) + (3.0 if "model.layer_scale_init=1e-4" in sets_ else 0.0)
        (out / "e2e").mkdir(parents=True)
        (out / "e2e" / "MANIFEST.json").write_text("{}")
        (out / "summary.json").write_text(json.dumps({"e2e": {"top1": top1, "epochs": epochs, "device_hours": 0.1}}))
        return True

    monkeypatch.setattr(pc, "_pipeline", pipeline)
    monkeypatch.setattr(common, "RESULTS", tmp_path / "results")
    assert ec.main(["--tuned", "--depth", "32", "--seeds", "0,1", "--variants", "layer_scale,budget_x2",
                    "--workdir", str(tmp_path)]) == 0
    assert [c[0] for c in calls] == ["layer_scale", "budget_x2"] * 2
    assert all("e2e.lr=8e-3" in c[1] and "meta.lr=8e-3" in c[1] for c in calls)  # on top of E2E's tuned point
    assert "e2e.epochs=28" in calls[1][1] and "e2e.epochs=14" in calls[0][1]
    rec = json.loads(next((tmp_path / "results").glob("e2e_controls_tuned_*.json")).read_text())
    assert [r["di"] for r in rec["per_seed"]] == [34.0, 35.0] and rec["per_seed"][1]["layer_scale"]["top1"] == 22.0
    row = [line for line in rec["table"] if line.startswith("E2E budget_x2")][0]
    assert "+1.5 [" in row and "2x epochs" in row  # DI - it: 34 - 33, 35 - 33
    calls.clear()
    assert ec.main(["--tuned", "--depth", "32", "--seeds", "0,1", "--variants", "layer_scale", "--di-too",
                    "--workdir", str(tmp_path)]) == 0
    assert [c[0] for c in calls] == ["layer_scale_di"] * 2  # E2E's layer_scale runs kept, DI's added
    assert all("meta.lr=4e-3" in c[1] and "model.layer_scale_init=1e-4" in c[1] for c in calls)
    text = sorted((tmp_path / "results").glob("e2e_controls_tuned_*.txt"))[-1].read_text()
    assert "DI layer_scale (both sides): 36.0 ± 0.0; DI layer_scale - E2E layer_scale +14.0 [" in text
    with pytest.raises(SystemExit):  # no tuned depth-16 cell: refused before anything runs
        ec.main(["--tuned", "--depth", "16", "--seeds", "0", "--workdir", str(tmp_path)])


def test_every_result_file_records_a_clean_commit_and_every_archived_one_is_named_in_the_archive_index():
    """Issue 24: a committed result file records the clean commit that wrote it (40 hex digits, no '+dirty'); the
    files that do not live in benchmarks/results/archive/, each named in its README with why (a `_stats` file is
    named through the result it was recomputed from)."""
    import re

    results = _PC_ROOT / "benchmarks" / "results"
    unclean = []
    for p in sorted(results.rglob("*.json")):
        if "archive" in p.relative_to(results).parts:
            continue
        rec = json.loads(p.read_text())
        commit = rec.get("git_commit") if isinstance(rec, dict) else None
        if not (isinstance(commit, str) and re.fullmatch(r"[0-9a-f]{40}", commit)):
            unclean.append(f"{p.relative_to(results)}: {commit!r}")
    assert not unclean, unclean
    archive = results / "archive"
    index = (archive / "README.md").read_text()
    stems = {re.sub(r"_stats$", "", p.name.split(".")[0]) for p in archive.iterdir() if p.name != "README.md"}
    assert stems and all(f"`{s}`" in index for s in stems), sorted(s for s in stems if f"`{s}`" not in index)
