"""Integration test of the Swin family: the real `dsincubate` command on the `swin_debug` recipe (timm's Swin, stages
of 1/1/2/1 blocks, width 32, 32 px demo images, K = 4: one module per Swin stage) through DeepSpeed engines: meta,
incubation (one job per module), assembly, fine-tuning, E2E, eval, an export that timm loads by itself, and resume.
Slow tier (`-m integration`); the helpers and the session's demo data are the ResNet pipeline test's and conftest's.
The 2-rank ZeRO-3 build of both families is tests/integration/test_family_zero3.py."""
import json

import pytest
import timm
import torch
from test_resnet_pipeline import (eval_agrees_with_the_logs, family_run, incubated_stages,
                                  resumed_e2e_equals_the_pipelines, staged_model)


pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def swin_run(tmp_path_factory, demo_root):
    return family_run(tmp_path_factory, demo_root, "swin_debug")


def test_every_phase_of_a_swin_runs_with_meta_frozen_and_each_module_saving_its_swin_stage(swin_run):
    for i, tensors in enumerate(incubated_stages(swin_run, [1, 1, 1, 1])):
        # the target's Swin stage i: its blocks (2 in stage 2), its patch merging after stage 0
        assert len({k.split(".")[3] for k in tensors if k.startswith("blocks.0.blocks.")}) == (2 if i == 2 else 1)
        assert any(k.startswith("blocks.0.downsample.") for k in tensors) == (i > 0)
        assert ("patch_embed.proj.weight" in tensors) == (i == 0) and ("head.fc.weight" in tensors) == (i == 3)


def test_eval_of_a_swins_models_agrees_with_what_its_phases_logged(swin_run, demo_root, tmp_path):
    eval_agrees_with_the_logs(swin_run, demo_root, tmp_path, 2)


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
