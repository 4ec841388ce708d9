"""Integration test of the Swin family: the real `dsincubate` command on the `swin_debug` recipe (timm's Swin, stages
of 1/1/2/1 blocks, width 32, 32 px demo images, K = 4: one module per Swin stage) through DeepSpeed engines: meta,
incubation (one job per module), assembly, fine-tuning, E2E, eval, an export that timm loads by itself, and resume.
Slow tier (`-m integration`); the helpers and the session's demo data are the ResNet pipeline test's and conftest's.
The 2-rank ZeRO-3 build of both families is tests/integration/test_family_zero3.py."""
import json

import pytest
import timm
import torch
from test_resnet_pipeline import dsi, family_run, resumed_e2e_equals_the_pipelines, staged_model

from dsincubate import checkpoint as ckpt

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def swin_run(tmp_path_factory, demo_root):
    return family_run(tmp_path_factory, demo_root, "swin_debug")


def test_every_phase_of_a_swin_runs_with_meta_frozen_and_each_module_saving_its_swin_stage(swin_run):
    meta_sha = ckpt.read_manifest(swin_run / "meta")["files"]["model.safetensors"]["sha256"]
    for d in ["meta", "assemble", "finetune", "e2e"] + [f"incubate/module_{i}" for i in range(4)]:
        assert ckpt.complete(swin_run / d), d
    for i in range(4):
        d = swin_run / "incubate" / f"module_{i}"
        run = json.loads((d / "run.json").read_text())
        assert run["frozen_params"]["sha256_before"] == run["frozen_params"]["sha256_after"] is not None
        tensors, header = ckpt.load_tensors(d / "stage.safetensors")
        assert header["index"] == i and header["meta_sha256"] == meta_sha and header["stage_depths"] == [1, 1, 1, 1]
        # the target's Swin stage i: its blocks (2 in stage 2), its patch merging after stage 0
        assert len({k.split(".")[3] for k in tensors if k.startswith("blocks.0.blocks.")}) == (2 if i == 2 else 1)
        assert any(k.startswith("blocks.0.downsample.") for k in tensors) == (i > 0)
        assert ("patch_embed.proj.weight" in tensors) == (i == 0) and ("head.fc.weight" in tensors) == (i == 3)


def test_eval_of_a_swins_models_agrees_with_what_its_phases_logged(swin_run, demo_root, tmp_path):
    exported = str(swin_run / "export" / "finetune" / "model.safetensors")
    kinds = ["meta", "hybrid:2", "assemble", "finetune", "e2e", exported]
    p = dsi("eval", "--output", str(swin_run), "--model", ",".join(kinds), cwd=tmp_path, demo_root=demo_root)
    got = {r["model"]: r for r in (json.loads(ln) for ln in p.stdout.splitlines() if ln.startswith("{"))}
    assert set(got) == set(kinds)
    logged = lambda d: json.loads((swin_run / d / "run.json").read_text())["final"]  # noqa: E731
    for kind, d in (("meta", "meta"), ("hybrid:2", "incubate/module_2"), ("finetune", "finetune"),
                    ("e2e", "e2e"), (exported, "finetune")):
        assert got[kind]["top1"] == pytest.approx(logged(d)["top1"]), kind


def test_swin_export_loads_into_timm_alone_with_identical_logits(swin_run):
    for source in ("finetune", "e2e"):
        out = swin_run / "export" / source
        model_json = json.loads((out / "model.json").read_text())
        ref = staged_model(swin_run / source / "model.safetensors")
        x = torch.randn(4, 3, 32, 32)
        with torch.no_grad():
            want = ref(x)
            for way in (lambda: timm.create_model("local-dir:" + str(out), pretrained=True),
                        lambda: timm.create_model(**model_json, pretrained=True)):
                model = way().eval()
                assert type(model).__name__ == "SwinTransformer" and torch.equal(model(x), want), source


def test_swin_resume_after_stop_equals_uninterrupted_run(swin_run, demo_root):
    resumed_e2e_equals_the_pipelines(swin_run, "swin_debug", demo_root)
