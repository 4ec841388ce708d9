"""The decoupled baselines (dsincubate.decoupled: DGL and InfoPro): no gradient crosses a module boundary, one step
changes exactly the modules and their auxiliary nets, the saved model is the target alone and computes the trained
modules in turn, InfoPro without its reconstruction term is DGL, and `pipeline --methods dgl` trains, evaluates and
exports a model through the registry.

    pytest tests/unit/test_decoupled.py -q
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings, strategies as st

from dsincubate import checkpoint as ckpt, phases, recipes
from dsincubate.config import apply_overrides

VIT = ["model.depth=4", "model.embed_dim=24", "model.num_heads=2", "model.num_stages=3", "model.stage_depths=2,1,1",
       "model.img_size=16", "model.patch_size=8", "model.kernel_backend=torch", "model.num_classes=10"]
RESNET = ["model.img_size=16", "model.num_classes=10"]  # the resnet_debug recipe's: 3 stages of 2 blocks, K = 3
FAMILIES = {"vit": ("debug", VIT), "resnet": ("resnet_debug", RESNET)}
CE = torch.nn.CrossEntropyLoss()


def _phase(name, tmp_path, fam="vit", *sets):
    torch.manual_seed(0)
    recipe, base = FAMILIES[fam]
    cfg = apply_overrides(recipes.get(recipe), base + [f"{name}.drop_path=0.0", *sets])
    return phases.make(name, cfg, tmp_path, 10)


def _batch():
    g = torch.Generator().manual_seed(3)
    return torch.randn(4, 3, 16, 16, generator=g), torch.tensor([1, 3, 5, 7])


@pytest.mark.parametrize("name", ["dgl", "infopro"])
@pytest.mark.parametrize("fam", ["vit", "resnet"])
def test_a_modules_local_loss_sends_no_gradient_into_earlier_modules(tmp_path, name, fam):
    phase = _phase(name, tmp_path, fam)
    model = phase.build_model().train()
    x, y = _batch()
    out = model(x)
    K = len(model.stages)
    for k in range(1, K):
        own = CE(out.logits[k], y) + (out.recon[k] if name == "infopro" and k < K - 1 else 0)  # module k's local terms
        for j in range(k):
            params = list(model.stages[j].parameters())
            grads = torch.autograd.grad(own, params, allow_unused=True, retain_graph=True)
            assert all(g is None or not g.any() for g in grads), f"module {k}'s loss reached module {j}"
        grads = torch.autograd.grad(own, list(model.stages[k].parameters()), allow_unused=True, retain_graph=True)
        assert any(g is not None and g.any() for g in grads)


@pytest.mark.parametrize("name", ["dgl", "infopro"])
def test_one_step_changes_every_module_and_auxiliary_net_and_nothing_else(tmp_path, name):
    # every term weighted (InfoPro's default schedule gives module 0's classifier and the last decoder weight 0)
    phase = _phase(name, tmp_path, "vit", "infopro_loss.ce_first=0.5", "infopro_loss.recon_last=0.5")
    model = phase.build_model().train()
    assert all(p.requires_grad for p in model.parameters())  # the optimizer gets every module and auxiliary net
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _batch()
    phase.loss(model(x), y, CE)["loss"].backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    groups = [f"stages.{k}." for k in range(len(model.stages))] + [f"aux.{k}." for k in range(len(model.aux))]
    if name == "infopro":
        groups += [f"decoders.{k}." for k in range(len(model.aux))]
    for g in groups:  # every module and auxiliary net moved
        assert any(n.startswith(g) for n in changed), f"{g} did not train"
    # the model holds the target and the auxiliary nets only, and what moved had a gradient of the local losses
    assert set(before) == set(phase.output_names(model)) | {n for n in before if n.startswith(("aux.", "decoders."))}
    assert all(model.get_parameter(n).grad is not None for n in changed)


@pytest.mark.parametrize("fam", ["vit", "resnet"])
def test_saved_model_is_the_target_alone_and_computes_the_trained_modules_in_turn(tmp_path, fam):
    phase = _phase("dgl", tmp_path, fam)
    model = phase.build_model().train()
    x, y = _batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    phase.loss(model(x), y, CE)["loss"].backward()
    opt.step()
    names = phase.output_names(model)
    state = dict(model.state_dict())
    phase.out_dir.mkdir(parents=True)
    ckpt.write_manifest(phase.out_dir, phase.save_output({n: state[n] for n in names}))
    tensors, _ = ckpt.load_tensors(phase.out_dir / "model.safetensors")
    e2e = phases.make("e2e", phase.cfg, tmp_path, 10).build_model()
    assert set(tensors) == set(e2e.state_dict())  # the target's keys, no auxiliary net
    e2e.load_state_dict(tensors, strict=True)
    model.eval(), e2e.eval()
    with torch.no_grad():
        h = x
        for stage in model.stages:  # the trained modules applied in turn
            h = stage(h)
        assert torch.allclose(e2e(x), h, atol=1e-6)
        assert torch.allclose(model(x), h, atol=1e-6)


@pytest.mark.parametrize("fam", ["vit", "resnet"])
def test_infopro_without_reconstruction_is_dgl(tmp_path, fam):
    dgl = _phase("dgl", tmp_path / "d", fam)
    info = _phase("infopro", tmp_path / "i", fam, "infopro_loss.recon_first=0", "infopro_loss.recon_last=0",
                  "infopro_loss.ce_first=1", "infopro_loss.ce_last=1")
    m_dgl, m_info = dgl.build_model().train(), info.build_model().train()
    missing, unexpected = m_info.load_state_dict(m_dgl.state_dict(), strict=False)
    assert not unexpected and missing and all(n.startswith("decoders.") for n in missing)
    x, y = _batch()
    a, b = dgl.loss(m_dgl(x), y, CE), info.loss(m_info(x), y, CE)
    assert torch.allclose(a["loss"], b["loss"], atol=1e-6)
    assert all(b[f"recon_{k}"] > 0 for k in range(len(m_info.aux)))  # the term exists, weighted 0
    # with its defaults (module 0: reconstruction only) InfoPro's loss differs
    info2 = _phase("infopro", tmp_path / "j", fam)
    m2 = info2.build_model().train()
    m2.load_state_dict(m_info.state_dict())
    assert not torch.allclose(info2.loss(m2(x), y, CE)["loss"], a["loss"])


def test_infopro_weights_follow_its_codes_linear_schedule(tmp_path):
    from dsincubate.decoupled import infopro_weights

    lam = _phase("infopro", tmp_path, "vit", "infopro_loss.recon_first=5", "infopro_loss.recon_last=1",
                 "infopro_loss.ce_first=0", "infopro_loss.ce_last=2").cfg.infopro_loss
    assert [infopro_weights(k, 4, lam) for k in range(3)] == [(5.0, 0.0), (3.0, 1.0), (1.0, 2.0)]
    assert infopro_weights(0, 2, lam) == (5.0, 0.0)


def test_boundary_shapes_match_the_stages_outputs():
    from dsincubate.models import family  # the model-family seam (its boundary_shape: added for these baselines)

    for recipe, sets in FAMILIES.values():
        cfg = apply_overrides(recipes.get(recipe), sets)
        spec = family.target_spec(cfg.model, 10)
        model = family.build_staged(spec, family.stage_depths(cfg.model, spec)).eval()
        h = torch.zeros(1, 3, 16, 16)
        for i, stage in enumerate(model.stages[:-1]):
            h = stage(h)
            assert tuple(h.shape[1:]) == tuple(family.family_of(spec).boundary_shape(spec, i).shape)


def test_a_family_without_boundary_shapes_is_refused_when_the_phase_is_made(tmp_path, monkeypatch):
    from dsincubate.errors import UserError
    from dsincubate.models import family
    from dsincubate.models.vit import ViTFamily

    monkeypatch.setattr(ViTFamily, "boundary_shape", family.Family.boundary_shape)
    with pytest.raises(UserError, match="boundary shapes"):
        _phase("infopro", tmp_path)


def test_pipeline_methods_dgl_trains_evaluates_and_exports_through_the_registry(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "dsincubate", "pipeline", "--recipe", "debug", "--methods", "dgl", "--output",
           str(out), "--set", f"data.demo_root={tmp_path / 'demo'}", "--set", "dgl.epochs=1", "--set",
           "dgl.warmup_epochs=0", "--set", "data.samples_per_epoch=64", "--set", "dgl.micro_batch=32"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    record = json.loads((out / "dgl" / "run.json").read_text())
    assert 0.0 <= record["final"]["top1"] <= 100.0 and record["final"]["val_samples"] > 0
    assert any(k.startswith("train_local_") for k in record["final"]), sorted(record["final"])
    tensors, _ = ckpt.load_tensors(out / "dgl" / "model.safetensors")
    assert not any(k.startswith(("aux.", "decoders.")) for k in tensors)
    assert (out / "export" / "dgl").is_dir()


def _supcon_by_the_paper(z, labels, t):
    """Khosla et al.'s L_sup^out written out anchor by anchor: -(1/|P(i)|) sum_p log softmax over A(i) of z_i.z_a/t,
    averaged over anchors (one with no positive adds 0, as InfoPro's SupConLoss does)."""
    z = torch.nn.functional.normalize(z.double(), dim=1)
    terms = []
    for i in range(len(z)):
        others = [a for a in range(len(z)) if a != i]
        pos = [p for p in others if labels[p] == labels[i]]
        denom = torch.logsumexp(torch.stack([z[i] @ z[a] / t for a in others]), 0)
        terms.append(-sum(z[i] @ z[p] / t - denom for p in pos) / len(pos) if pos else torch.tensor(0.0).double())
    return torch.stack(terms).mean()


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 12), dim=st.integers(1, 9), classes=st.integers(1, 4), seed=st.integers(0, 2**16),
       t=st.sampled_from([0.07, 0.5, 1.0]), scale=st.sampled_from([1e-3, 1.0, 50.0]))
