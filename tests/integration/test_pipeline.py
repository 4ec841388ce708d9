"""Integration tests: the real `dsincubate` command and the real `deepspeed` launcher, in subprocesses, on the debug
recipe and the built-in demo data. Slow tier (`-m integration`); every phase goes through DeepSpeed engines."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from dsincubate import checkpoint as ckpt
from dsincubate.models import staged, vit

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
CROSS_WIDTH_TEST = "test_cross_width_meta_model_incubates_a_target_of_another_width_through_the_real_pipeline"


def dsi(*args, cwd, demo_root, check=True):
    cmd = [sys.executable, "-m", "dsincubate", *args, "--set", f"data.demo_root={demo_root}"]
    p = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=900)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def dsi_started(*args, cwd, demo_root, log: Path) -> subprocess.Popen:
    """`dsi` without waiting, its output in `log`; `dsi_finished` waits. A single-process run uses one of the CI
    machine's 2 cores (OMP_NUM_THREADS=1): a test's independent runs go side by side."""
    cmd = [sys.executable, "-m", "dsincubate", *args, "--set", f"data.demo_root={demo_root}"]
    with open(log, "wb") as f:
        return subprocess.Popen(cmd, cwd=cwd, env=ENV, stdout=f, stderr=subprocess.STDOUT)


def dsi_finished(p: subprocess.Popen, log: Path) -> None:
    try:
        rc = p.wait(timeout=900)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        raise
    assert rc == 0, f"{' '.join(p.args)} failed ({rc}):\n{log.read_text(errors='replace')[-3000:]}"


@pytest.fixture(scope="session")
def cross_width_launch(tmp_path_factory, demo_root):
    """The cross-width pipeline (a meta model of width 32 for the width-48 debug target), started, not waited for:
    its test waits. `debug_run` starts it first when that test is selected, so that the two single-process
    pipelines (one core each) train side by side."""
    root = tmp_path_factory.mktemp("cross") / "cross"
    log = root.parent / "cross.log"
    p = dsi_started("pipeline", "--recipe", "debug", "--methods", "di", "--output", str(root), "--set",
                    "model.meta_embed_dim=32", "--set", "model.meta_num_heads=2", cwd=root.parent,
                    demo_root=demo_root, log=log)
    yield root, p, log
    if p.poll() is None:  # the session ended before its test waited for it
        p.kill()
        p.wait()


@pytest.fixture(scope="session")
def debug_run(request, tmp_path_factory, demo_root):
    if any(getattr(item, "originalname", "") == CROSS_WIDTH_TEST for item in request.session.items):
        request.getfixturevalue("cross_width_launch")
    root = tmp_path_factory.mktemp("run") / "debug"
    dsi("pipeline", "--recipe", "debug", "--methods", "di,e2e,e2e_tune", "--output", str(root), cwd=root.parent,
        demo_root=demo_root)
    return root


def tree_digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_pipeline_outputs_and_accounting(debug_run):
    summary = json.loads((debug_run / "summary.json").read_text())
    assert summary["e2e"]["top1"] is not None and summary["deep_incubation"]["top1"] is not None
    assert summary["deep_incubation"]["device_hours"] > summary["deep_incubation"]["phases"]["finetune"]
    meta_sha = ckpt.read_manifest(debug_run / "meta")["files"]["model.safetensors"]["sha256"]
    for d in ["meta", "finetune", "e2e"] + [f"incubate/module_{i}" for i in range(4)]:
        run = json.loads((debug_run / d / "run.json").read_text())
        assert ckpt.complete(debug_run / d)
        assert run["device_seconds"] == pytest.approx(run["wall_seconds"] * run["world_size"])
        assert run["images_processed"] > 0 and run["flops"]["train_step_per_image"] > 0
        assert (debug_run / d / "config.json").is_file() and (debug_run / d / "ds_config.json").is_file()
        assert (debug_run / d / "metrics.jsonl").is_file() and list((debug_run / d / "tb").iterdir())
        assert {"top1", "top5"} <= set(run["final"])
    for i in range(4):
        d = debug_run / "incubate" / f"module_{i}"
        run = json.loads((d / "run.json").read_text())
        # meta stages were frozen: bit-identical before and after training
        assert run["frozen_params"]["sha256_before"] == run["frozen_params"]["sha256_after"] is not None
        assert run["params_trainable"] < run["params_total"]
        header = ckpt.read_meta(d / "stage.safetensors")
        assert header["stage_index"] == i and header["meta_sha256"] == meta_sha and header["num_stages"] == 4
    # an incubation step costs less than an E2E step (stages before I run forward only)
    e2e = json.loads((debug_run / "e2e" / "run.json").read_text())["flops"]["train_step_per_image"]
    inc0 = json.loads((debug_run / "incubate/module_0/run.json").read_text())["flops"]["train_step_per_image"]
    inc3 = json.loads((debug_run / "incubate/module_3/run.json").read_text())["flops"]["train_step_per_image"]
    assert inc3 < inc0 < e2e


def test_incubated_stage_changed_from_its_init(debug_run):
    from dsincubate import dist, phases
    from dsincubate.config import RunConfig

    cfg = RunConfig.from_dict(json.loads((debug_run / "config.json").read_text()))
    for i in (0, 2):
        phase = phases.make("incubate", cfg, debug_run, 10, i)
        dist.seed_everything(cfg.seed)  # the engine builds the model right after seeding with cfg.seed
        init = phase.build_model(load=True).target_stage.state_dict()
        trained, _ = ckpt.load_tensors(debug_run / "incubate" / f"module_{i}" / "stage.safetensors")
        assert set(trained) == set(init)
        changed = [k for k in init if not torch.equal(trained[k], init[k])]
        assert len(changed) == len(init), set(init) - set(changed)


def test_eval_of_each_kind_of_model_agrees_with_what_its_phase_logged(debug_run, demo_root, tmp_path):
    kinds = ["meta", "hybrid:0", "hybrid:3", "assemble", "finetune", "e2e", "e2e_tune",
             str(debug_run / "export" / "finetune" / "model.safetensors")]
    p = dsi("eval", "--output", str(debug_run), "--model", ",".join(kinds), cwd=tmp_path, demo_root=demo_root)
    got = {r["model"]: r for r in (json.loads(ln) for ln in p.stdout.splitlines() if ln.startswith("{"))}
    assert set(got) == set(kinds)
    logged = lambda d: json.loads((debug_run / d / "run.json").read_text())["final"]  # noqa: E731
    summary = json.loads((debug_run / "summary.json").read_text())
    for kind, d in (("meta", "meta"), ("hybrid:0", "incubate/module_0"), ("hybrid:3", "incubate/module_3"),
                    ("finetune", "finetune"), ("e2e", "e2e"), ("e2e_tune", "e2e_tune"), (kinds[-1], "finetune")):
        assert got[kind]["top1"] == pytest.approx(logged(d)["top1"]), kind
        assert got[kind]["top5"] == pytest.approx(logged(d)["top5"]), kind
        assert got[kind]["val_samples"] == logged(d)["val_samples"] == 600
    assert got["assemble"]["top1"] == pytest.approx(summary["deep_incubation"]["assembled_top1"])
    assert summary["e2e_tune"]["device_hours"] > summary["e2e"]["device_hours"]


def _trained_model(path: Path) -> staged.StagedModel:
    """A phase's whole-model output rebuilt from its own header, in eval mode."""
    tensors, header = ckpt.load_tensors(path)
    model = staged.StagedModel(staged.divide(vit.build(vit.ModelSpec.from_json(header["spec"])),
                                             header["stage_depths"])).eval()
    model.load_state_dict(tensors)
    return model


