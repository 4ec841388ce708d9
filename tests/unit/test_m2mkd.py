"""m2mKD (module-to-module distillation through the meta model): the loss is the m2mKD code's, only the student
module (and its stitches) trains, meta and teacher stay bit-identical, and the students assemble into a model.

    pytest tests/unit/test_m2mkd.py -q
"""
import pytest
import torch
import torch.nn.functional as F

from dsincubate import checkpoint as ckpt, phases, recipes
from dsincubate.assemble import assemble
from dsincubate.config import apply_overrides
from dsincubate.errors import UserError

SMALL = ["model.depth=4", "model.embed_dim=24", "model.num_heads=2", "model.num_stages=2", "model.img_size=16",
         "model.patch_size=8", "model.kernel_backend=torch", "model.num_classes=10"]


def _cfg(*sets):
    return apply_overrides(recipes.get("debug"), SMALL + list(sets))


def _finished(phase, tensors):
    phase.out_dir.mkdir(parents=True)
    ckpt.write_manifest(phase.out_dir, phase.save_output(tensors))


@pytest.fixture
def run(tmp_path):
    """A run directory with a meta model and an E2E teacher, as earlier phases leave them."""
    cfg = _cfg()
    torch.manual_seed(0)
    meta = phases.make("meta", cfg, tmp_path, 10)
    _finished(meta, dict(meta.build_model().state_dict()))
    e2e = phases.make("e2e", cfg, tmp_path, 10)
    _finished(e2e, dict(e2e.build_model().state_dict()))
    return tmp_path


def _batch():
    g = torch.Generator().manual_seed(3)
    return torch.randn(4, 3, 16, 16, generator=g), torch.tensor([1, 3, 5, 7])


@pytest.mark.parametrize("alpha, tau", [(0.5, 1.0), (0.3, 2.0)])
def test_loss_is_the_m2mkd_codes_on_a_fixed_batch(run, alpha, tau):
    phase = phases.make("m2mkd", _cfg(f"m2mkd.kd_alpha={alpha}", f"m2mkd.kd_tau={tau}"), run, 10, 0)
    model = phase.build_model().train()
    x, y = _batch()
    out = model(x)
    s, t = out.trained, out.reference
    got = phase.loss(out, y, torch.nn.CrossEntropyLoss())
    # by hand: KL(softmax(t/tau) || softmax(s/tau)) summed, / (batch x classes), x tau^2
    p_t, log_p_s = F.softmax(t / tau, -1), F.log_softmax(s / tau, -1)
    kl = (p_t * (torch.log(p_t) - log_p_s)).sum() / s.numel()
    want = (1 - alpha) * F.cross_entropy(s, y) + alpha * tau ** 2 * kl
    assert torch.allclose(got["loss"], want, atol=1e-6) and torch.allclose(got["kd"], kl, atol=1e-7)


@pytest.mark.parametrize("index", [0, 1])
def test_only_the_student_module_trains_meta_and_teacher_stay_bit_identical(run, index):
    phase = phases.make("m2mkd", _cfg(), run, 10, index)
    torch.manual_seed(1)
    model = phase.build_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(2):
        x, y = _batch()
        loss = phase.loss(model(x), y, torch.nn.CrossEntropyLoss())["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    student = {n for n, _ in model.named_parameters() if n.startswith(f"hybrid.stages.{index}.")}
    assert changed == student
    assert all(not p.requires_grad for n, p in model.named_parameters() if n.startswith("teacher_stage."))
    teacher, _ = ckpt.load_tensors(run / "e2e" / "model.safetensors")
    assert all(torch.equal(p, teacher[f"stages.{index}.{n}"]) for n, p in model.teacher_stage.state_dict().items())
    model.eval()
    with torch.no_grad():
        assert model(_batch()[0]).shape == (4, 10)  # evaluation: the student hybrid's logits


def test_student_stage_files_assemble_into_the_target(run):
    for i in range(2):
        phase = phases.make("m2mkd", _cfg(), run, 10, i)
        model = phase.build_model()
        names = phase.output_names(model)
        _finished(phase, {n: p.detach() for n, p in model.named_parameters() if n in names})
        assert ckpt.read_meta(phase.out_dir / "stage.safetensors")["objective"] == "m2mkd"
    path = assemble(run, [run / "m2mkd" / f"module_{i}" / "stage.safetensors" for i in range(2)], 2)
    tensors, header = ckpt.load_tensors(path)
    assert header["kind"] == "assembled" and any(k.startswith("stages.1.blocks.1.") for k in tensors)


def test_teacher_missing_or_of_another_width_is_refused(run, tmp_path):
    with pytest.raises(UserError, match="teacher"):
        phases.make("m2mkd", _cfg("m2mkd.teacher=finetune"), run, 10, 0)  # this run has no fine-tuned model
    wide = _cfg("model.embed_dim=32")
    other = phases.make("e2e", wide, tmp_path / "wide", 10)
    _finished(other, dict(other.build_model().state_dict()))
    with pytest.raises(UserError, match="width"):
        phases.make("m2mkd", _cfg(f"m2mkd.teacher={other.out_dir / 'model.safetensors'}"), run, 10, 0)
