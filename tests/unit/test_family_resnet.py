"""Unit tests of the CIFAR ResNet family through the model-family seam: the architecture of He et al., export, and
the refusal of ViT settings and of other divisions. The meta model's fit at every stage boundary, incubation's
trained set and assembly are checked for this family and the Swin alike, in test_family_swin.py."""
import json

import pytest
import torch

from dsincubate import checkpoint as ckpt, phases, recipes
from dsincubate.assemble import export
from dsincubate.config import ModelConfig, apply_overrides
from dsincubate.errors import UserError
from dsincubate.models import family, resnet_cifar


def tiny_cfg(**kw):
    return ModelConfig(**dict(dict(preset="resnet110_cifar", depth=6, num_stages=3), **kw))


def test_resnet110_has_he_et_al_architecture_and_parameter_count():
    cfg = ModelConfig(preset="resnet110_cifar", num_stages=3)
    spec = family.target_spec(cfg, 100)
    model = family.build(spec)
    assert family.family_of(cfg) is resnet_cifar.FAMILY and family.family_of(model) is resnet_cifar.FAMILY
    assert spec.depth == 54 and 2 * spec.depth + 2 == 110  # 54 basic blocks of 2 convolutions, stem and fc
    assert 1.70e6 < sum(p.numel() for p in model.parameters()) < 1.75e6  # the paper's "1.7 M"
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1) and model.conv1.out_channels == 16
    stages = family.family_of(spec).divide(model.eval(), family.stage_depths(cfg, spec))
    x, shapes = torch.randn(2, 3, 32, 32), []
    with torch.no_grad():
        for s in stages:
            x = s(x)
            shapes.append(tuple(x.shape))
    assert shapes == [(2, 16, 32, 32), (2, 32, 16, 16), (2, 100)]  # stride 2 entering stages 2 and 3
    assert [family.family_of(spec).boundary_width(spec, i) for i in range(3)] == [16, 32, 64]


def test_recipe_uses_the_familys_k_and_meta_depth():
    cfg = recipes.get("resnet110_cifar")
    fam = family.family_of(cfg.model)
    assert (cfg.model.num_stages, cfg.model.meta_depth_per_stage) == (fam.default_num_stages, fam.default_meta_depth)
    assert phases.make("meta", cfg, "/x", 100, resolve=False).depths() == [18, 18, 18]


def test_export_rebuilds_from_model_json_with_identical_logits(tmp_path):
    cfg = recipes.get("resnet_debug")
    phase = phases.make("finetune", cfg, tmp_path, 10, resolve=False)
    torch.manual_seed(0)
    model = phase.target()
    with torch.no_grad():  # BN statistics that are not the defaults, so a lost buffer would show
        model.train()(torch.randn(8, 3, 32, 32))
    files = phase.save_output(dict(model.state_dict()))
    ckpt.write_manifest(phase.out_dir, files, {})
    out = export(tmp_path, "finetune")
    info = json.loads((out.parent / "model.json").read_text())
    rebuilt = family.build(family.ModelSpec.from_json(info["spec"])).eval()
    tensors, _ = ckpt.load_tensors(out)
    rebuilt.load_state_dict(tensors, strict=True)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model.eval()(x))
    assert info["model_name"] == "resnet_cifar" and not (out.parent / "config.json").exists()


@pytest.mark.parametrize("field", ["embed_dim=64", "num_heads=4", "patch_size=4", "meta_embed_dim=32",
                                   "meta_num_heads=2", "moe_every=2", "layer_scale_init=1e-4"])
def test_vit_only_settings_are_refused_for_a_resnet_with_one_line(field):
    cfg = apply_overrides(recipes.get("resnet110_cifar"), [f"model.{field}"])
    with pytest.raises(UserError, match=f"model.{field.split('=')[0]}: not a setting of resnet110_cifar") as e:
        family.target_spec(cfg.model)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("override", ["model.num_stages=4", "model.stage_depths=1,2,3", "model.depth=7"])
def test_a_resnet_divides_only_at_its_stage_boundaries(override):
    cfg = apply_overrides(recipes.get("resnet_debug"), [override])
    with pytest.raises(UserError):
        phases.make("meta", cfg, "/x", 10, resolve=False).depths()


def test_family_of_names_one_family_per_spec_and_preset():
    vit_spec = family.target_spec(ModelConfig(preset="tiny"))
    res_spec = family.target_spec(tiny_cfg())
    assert family.family_of(vit_spec).name == "vit" and family.family_of(res_spec).name == "resnet_cifar"
    assert family.family_of(family.ModelSpec.from_json(res_spec.to_json())) is family.family_of(res_spec)
    assert family.drop_path_rates(0.3, "linear", 4) == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert family.drop_path_rates(0.3, "uniform", 2) == [0.3, 0.3]