def test_export_loads_into_fresh_timm_model_with_identical_logits(debug_run):
    for source in ("finetune", "e2e"):
        out = debug_run / "export" / source
        args = json.loads((out / "model.json").read_text())
        model = timm.create_model(args.pop("model_name"), pretrained=False, **args).eval()
        tensors, _ = ckpt.load_tensors(out / "model.safetensors")
        model.load_state_dict(tensors, strict=True)
        sm = _trained_model(debug_run / source / "model.safetensors")
        x = torch.randn(4, 3, 32, 32)
        with torch.no_grad():
            assert torch.equal(model(x), sm(x))


TIMM_LOADS = r"""
import json, sys
import safetensors.torch, timm, torch
out, ref = sys.argv[1], torch.load(sys.argv[2], weights_only=True)
mj = json.load(open(out + "/model.json"))
n = mj["num_classes"]
ways = {
    "local-dir": lambda: timm.create_model("local-dir:" + out, pretrained=True),
    "model.json overlay": lambda: timm.create_model(**mj, pretrained=True),
    "overlay + num_classes": lambda: timm.create_model(mj["model_name"], pretrained=True, num_classes=n,
        img_size=mj["img_size"], patch_size=mj["patch_size"], embed_dim=mj["embed_dim"], depth=mj["depth"],
        num_heads=mj["num_heads"], pretrained_cfg_overlay=mj["pretrained_cfg_overlay"]),
    "checkpoint_path": lambda: timm.create_model(**{k: v for k, v in mj.items() if k != "pretrained_cfg_overlay"},
                                                 checkpoint_path=out + "/model.safetensors"),
}
for name, make in ways.items():
    with torch.no_grad():
        got = make().eval()(ref["x"])
    assert torch.equal(got, ref["logits"]), name
assert "dsincubate" not in sys.modules
print("ok", len(ways))
"""


