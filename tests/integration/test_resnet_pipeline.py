"""Integration test of the CIFAR ResNet family: the real `dsincubate` command on the `resnet_debug` recipe (3 stages of
2 basic blocks, K = 3) and the built-in demo data, every phase through DeepSpeed engines: meta, incubation (one job
per module), assembly, fine-tuning, E2E, eval, export and resume; its 2-rank ZeRO-3 build is test_family_zero3.py.
Slow tier (`-m integration`); the demo data is the session's (conftest.py). The helpers here (`family_run`, `dsi`,
`staged_model`, `incubated_stages`, `eval_agrees_with_the_logs`, `resumed_e2e_equals_the_pipelines`) serve
test_swin_pipeline.py too."""
import json
import os
import subprocess
import sys

import pytest
import torch

from dsincubate import checkpoint as ckpt
from dsincubate.models import family

pytestmark = pytest.mark.integration
ENV = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


# E2E trains 2 epochs with a checkpoint after each: the resume test restarts a run stopped after epoch 1 and
# compares it with the pipeline's E2E, so no third, uninterrupted run is needed
E2E_SETS = ("--set", "e2e.epochs=2", "--set", "e2e.ckpt_every=1")


def dsi_cmd(*args, demo_root):
    return [sys.executable, "-m", "dsincubate", *args, "--set", f"data.demo_root={demo_root}"]


def dsi(*args, cwd, demo_root):
    cmd = dsi_cmd(*args, demo_root=demo_root)
    p = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


def stopped_e2e(recipe, out) -> tuple:
    """The arguments of `dsincubate e2e` of `recipe` with E2E_SETS into `out`, stopped after one epoch (run again:
    resumed)."""
    return "e2e", "--recipe", recipe, "--output", str(out), *E2E_SETS, "--set", "stop_after_epochs=1"


def family_run(tmp_path_factory, demo_root, recipe):
    """`dsincubate pipeline --methods di,e2e` of `recipe` (E2E_SETS) in <tmp>/run and, side by side with it (each
    process uses one of the CI machine's 2 cores), the first half of the resume test: `stopped_e2e` in
    <tmp>/stopped. Returns <tmp>/run."""
    root = tmp_path_factory.mktemp(recipe) / "run"
    log = root.parent / "stopped.log"
    with open(log, "wb") as f:
        stopped = subprocess.Popen(dsi_cmd(*stopped_e2e(recipe, root.parent / "stopped"), demo_root=demo_root),
                                   cwd=root.parent, env=ENV, stdout=f, stderr=subprocess.STDOUT)
    try:
        dsi("pipeline", "--recipe", recipe, "--methods", "di,e2e", "--output", str(root), *E2E_SETS,
            cwd=root.parent, demo_root=demo_root)
    finally:
        if stopped.poll() is None and not root.exists():  # the pipeline failed to start: do not wait for it
            stopped.kill()
        rc = stopped.wait(timeout=900)
    assert rc == 0, f"{' '.join(stopped.args)} failed ({rc}):\n{log.read_text(errors='replace')[-3000:]}"
    return root