def test_supcon_loss_matches_the_supervised_contrastive_loss_written_out(n, dim, classes, seed, t, scale):
    from dsincubate.decoupled import supcon_loss

    g = torch.Generator().manual_seed(seed)
    z, labels = torch.randn(n, dim, generator=g) * scale, torch.randint(0, classes, (n,), generator=g)
    got = supcon_loss(z, labels, temperature=t, base_temperature=t)
    assert torch.isfinite(got)
    assert torch.allclose(got.double(), _supcon_by_the_paper(z, labels, t), rtol=1e-4, atol=1e-4)


def test_supcon_loss_is_lower_when_each_class_clusters():
    from dsincubate.decoupled import supcon_loss

    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    centres = torch.eye(3)
    clustered = centres[labels] + 0.01 * torch.randn(6, 3)
    mixed = centres[torch.tensor([0, 1, 2, 0, 1, 2])]
    assert supcon_loss(clustered, labels) < supcon_loss(mixed, labels)


@pytest.mark.parametrize("fam", ["vit", "resnet"])
def test_bce_reconstruction_targets_the_image_in_unit_range(tmp_path, fam):
    from dsincubate.data import DataInfo

    phase = _phase("infopro", tmp_path, fam, "infopro_loss.info_x=bce")
    model = phase.build_model().train()
    pixels = torch.rand(4, 3, 16, 16)  # an image in [0, 1], normalised as the loaders do
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (DataInfo.mean, DataInfo.std))
    image = (pixels - mean) / std
    dec = model.decoders[0]
    h = model.stages[0](image)
    recon = dec.proj(h[:, h.shape[1] - 4:]) if fam == "vit" else None
    if fam == "vit":  # the 2x2 patch grid's logits, back to the image layout
        recon = recon.reshape(-1, 2, 2, 8, 8, 3).permute(0, 5, 1, 3, 2, 4).reshape(-1, 3, 16, 16)
    else:
        up = torch.nn.functional.interpolate(h, size=(16, 16), mode="bilinear", align_corners=True)
        recon = dec.net(up)
    want = torch.nn.functional.binary_cross_entropy(torch.sigmoid(recon), pixels)
    assert torch.allclose(dec(h, image), want, atol=1e-5)
    mse = _phase("infopro", tmp_path / "m", fam).build_model().decoders[0]
    mse.load_state_dict(dec.state_dict())
    assert torch.allclose(mse(h, image), torch.nn.functional.mse_loss(recon, image), atol=1e-5)