def test_export_loads_with_the_trained_head_every_way_timm_loads_local_weights(debug_run, tmp_path):
    import subprocess
    import sys

    checks = {}
    for source in ("finetune", "e2e"):
        sm = _trained_model(debug_run / source / "model.safetensors")
        x = torch.randn(3, 3, 32, 32)
        with torch.no_grad():
            torch.save({"x": x, "logits": sm(x)}, tmp_path / f"ref_{source}.pt")
        # a process that never imports dsincubate, started outside the checkout; the two sources' side by side
        checks[source] = subprocess.Popen(
            [sys.executable, "-c", TIMM_LOADS, str(debug_run / "export" / source), str(tmp_path / f"ref_{source}.pt")],
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for source, p in checks.items():
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0 and out.strip() == "ok 4", (source, err[-2000:])


def test_rerun_skips_complete_phases_and_changes_nothing(debug_run, demo_root):
    before = tree_digest(debug_run)
    p = dsi("pipeline", "--recipe", "debug", "--output", str(debug_run), cwd=debug_run.parent, demo_root=demo_root)
    assert "already complete" in p.stdout
    after = tree_digest(debug_run)
    assert {k: v for k, v in after.items() if k != "summary.json"} == \
        {k: v for k, v in before.items() if k != "summary.json"}


def test_resume_after_stop_equals_uninterrupted_run(tmp_path, demo_root):
    common = ["--recipe", "debug", "--set", "e2e.epochs=3", "--set", "e2e.ckpt_every=1"]
    # the uninterrupted run beside the interrupted ones (independent processes, one core each)
    a = dsi_started("e2e", "--output", str(tmp_path / "a"), *common, cwd=tmp_path, demo_root=demo_root,
                    log=tmp_path / "a.log")
    try:
        for _ in range(3):  # stopped after every epoch, resumed by re-running the same command
            dsi("e2e", "--output", str(tmp_path / "b"), *common, "--set", "stop_after_epochs=1", cwd=tmp_path,
                demo_root=demo_root)
    except BaseException:
        a.kill()
        a.wait()
        raise
    dsi_finished(a, tmp_path / "a.log")
    a, _ = ckpt.load_tensors(tmp_path / "a" / "e2e" / "model.safetensors")
    b, _ = ckpt.load_tensors(tmp_path / "b" / "e2e" / "model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    ra = json.loads((tmp_path / "a" / "e2e" / "run.json").read_text())
    rb = json.loads((tmp_path / "b" / "e2e" / "run.json").read_text())
    assert ra["final"]["top1"] == rb["final"]["top1"] and ra["images_processed"] == rb["images_processed"]


def test_two_ranks_zero3_bf16_through_the_deepspeed_launcher(tmp_path, demo_root):
    root = tmp_path / "z3"
    ds = Path(sys.executable).parent / "deepspeed"
    cmd = [str(ds), "--num_accelerators", "2", "--master_port", "29531", "--module", "dsincubate", "pipeline",
           "--recipe", "debug", "--ds-config", "zero3_bf16", "--output", str(root),
           "--set", f"data.demo_root={demo_root}"]
    p = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=1500)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    for d in ["meta", "finetune", "e2e"] + [f"incubate/module_{i}" for i in range(4)]:
        run = json.loads((root / d / "run.json").read_text())
        assert run["world_size"] == 2 and run["ds_config"]["zero_optimization"]["stage"] == 3
        assert run["ds_config"]["bf16"]["enabled"]
        if d.startswith("incubate"):
            assert run["frozen_params"]["sha256_before"] == run["frozen_params"]["sha256_after"]
    tensors, _ = ckpt.load_tensors(root / "export" / "finetune" / "model.safetensors")
    args = json.loads((root / "export" / "finetune" / "model.json").read_text())
    timm.create_model(args.pop("model_name"), **args).load_state_dict(tensors, strict=True)
    assert all(t.dtype == torch.float32 for t in tensors.values())  # fp32 master weights, not bf16 copies
    # DeepSpeed's CPU all-reduce buffers (69 MB per rank in /dev/shm) must not outlive the run
    assert not list(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*_29531_*"))


def _bad_stage_copy(debug_run, tmp_path, index_from, **header_changes):
    tensors, header = ckpt.load_tensors(debug_run / "incubate" / f"module_{index_from}" / "stage.safetensors")
    header.update(header_changes)
    path = tmp_path / f"stage_{index_from}_{len(header_changes)}.safetensors"
    ckpt.save_tensors(path, tensors, header)
    return path


def test_diverging_run_stops_with_one_line_error_and_saves_nothing(tmp_path, demo_root):
    out = tmp_path / "diverge"
    p = dsi("e2e", "--recipe", "debug", "--output", str(out), "--set", "e2e.lr=1e12", "--set", "e2e.warmup_epochs=0",
            cwd=tmp_path, demo_root=demo_root, check=False)
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
    err = [line for line in p.stderr.splitlines() if line.startswith("dsincubate: error:")]
    assert len(err) == 1 and "non-finite loss" in err[0], p.stderr[-2000:]
    assert not (out / "e2e" / "MANIFEST.json").exists() and not (out / "e2e" / "model.safetensors").exists()
    assert not list((out / "e2e").glob("checkpoints/*/MANIFEST.json"))


BAD_INPUTS = [
    (["incubate", "--module", "0", "--output", "{empty}"], "meta checkpoint missing"),
    (["incubate", "--module", "1", "--set", "model.embed_dim=96"], "trained for another model: embed_dim 48"),
    (["incubate", "--module", "4"], "out of range"),
    (["meta", "--set", "model.num_stages=9"], "does not fit"),
    (["meta", "--set", "model.preset=vit_nope"], "unknown model"),
    (["meta", "--train", "/nonexistent/train-{000..003}.tar", "--val", "/nonexistent/val.tar"], "/nonexistent"),
    (["meta", "--train", "{emptydir}", "--val", "{emptydir}"], "{emptydir}"),
    (["meta", "--ds-config", "{badjson}"], "invalid JSON"),
    (["meta", "--set", "meta.grad_accum=2", "--ds-config", "{accumjson}"], "set both"),
    (["e2e", "--set", "e2e.epochs=5"], "another config"),
    (["assemble", "--stages", "{s0}", "{s0}", "{s2}", "{s3}"], "are both module 0"),
    (["assemble", "--stages", "{s0}", "{s1}", "{s2}"], "no stage file for module(s) [3]"),
    (["assemble", "--stages", "{s0}", "{s1}", "{s2}", "{othermeta}"], "has another meta model"),
    # a wrong m2mKD teacher file is refused before the meta model trains, not after it
    (["pipeline", "--methods", "m2mkd", "--output", "{empty}", "--set", "m2mkd.teacher={badjson}"],
     "not a readable safetensors checkpoint"),
    (["pipeline", "--methods", "m2mkd", "--output", "{empty}", "--set", "m2mkd.teacher={e2emodel}",
      "--set", "model.num_stages=2"], "divided into 4 modules"),
]


SUBPROCESS_CASES = {0, 7, 10}  # a few through the real command; the rest in-process through cli.main(argv)


@pytest.mark.parametrize("case", range(len(BAD_INPUTS)), ids=[" ".join(a[:3]) for a, _ in BAD_INPUTS])
def test_bad_input_gives_one_line_error_and_touches_nothing(debug_run, demo_root, tmp_path, case, capsys,
                                                            monkeypatch):
    args, message = BAD_INPUTS[case]
    (tmp_path / "emptydir").mkdir()
    (tmp_path / "bad.json").write_text('{"zero_optimization": {"stage": 3},')
    (tmp_path / "accum.json").write_text('{"gradient_accumulation_steps": 4}')
    stage = lambda i: str(debug_run / "incubate" / f"module_{i}" / "stage.safetensors")  # noqa: E731
    subs = {"{empty}": str(tmp_path / "fresh"), "{emptydir}": str(tmp_path / "emptydir"),
            "{badjson}": str(tmp_path / "bad.json"), "{accumjson}": str(tmp_path / "accum.json"),
            "{s0}": stage(0), "{s1}": stage(1), "{s2}": stage(2), "{s3}": stage(3),
            "{othermeta}": str(_bad_stage_copy(debug_run, tmp_path, 3, meta_sha256="0" * 64)),
            "{e2emodel}": str(debug_run / "e2e" / "model.safetensors")}
    for k, v in subs.items():  # whole arguments and values inside --set k=v
        args = [a.replace(k, v) for a in args]
    message = subs.get(message, message)
    if "--output" not in args:
        args += ["--output", str(debug_run)]
    before = tree_digest(debug_run)
    if case in SUBPROCESS_CASES:
        p = dsi(*args, "--recipe", "debug", cwd=tmp_path, demo_root=demo_root, check=False)
        code, stderr = p.returncode, p.stderr
    else:
        from dsincubate import cli

        monkeypatch.chdir(tmp_path)
        code = cli.main([*args, "--recipe", "debug", "--set", f"data.demo_root={demo_root}"])
        stderr = capsys.readouterr().err
    assert code == 2, stderr[-2000:]
    err = [line for line in stderr.splitlines() if line.startswith("dsincubate: error:")]
    assert len(err) == 1 and message in err[0], stderr[-2000:]
    assert [ln for ln in stderr.splitlines() if ln.strip()] == err  # nothing else: no library warning before it
    assert "Traceback" not in stderr
    assert tree_digest(debug_run) == before
    assert not (tmp_path / "fresh").exists()  # nothing written, not even the run directory


def test_error_after_the_engine_started_prints_no_library_warning_before_its_line(tmp_path, demo_root):
    """Too much bad data is only seen while training: the error line is the last line, and every line before it is
    the data warnings naming shard and key (no DeepSpeed or torch warning in front)."""
    import io
    import tarfile

    from dsincubate.data.synth import id_image, id_samples
    from dsincubate.data.writer import image_bytes, write_shards

    classes = [f"c{i}" for i in range(10)]
    man = write_shards(id_samples(200), str(tmp_path / "train"), classes, maxcount=50, progress=False)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:  # the first shard loses its labels
        for key in man["shards"][0]["keys"]:
            data = image_bytes(id_image(int(key[1:])))
            info = tarfile.TarInfo(f"{key}.png")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    (tmp_path / "train" / man["shards"][0]["name"]).write_bytes(buf.getvalue())
    write_shards(id_samples(60, start=500), str(tmp_path / "val"), classes, progress=False)
    p = dsi("e2e", "--recipe", "debug", "--output", str(tmp_path / "run"), "--train", str(tmp_path / "train"),
            "--val", str(tmp_path / "val"), cwd=tmp_path, demo_root=demo_root, check=False)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and lines[-1].startswith("dsincubate: error: too much bad data"), p.stderr[-2000:]
    others = [ln for ln in lines[:-1] if "bad data" not in ln and "bad-data" not in ln]
    assert others == [], others
    assert not (tmp_path / "run" / "e2e" / "MANIFEST.json").exists()


def test_meta_init_and_high_resolution_finetune_run_through_the_real_pipeline(debug_run, demo_root, tmp_path):
    """A meta model built from the debug run's fine-tuned model (model.meta_init) feeds a whole Deep Incubation
    pipeline whose fine-tune runs at 1.5x the resolution: every phase completes, the assembled target keeps the
    target's width and depth, and the export records the new size."""
    root = tmp_path / "reuse"
    dsi("pipeline", "--recipe", "debug", "--methods", "di", "--output", str(root), "--set",
        f"model.meta_init={debug_run}", "--set", "finetune.img_size=48", cwd=tmp_path, demo_root=demo_root)
    assert json.loads((root / "meta" / "config_key.json").read_text())["model"]["meta_init"] == str(debug_run)
    assembled, _ = ckpt.load_tensors(root / "assemble" / "model.safetensors")
    source, _ = ckpt.load_tensors(debug_run / "finetune" / "model.safetensors")
    assert {k: v.shape for k, v in assembled.items()} == {k: v.shape for k, v in source.items()}
    tuned, header = ckpt.load_tensors(root / "finetune" / "model.safetensors")
    spec = vit.ModelSpec.from_json(header["spec"]).kwargs
    assert spec["img_size"] == 48 and tuned["stages.0.pos_embed"].shape[1] == 1 + (48 // spec["patch_size"]) ** 2
    assert json.loads((root / "export" / "finetune" / "model.json").read_text())["img_size"] == 48


def test_cross_width_meta_model_incubates_a_target_of_another_width_through_the_real_pipeline(cross_width_launch):
    """A meta model of width 32 incubates the debug target (width 48) through stitch layers: every phase
    completes and the assembled and fine-tuned models have the target's width throughout."""
    root, started, log = cross_width_launch  # its own fresh run (started beside debug_run's when both are selected)
    dsi_finished(started, log)
    meta, _ = ckpt.load_tensors(root / "meta" / "model.safetensors")
    assert meta["stages.0.cls_token"].shape[-1] == 32
    for name in ("assemble", "finetune"):
        tensors, header = ckpt.load_tensors(root / name / "model.safetensors")
        assert vit.ModelSpec.from_json(header["spec"]).kwargs["embed_dim"] == 48
        assert {t.shape[-1] for k, t in tensors.items() if k.endswith(("norm1.weight", "cls_token"))} == {48}
    assert json.loads((root / "summary.json").read_text())["deep_incubation"]["top1"] is not None


def test_m2mkd_module_trains_through_the_engine_with_meta_and_teacher_frozen(debug_run, demo_root, tmp_path):
    """One m2mKD job through the real command: a new run directory holding the debug run's meta model, the debug
    run's E2E model as teacher; the frozen parameters (meta and teacher) hash the same before and after."""
    import shutil

    root = tmp_path / "kd"
    root.mkdir()
    shutil.copytree(debug_run / "meta", root / "meta")
    dsi("m2mkd", "--module", "1", "--recipe", "debug", "--output", str(root), "--set",
        f"m2mkd.teacher={debug_run / 'e2e' / 'model.safetensors'}", cwd=tmp_path, demo_root=demo_root)
    run = json.loads((root / "m2mkd" / "module_1" / "run.json").read_text())
    assert run["frozen_params"]["sha256_before"] == run["frozen_params"]["sha256_after"] is not None
    header = ckpt.read_meta(root / "m2mkd" / "module_1" / "stage.safetensors")
    assert header["objective"] == "m2mkd" and header["stage_index"] == 1
