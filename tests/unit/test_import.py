"""`dsincubate import`: files in the official code's format (generated here: `model`, `model_stages`, `args`,
optimizer state) become this project's meta, stage and model outputs with identical weights and logits, or are
refused in one line with nothing written.

    pytest tests/unit/test_import.py -q
"""
import argparse
import json

import pytest
import torch

from dsincubate import checkpoint as ckpt, cli, phases, recipes
from dsincubate.assemble import assemble
from dsincubate.config import apply_overrides
from dsincubate.layout import RunLayout
from dsincubate.models import staged, vit

SMALL = ["model.depth=4", "model.embed_dim=24", "model.num_heads=2", "model.num_stages=2", "model.img_size=16",
         "model.patch_size=8", "model.kernel_backend=torch", "model.num_classes=10"]
CFG = apply_overrides(recipes.get("debug"), SMALL)


def _official(path, stages: list[torch.nn.Module]):
    """What the official main.py saves: the full model (whose `stages.<i>.` keys repeat the blocks), the per-stage
    state dicts, its argparse args and optimizer state."""
    model = {}
    for i, s in enumerate(stages):
        for k, v in s.state_dict().items():
            model[f"stages.{i}.{k}"] = v.clone()
    torch.save({"model": model, "model_stages": [s.state_dict() for s in stages], "epoch": 99,
                "args": argparse.Namespace(model="vit", lr=5e-4, divided_depths=[2, 2]),
                "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3}]}}, path)


def _target():
    torch.manual_seed(1)
    return staged.StagedModel(staged.divide(vit.build(phases.make("e2e", CFG, "/x", 10).target_spec()), [2, 2])).eval()


def _import(path, root, *extra):
    return cli.main(["import", str(path), "--recipe", "debug", "--output", str(root), *extra] +
                    [a for s in SMALL for a in ("--set", s)])


def test_official_model_file_round_trips_to_identical_logits(tmp_path):
    model = _target()
    _official(tmp_path / "vit.pth", list(model.stages))
    assert _import(tmp_path / "vit.pth", tmp_path / "run") == 0
    tensors, header = ckpt.load_tensors(RunLayout(tmp_path / "run").model("finetune"))
    again = staged.StagedModel(staged.divide(vit.build(vit.ModelSpec.from_json(header["spec"])), [2, 2])).eval()
    again.load_state_dict(tensors, strict=True)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
    assert ckpt.complete(tmp_path / "run" / "finetune")
    assert json.loads((tmp_path / "run" / "finetune" / "run.json").read_text())["imported_from"].endswith("vit.pth")


def test_official_meta_and_incubated_files_feed_incubation_and_assembly(tmp_path):
    root = tmp_path / "run"
    torch.manual_seed(2)
    meta = phases.build_meta_model(CFG, 10).eval()
    _official(tmp_path / "meta.pth", list(meta.stages))
    assert _import(tmp_path / "meta.pth", root) == 0
    incubate = phases.make("incubate", CFG, root, 10, 1)  # resolves the imported meta model like a trained one
    hybrid = incubate.build_model()
    assert torch.equal(hybrid.stages[0].blocks[0].attn.qkv.weight, meta.stages[0].blocks[0].attn.qkv.weight)
    target = _target()
    for i in range(2):  # the official incubation file of module i: the hybrid's stages, target stage i at depth 2
        stages = [target.stages[j] if j == i else meta.stages[j] for j in range(2)]
        _official(tmp_path / f"inc{i}.pth", stages)
        assert _import(tmp_path / f"inc{i}.pth", root) == 0
        header = ckpt.read_meta(RunLayout(root).stage(i))
        assert header["stage_index"] == i and header["meta_sha256"] == phases.meta_checkpoint(CFG, root, 10)[1]
    assembled, _ = ckpt.load_tensors(assemble(root, None, 2))
    assert all(torch.equal(assembled[k], v) for k, v in target.state_dict().items())


def test_file_of_another_architecture_is_refused_naming_keys_and_writes_nothing(tmp_path, capsys):
    model = _target()
    stages = [s.state_dict() for s in model.stages]
    for s in stages:  # the official ViT-H has no qkv bias: such a file does not fit a model with one
        for k in [k for k in s if k.endswith("attn.qkv.bias")]:
            del s[k]
    torch.save({"model_stages": stages}, tmp_path / "nobias.pth")
    assert _import(tmp_path / "nobias.pth", tmp_path / "run") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "qkv.bias" in err[0]
    assert not (tmp_path / "run").exists()


class NotAllowed:  # any class outside the weights-only allow list
    pass


@pytest.mark.parametrize("payload", [NotAllowed(), {"model": {}}, [1, 2], {"model_stages": ["x"]}])
def test_unsafe_or_foreign_pickles_are_refused_in_one_line(tmp_path, capsys, payload):
    torch.save(payload, tmp_path / "f.pth")
    assert _import(tmp_path / "f.pth", tmp_path / "run") == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("form", ["run_dir", "timm_safetensors", "timm_pth"])
def test_meta_init_takes_each_stage_last_block_the_embedding_and_head_of_a_trained_model(tmp_path, form):
    from safetensors.torch import save_file

    from dsincubate.importer import meta_from_model

    target = _target()  # depths [2, 2]: meta stage 0 <- block 1, meta stage 1 <- block 3
    timm_keys = staged.timm_state_dict(target)
    if form == "run_dir":
        _official(tmp_path / "vit.pth", list(target.stages))
        assert _import(tmp_path / "vit.pth", tmp_path / "run") == 0
        source = tmp_path / "run"
    elif form == "timm_safetensors":
        source = tmp_path / "m.safetensors"
        save_file({k: v.contiguous() for k, v in timm_keys.items()}, str(source))
    else:
        source = tmp_path / "m.pth"
        torch.save({"model": timm_keys, "epoch": 3}, source)
    meta = meta_from_model(CFG, 10, source)
    assert torch.equal(meta["stages.0.blocks.0.mlp.fc1.weight"], timm_keys["blocks.1.mlp.fc1.weight"])
    assert torch.equal(meta["stages.1.blocks.0.attn.qkv.weight"], timm_keys["blocks.3.attn.qkv.weight"])
    for k in ("pos_embed", "cls_token", "patch_embed.proj.weight"):
        assert torch.equal(meta[f"stages.0.{k}"], timm_keys[k])
    assert torch.equal(meta["stages.1.head.weight"], timm_keys["head.weight"])
    model = phases.build_meta_model(CFG, 10)
    model.load_state_dict(meta, strict=True)  # exactly the meta model's tensors


def test_meta_init_from_another_width_is_refused(tmp_path):
    from dsincubate.importer import meta_from_model
    from dsincubate.errors import UserError

    wide = apply_overrides(recipes.get("debug"), SMALL + ["model.embed_dim=32"])
    model = staged.StagedModel(staged.divide(vit.build(phases.make("e2e", wide, "/x", 10).target_spec()), [2, 2]))
    torch.save(staged.timm_state_dict(model), tmp_path / "wide.pth")
    with pytest.raises(UserError, match="does not fit"):
        meta_from_model(CFG, 10, tmp_path / "wide.pth")


def test_meta_phase_with_meta_init_starts_from_the_trained_model_and_records_it(tmp_path):
    from dsincubate.errors import UserError
    from dsincubate.importer import meta_from_model

    target = _target()
    torch.save(staged.timm_state_dict(target), tmp_path / "trained.pth")
    cfg = apply_overrides(CFG, [f"model.meta_init={tmp_path / 'trained.pth'}"])
    phase = phases.make("meta", cfg, tmp_path / "run", 10)
    model = phase.build_model()
    want = meta_from_model(cfg, 10, tmp_path / "trained.pth")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in want.items())
    assert phase.config_key()["model"]["meta_init"] == str(tmp_path / "trained.pth")  # another init: another output
    with pytest.raises(UserError, match="meta_init"):
        phases.make("meta", apply_overrides(CFG, ["model.meta_init=/nonexistent/x.pth"]), tmp_path / "run", 10)


def _assembled_run(root):
    """A run directory holding an assembled model, as `dsincubate assemble` leaves it."""
    model = _target()
    spec = phases.make("e2e", CFG, root, 10).target_spec(0.0)
    out = RunLayout(root).assemble_dir
    out.mkdir(parents=True)
    ckpt.save_tensors(out / "model.safetensors", dict(model.state_dict()),
                      {"kind": "assembled", "spec": spec.to_json(), "num_stages": 2, "stage_depths": [2, 2]})
    ckpt.write_manifest(out, ["model.safetensors"])
    return model


def test_high_resolution_finetune_starts_from_the_assembled_model_with_a_resampled_position_embedding(tmp_path):
    from timm.layers import resample_abs_pos_embed

    assembled = _assembled_run(tmp_path)
    same = phases.make("finetune", CFG, tmp_path, 10).build_model().eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():  # at the model's own resolution: exactly the assembled model
        assert torch.equal(same(x), assembled(x))
    hires = phases.make("finetune", apply_overrides(CFG, ["finetune.img_size=32"]), tmp_path, 10)
    assert hires.img_size == 32 and hires.target_spec().kwargs["img_size"] == 32
    model = hires.build_model().eval()
    old = assembled.state_dict()
    for k, v in model.state_dict().items():
        if k == "stages.0.pos_embed":
            assert v.shape[1] == 1 + 16 and torch.equal(v, resample_abs_pos_embed(old[k], [4, 4], [2, 2], 1))
        else:
            assert torch.equal(v, old[k]), k
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("setting, message", [("meta.img_size=32", "only fine-tuning"),
                                              ("finetune.img_size=20", "multiple of the patch size")])
def test_resolution_change_outside_finetuning_or_off_the_patch_grid_is_refused(tmp_path, setting, message):
    from dsincubate.errors import UserError

    _assembled_run(tmp_path)
    with pytest.raises(UserError, match=message):
        phases.make("finetune", apply_overrides(CFG, [setting]), tmp_path, 10).build_model()


def test_official_vit_h_preset_has_no_qkv_bias_and_torch_layernorm_eps():
    spec = vit.target_spec(apply_overrides(recipes.get("debug"), ["model.preset=vit_h14_official", "model.depth=2",
                                                                    "model.embed_dim=32", "model.num_heads=2",
                                                                    "model.num_stages=2"]).model, 10)
    model = vit.build(spec)
    assert model.blocks[0].attn.qkv.bias is None
    assert {m.eps for m in model.modules() if isinstance(m, torch.nn.LayerNorm)} == {1e-5}
    assert model.patch_embed.patch_size == (14, 14)