@pytest.mark.parametrize("fam", ["vit", "resnet"])
def test_infopro_with_its_own_loss_forms_trains_every_module_and_auxiliary_net(tmp_path, fam):
    phase = _phase("infopro", tmp_path, fam, "infopro_loss.info_y=contrast", "infopro_loss.info_x=bce",
                   "infopro_loss.ce_first=0.5", "infopro_loss.recon_last=0.5", "infopro_loss.feature_dim=16")
    model = phase.build_model().train()
    x, _ = _batch()
    y = torch.tensor([1, 1, 3, 3])  # a contrastive term needs positives: two images of a class
    out = model(x)
    assert all(o.shape == (4, 16) for o in out.logits[:-1]) and out.logits[-1].shape == (4, 10)
    terms = phase.loss(out, y, CE)
    assert {f"supcon_{k}" for k in range(len(model.aux))} <= set(terms) and "ce_2" in terms
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    terms["loss"].backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    for g in ["stages.0.", "stages.1.", "stages.2.", "aux.0.", "aux.1.", "decoders.0.", "decoders.1."]:
        assert any(n.startswith(g) for n in changed), f"{g} did not train"


def test_infopro_contrast_with_mixup_is_refused_when_the_phase_is_made(tmp_path):
    from dsincubate.errors import UserError

    with pytest.raises(UserError, match="mixup"):
        _phase("infopro", tmp_path, "vit", "infopro_loss.info_y=contrast", "data.mixup=0.8")
    _phase("infopro", tmp_path / "ok", "vit", "infopro_loss.info_y=contrast", "data.mixup=0", "data.cutmix=0")
