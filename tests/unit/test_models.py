"""Unit tests of the staged model: divide/assemble round trips, hybrid gradients, export to timm, FLOPs of presets."""
import copy

import pytest
import timm
import torch

from dsincubate.config import ModelConfig
from dsincubate.errors import UserError
from dsincubate.models import family, staged, vit


def tiny_cfg(**kw):
    base = dict(preset="tiny", depth=8, embed_dim=48, num_heads=3, num_stages=4)
    base.update(kw)
    return ModelConfig(**base)


def build_staged(cfg, drop_path=0.0, meta=False):
    spec = vit.target_spec(cfg, 10, drop_path)
    if meta:
        spec = vit.meta_spec(cfg, spec, drop_path)
        depths = [cfg.meta_depth_per_stage] * cfg.num_stages
    else:
        depths = family.stage_depths(cfg, spec)
    torch.manual_seed(0)
    model = vit.build(spec)
    return model, staged.StagedModel(staged.divide(copy.deepcopy(model), depths)), spec


@pytest.mark.parametrize("preset", ["tiny", "deit_t_12", "vit_b16", "vit_b_dn"])
def test_divide_assemble_roundtrip_forward(preset):
    cfg = ModelConfig(preset=preset, num_stages=4)
    spec = vit.target_spec(cfg)
    torch.manual_seed(0)
    model = vit.build(spec).eval()
    stages = staged.divide(copy.deepcopy(model), family.stage_depths(cfg, spec))
    sm = staged.StagedModel(stages).eval()
    sd = model.state_dict()
    back = staged.timm_state_dict(sm)
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    img = spec.kwargs["img_size"]
    x = torch.randn(2, 3, img, img)
    with torch.no_grad():
        assert torch.equal(sm(x), model(x))


@pytest.mark.parametrize("preset", ["vit_l16", "vit_h14"])
def test_divide_roundtrip_large_presets_on_meta_device(preset):
    cfg = ModelConfig(preset=preset, num_stages=4)
    spec = vit.target_spec(cfg)
    with torch.device("meta"):
        model = vit.build(spec)
        sm = staged.StagedModel(staged.divide(copy.deepcopy(model), family.stage_depths(cfg, spec)))
    sd = model.state_dict()
    back = staged.timm_state_dict(sm)
    assert set(back) == set(sd)
    assert all(back[k].shape == sd[k].shape for k in sd)
    # every tensor appears exactly once in the staged model (no shared modules, no duplicate keys)
    assert len(sm.state_dict()) == len(sd)