def resumed_e2e_equals_the_pipelines(run, recipe, demo_root) -> dict:
    """Resume `family_run`'s stopped E2E to its end; assert it equals the pipeline's uninterrupted E2E bit for bit
    (weights, persistent buffers, accuracy, images seen); return its tensors."""
    out = run.parent / "stopped"
    dsi(*stopped_e2e(recipe, out), cwd=run.parent, demo_root=demo_root)
    a, _ = ckpt.load_tensors(run / "e2e" / "model.safetensors")
    b, _ = ckpt.load_tensors(out / "e2e" / "model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    ra = json.loads((run / "e2e" / "run.json").read_text())
    rb = json.loads((out / "e2e" / "run.json").read_text())
    assert ra["final"]["top1"] == rb["final"]["top1"] and ra["images_processed"] == rb["images_processed"]
    return b


@pytest.fixture(scope="module")
def resnet_run(tmp_path_factory, demo_root):
    return family_run(tmp_path_factory, demo_root, "resnet_debug")


def staged_model(path):
    """The staged model a phase saved at `path` (its header names the spec and the division), in eval mode."""
    tensors, header = ckpt.load_tensors(path)
    model = family.build_staged(family.ModelSpec.from_json(header["spec"]), header["stage_depths"]).eval()
    model.load_state_dict(tensors, strict=True)
    return model


def incubated_stages(run, depths: list) -> list[dict]:
    """Assert every phase of `run` completed and each incubation job kept the meta model frozen and saved its stage
    of the division `depths` against this meta model; return the K stage files' tensors."""
    meta_sha = ckpt.read_manifest(run / "meta")["files"]["model.safetensors"]["sha256"]
    for d in ["meta", "assemble", "finetune", "e2e"] + [f"incubate/module_{i}" for i in range(len(depths))]:
        assert ckpt.complete(run / d), d
    stages = []
    for i in range(len(depths)):
        d = run / "incubate" / f"module_{i}"
        record = json.loads((d / "run.json").read_text())
        assert record["frozen_params"]["sha256_before"] == record["frozen_params"]["sha256_after"] is not None
        tensors, header = ckpt.load_tensors(d / "stage.safetensors")
        assert header["stage_index"] == i and header["meta_sha256"] == meta_sha and header["stage_depths"] == depths
        stages.append(tensors)
    return stages


def eval_agrees_with_the_logs(run, demo_root, cwd, stage_index: int) -> None:
    """`dsincubate eval` of every kind of model of `run` (hybrid: module `stage_index`'s) gives the top-1 its phase
    logged."""
    exported = str(run / "export" / "finetune" / "model.safetensors")
    hybrid = f"hybrid:{stage_index}"
    kinds = ["meta", hybrid, "assemble", "finetune", "e2e", exported]
    p = dsi("eval", "--output", str(run), "--model", ",".join(kinds), cwd=cwd, demo_root=demo_root)
    got = {r["model"]: r for r in (json.loads(ln) for ln in p.stdout.splitlines() if ln.startswith("{"))}
    assert set(got) == set(kinds)
    logged = lambda d: json.loads((run / d / "run.json").read_text())["final"]  # noqa: E731
    for kind, d in (("meta", "meta"), (hybrid, f"incubate/module_{stage_index}"), ("finetune", "finetune"),
                    ("e2e", "e2e"), (exported, "finetune")):
        assert got[kind]["top1"] == pytest.approx(logged(d)["top1"]), kind


def test_every_phase_of_a_resnet_runs_with_meta_frozen_and_batchnorm_statistics_saved(resnet_run):
    for i, tensors in enumerate(incubated_stages(resnet_run, [2, 2, 2])):
        assert any(k.endswith("running_mean") for k in tensors)  # a BN's statistics travel with its stage
        assert ("conv1.weight" in tensors) == (i == 0) and ("fc.weight" in tensors) == (i == 2)


def test_eval_of_a_resnets_models_agrees_with_what_its_phases_logged(resnet_run, demo_root, tmp_path):
    eval_agrees_with_the_logs(resnet_run, demo_root, tmp_path, 1)


def test_resnet_export_rebuilds_from_its_model_json_with_identical_logits(resnet_run):
    for source in ("finetune", "e2e"):
        out = resnet_run / "export" / source
        info = json.loads((out / "model.json").read_text())
        rebuilt = family.build(family.ModelSpec.from_json(info["spec"])).eval()
        tensors, _ = ckpt.load_tensors(out / "model.safetensors")
        rebuilt.load_state_dict(tensors, strict=True)
        x = torch.randn(4, 3, 32, 32)
        with torch.no_grad():
            assert torch.equal(rebuilt(x), staged_model(resnet_run / source / "model.safetensors")(x))


def test_resnet_resume_after_stop_equals_uninterrupted_run(resnet_run, demo_root):
    tensors = resumed_e2e_equals_the_pipelines(resnet_run, "resnet_debug", demo_root)
    assert any("running_var" in k for k in tensors)  # BN statistics resumed too