def test_presets_have_the_papers_shapes():
    b = vit.target_spec(ModelConfig(preset="vit_b16"))
    assert (b.depth, b.kwargs["embed_dim"], b.kwargs["num_heads"]) == (12, 768, 12)
    dn = vit.target_spec(ModelConfig(preset="vit_b_dn"))
    assert (dn.depth, dn.kwargs["embed_dim"], dn.kwargs["embed_dim"] // dn.kwargs["num_heads"]) == (24, 540, 45)
    h = vit.target_spec(ModelConfig(preset="vit_h14"))
    assert (h.depth, h.kwargs["embed_dim"], h.kwargs["patch_size"]) == (32, 1280, 14)
    t = vit.target_spec(ModelConfig(preset="deit_t_128"))
    assert (t.depth, t.kwargs["embed_dim"], t.kwargs["img_size"], t.kwargs["num_classes"]) == (128, 192, 32, 100)
    m = vit.meta_spec(ModelConfig(preset="vit_l16"), vit.target_spec(ModelConfig(preset="vit_l16")))
    assert m.depth == 4 and m.kwargs["embed_dim"] == 1024


@pytest.mark.parametrize("preset,gmacs", [("vit_b16", 17.6), ("vit_l16", 61.6), ("vit_h14", 167.4)])
def test_flops_per_image_of_presets(preset, gmacs):
    from torch.utils.flop_counter import FlopCounterMode

    spec = vit.target_spec(ModelConfig(preset=preset))
    with torch.device("meta"):
        model = vit.build(spec).eval()
        x = torch.randn(1, 3, 224, 224)
        with FlopCounterMode(display=False) as fc:
            model(x)
    macs = fc.get_total_flops() / 2 / 1e9
    assert abs(macs - gmacs) / gmacs < 0.02, macs


def test_bad_model_inputs():
    with pytest.raises(UserError, match="unknown model"):
        vit.target_spec(ModelConfig(preset="resnet_nope"))
    with pytest.raises(UserError, match="does not fit"):
        family.stage_depths(ModelConfig(num_stages=9), vit.target_spec(ModelConfig(depth=8)))
    with pytest.raises(UserError, match="summing"):
        family.stage_depths(ModelConfig(num_stages=2, stage_depths=[3, 4]), vit.target_spec(ModelConfig(depth=8)))
    with pytest.raises(UserError, match="divisible"):
        vit.target_spec(ModelConfig(preset="tiny", embed_dim=100, num_heads=3))
    assert family.stage_depths(ModelConfig(num_stages=3), vit.target_spec(ModelConfig(depth=8))) == [3, 3, 2]


def make_hybrid(index, imitation=False):
    cfg = tiny_cfg()
    _, meta_model, _ = build_staged(cfg, meta=True)
    _, target, _ = build_staged(cfg, drop_path=0.1)
    return staged.Hybrid(list(meta_model.stages), target.stages[index], index, imitation=imitation)


@pytest.mark.parametrize("index", [0, 1, 3])
def test_hybrid_only_target_stage_gets_gradients(index):
    hybrid = make_hybrid(index).train()
    seen = {}

    def hook(mod, inp, out):
        seen[mod] = out.requires_grad

    for i, s in enumerate(hybrid.stages):
        s.register_forward_hook(hook)
    x = torch.randn(4, 3, 32, 32)
    hybrid(x).sum().backward()
    for i, s in enumerate(hybrid.stages):
        # stages before the target build no graph; the target and everything after it do
        assert seen[s] == (i >= index), (i, seen[s])
        for name, p in s.named_parameters():
            if i == index:
                assert p.requires_grad and p.grad is not None, name
            else:
                assert not p.requires_grad and p.grad is None, name
    # frozen meta stages stay in eval mode (no drop path) while the target trains
    assert hybrid.stages[index].training
    assert all(not s.training for i, s in enumerate(hybrid.stages) if i != index)


def test_hybrid_imitation_returns_target_and_meta_features():
    hybrid = make_hybrid(1, imitation=True).train()
    out, teacher = hybrid(torch.randn(2, 3, 32, 32))
    assert out.shape == teacher.shape and not teacher.requires_grad
    torch.nn.functional.l1_loss(out, teacher).backward()
    assert all(p.grad is None for p in hybrid.frozen_parameters())
    hybrid.eval()
    assert hybrid(torch.randn(2, 3, 32, 32)).shape == (2, 10)  # eval measures the hybrid's task output


def test_assembled_forward_equals_composition_of_stages():
    cfg = tiny_cfg()
    stages = []
    for i in range(4):  # four independently "trained" target stages (different seeds)
        torch.manual_seed(100 + i)
        spec = vit.target_spec(cfg, 10, 0.0)
        stages.append(staged.divide(vit.build(spec), family.stage_depths(cfg, spec))[i])
    assembled = staged.StagedModel(staged.divide(vit.build(vit.target_spec(cfg, 10, 0.0)), [2, 2, 2, 2])).eval()
    for i, s in enumerate(stages):
        assembled.stages[i].load_state_dict(s.state_dict())
        s.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        y = x
        for s in stages:
            y = s(y)
        assert torch.equal(assembled(x), y)


def test_export_state_dict_loads_into_fresh_timm_model():
    cfg = tiny_cfg()
    _, sm, spec = build_staged(cfg)
    sm.eval()
    fresh = timm.create_model(spec.timm_name, pretrained=False, **spec.kwargs).eval()
    fresh.load_state_dict(staged.timm_state_dict(sm), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh(x), sm(x))


def test_objective_reads_the_model_it_is_given_and_no_state_left_on_the_phase():
    """`Phase.objective(model, output, ...)` takes the V-MoE's load-balancing loss from the model passed in: two
    models give their own terms through one phase object, and the phase holds no model of its own (on 2fa0a8a the
    engine builder set `phase.model` and `objective(output, targets, criterion)` read it)."""
    import inspect

    import torch.nn.functional as F

    from dsincubate import phases, recipes
    from dsincubate.config import apply_overrides
    from dsincubate.models import moe

    cfg = apply_overrides(recipes.get("debug"), [
        "model.depth=4", "model.embed_dim=24", "model.num_heads=2", "model.num_stages=2", "model.img_size=16",
        "model.patch_size=8", "model.kernel_backend=torch", "model.num_classes=10", "model.moe_every=2",
        "model.moe_experts=4", "model.moe_top_k=2", "model.moe_aux_weight=0.05"])
    phase = phases.make("e2e", cfg, "/nonexistent", 10, resolve=False)
    assert list(inspect.signature(phase.objective).parameters)[:2] == ["model", "output"]
    x, y = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(3)), torch.tensor([1, 3, 5, 7])
    got = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = phase.build_model(load=False).train()
        out = model(x)
        aux = sum(m.l_aux.detach().clone() for m in moe.layers(model))
        losses = phase.objective(model, out, y, torch.nn.CrossEntropyLoss())
        assert torch.allclose(losses["moe_aux"], aux)
        assert torch.allclose(losses["loss"], F.cross_entropy(out, y) + 0.05 * aux)
        got.append(losses["moe_aux"])
    assert not torch.allclose(got[0], got[1])  # each model's own routing, not one remembered model's
    assert "model" not in vars(phase) and not hasattr(type(phase), "model")


def test_training_forwards_with_more_than_logits_return_named_types():
    """Imitation's hybrid and m2mKD's distillation return `staged.Paired`; the losses check the type, so a plain
    tuple is not silently taken for one."""
    hybrid = make_hybrid(1, imitation=True).train()
    out = hybrid(torch.randn(2, 3, 32, 32))
    assert isinstance(out, staged.Paired) and out.trained.shape == out.reference.shape
    assert [id(t) for t in staged.output_tensors(out)] == [id(out.trained), id(out.reference)]
    with pytest.raises(TypeError, match="staged.Paired"):
        staged.output_tensors((out.trained, out.reference))


def test_layer_scale_init_reaches_every_block_of_target_and_meta_model_and_survives_assembly():
    cfg = tiny_cfg(layer_scale_init=1e-4)
    model, sm, spec = build_staged(cfg)
    _, meta_sm, _ = build_staged(cfg, meta=True)
    for m in (model, meta_sm):
        gammas = [p for n, p in m.named_parameters() if n.endswith(("ls1.gamma", "ls2.gamma"))]
        assert len(gammas) == 2 * (8 if m is model else 4) and all(torch.all(g == 1e-4) for g in gammas)
    x = torch.randn(2, 3, 32, 32)
    back = staged.timm_state_dict(sm)
    fresh = vit.build(spec).eval()
    fresh.load_state_dict(back, strict=True)  # the gammas travel with their blocks
    with torch.no_grad():
        assert torch.allclose(fresh(x), model.eval()(x))
    plain, _, _ = build_staged(tiny_cfg())
    assert not any("gamma" in n for n, _ in plain.named_parameters())  # 0 = off: the plain ViT
