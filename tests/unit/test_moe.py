"""The Vision-MoE on DeepSpeed MoE (`dsincubate.models.moe`) and m2mKD students: where the MoE layers go, experts
independent of the expert-parallel layout, the load-balancing loss in the objective, FLOPs of routed layers, refused
settings, and m2mKD students (a V-MoE, or of another width than the meta model) that train alone and assemble into
the composition of the modules.

    pytest tests/unit/test_moe.py -q
"""
import json

import pytest
import torch
import torch.nn.functional as F

from dsincubate import accounting, checkpoint as ckpt, checks, phases, recipes
from dsincubate.assemble import assemble
from dsincubate.config import apply_overrides
from dsincubate.errors import UserError
from dsincubate.models import moe, staged, vit

SMALL = ["model.depth=4", "model.embed_dim=24", "model.num_heads=2", "model.num_stages=2", "model.img_size=16",
         "model.patch_size=8", "model.kernel_backend=torch", "model.num_classes=10"]
VMOE = ["model.moe_every=2", "model.moe_experts=4", "model.moe_top_k=2"]


def _cfg(*sets):
    return apply_overrides(recipes.get("debug"), SMALL + list(sets))


def _batch():
    g = torch.Generator().manual_seed(3)
    return torch.randn(4, 3, 16, 16, generator=g), torch.tensor([1, 3, 5, 7])


def _finished(phase, tensors):
    phase.out_dir.mkdir(parents=True)
    ckpt.write_manifest(phase.out_dir, phase.save_output(tensors))


def test_vmoe_has_deepspeed_moe_layers_in_every_nth_block_and_its_meta_model_stays_dense():
    from deepspeed.moe.layer import MoE

    cfg = _cfg(*VMOE)
    model = phases.make("e2e", cfg, "/nonexistent", 10, resolve=False).build_model(load=False)
    blocks = [b for s in model.stages for b in s.blocks]
    assert [isinstance(b.mlp, moe.MoEMlp) for b in blocks] == [False, True, False, True]
    assert all(isinstance(b.mlp.moe, MoE) and len(b.mlp.moe.deepspeed_moe.experts.deepspeed_experts) == 4
               for b in blocks[1::2])
    meta = phases.make("meta", cfg, "/nonexistent", 10, resolve=False).build_model(load=False)
    assert not moe.layers(meta)
    # every expert starts from its own draw (DeepSpeed deep-copies one expert: all would be equal)
    experts = blocks[1].mlp.moe.deepspeed_moe.experts.deepspeed_experts
    assert not torch.equal(experts[0].fc1.weight, experts[1].fc1.weight)


def test_expert_e_has_the_same_initial_values_at_every_expert_parallel_size_and_files_localize_to_a_rank():
    phase = phases.make("e2e", _cfg(*VMOE), "/nonexistent", 10, resolve=False)
    torch.manual_seed(0)
    whole = phase.build_model(load=False).state_dict()
    torch.manual_seed(0)
    with moe.expert_parallel(2):  # this process is rank 0 of its expert-parallel group: experts 0 and 1
        half = phase.build_model(load=False)
    local = moe.localize(whole, 2)
    assert set(local) == set(half.state_dict())
    assert all(torch.equal(local[k], v) for k, v in half.state_dict().items())
    assert sum(moe.is_expert_key(k) for k in whole) == 2 * sum(moe.is_expert_key(k) for k in local)
    half.load_state_dict(local, strict=True)


def test_objective_adds_the_weighted_load_balancing_loss_of_the_moe_layers_that_train():
    cfg = _cfg(*VMOE, "model.moe_aux_weight=0.05")
    phase = phases.make("e2e", cfg, "/nonexistent", 10, resolve=False)
    torch.manual_seed(0)
    model = phase.build_model(load=False)
    model.train()
    x, y = _batch()
    out = model(x)
    aux = [m.l_aux.detach().clone() for m in moe.layers(model)]
    losses = phase.objective(model, out, y, torch.nn.CrossEntropyLoss())
    want = F.cross_entropy(out, y) + 0.05 * (aux[0] + aux[1])
    assert torch.allclose(losses["loss"], want) and torch.allclose(losses["moe_aux"], aux[0] + aux[1])
    assert all(a > 0 for a in aux)
    # a frozen MoE layer (a meta or teacher part) adds nothing; nor does a dense model
    for p in moe.layers(model)[0].parameters():
        p.requires_grad_(False)
    out = model(x)
    second = moe.layers(model)[1].l_aux.detach().clone()
    assert torch.allclose(phase.objective(model, out, y, torch.nn.CrossEntropyLoss())["moe_aux"], second)
    dense = phases.make("e2e", _cfg(), "/nonexistent", 10, resolve=False)
    dense_model = dense.build_model(load=False)
    assert "moe_aux" not in dense.objective(dense_model, dense_model(x), y, torch.nn.CrossEntropyLoss())


def test_flops_of_a_vmoe_count_top_k_experts_per_token():
    def flops(*sets):
        ph = phases.make("e2e", _cfg(*sets), "/nonexistent", 10, resolve=False)
        return accounting.count_flops(lambda: ph.build_model(load=False), 16)["train_step_per_image"]

    dense, top1, top2 = flops(), flops(*VMOE, "model.moe_top_k=1"), flops(*VMOE)
    mlp = 2 * 2 * 24 * 96 * 5 * 3  # fc1 + fc2 (mult-add = 2 FLOPs) x 5 tokens x (forward + 2 x backward)
    assert dense < top1 < top2  # top-1 adds the router; top-2 a second expert per token in each of 2 layers
    assert top2 - top1 == pytest.approx(2 * mlp, rel=0.05)


@pytest.mark.parametrize("sets, message", [
    (["model.moe_ep_size=3"], "not divisible by model.moe_ep_size"),
    (["model.moe_top_k=5"], "above model.moe_experts"),
    (["model.moe_every=5"], "no block would be MoE"),
])
def test_impossible_moe_settings_are_refused_with_one_error(sets, message):
    with pytest.raises(UserError, match=message):
        phases.make("e2e", _cfg(*VMOE, *sets), "/nonexistent", 10, resolve=False).target_spec()


def test_vmoe_under_zero3_or_an_expert_parallel_size_not_dividing_the_world_is_refused_before_start(tmp_path):
    for sets, ws, message in ((["ds_config=zero3_fp32"], 2, "ZeRO-3"),
                              (["model.moe_ep_size=2"], 3, "not a multiple of model.moe_ep_size")):
        phase = phases.make("e2e", _cfg(*VMOE, *sets), tmp_path, 10, resolve=False)
        with pytest.raises(UserError, match=message):
            checks.check_plan(phase, None, ws, False)  # refused before any data is read


@pytest.fixture
def run(tmp_path):
    """A meta model (width 24) and a dense E2E teacher (width 24), as earlier phases leave them."""
    cfg = _cfg()
    torch.manual_seed(0)
    meta = phases.make("meta", cfg, tmp_path, 10)
    _finished(meta, dict(meta.build_model().state_dict()))
    e2e = phases.make("e2e", cfg, tmp_path, 10)
    _finished(e2e, dict(e2e.build_model().state_dict()))
    return tmp_path


@pytest.mark.parametrize("student", ["vmoe", "wider"])
def test_m2mkd_student_alone_trains_and_the_students_assemble_into_the_composition_of_the_modules(run, student):
    """A V-MoE student (experts, router and all) or a wider student (width 32 between stitches into the width-24
    meta model): a few optimizer steps change exactly the student's parameters (stitches included); the students'
    stage files assemble (stitches dropped) into a model whose forward is the students' stages applied in turn."""
    sets = VMOE if student == "vmoe" else ["model.embed_dim=32", "model.meta_embed_dim=24"]
    x, y = _batch()
    files = []
    for i in range(2):
        phase = phases.make("m2mkd", _cfg(*sets), run, 10, i)
        torch.manual_seed(i)
        model = phase.build_model()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(trainable, lr=0.5)
        model.train()
        for _ in range(3):
            opt.zero_grad()
            phase.objective(model, model(x), y, torch.nn.CrossEntropyLoss())["loss"].backward()
            opt.step()
        changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
        names = set(phase.output_names(model))
        own = {n for n in before if n.startswith((f"hybrid.stages.{i}.", "hybrid.stitch_"))}
        assert names == {n for n in own if n.startswith(f"hybrid.stages.{i}.")}
        assert changed <= own and changed, changed - own  # nothing but the student (and its stitches) changed
        if student == "wider":
            assert any(n.startswith("hybrid.stitch_") for n in changed)
        if student == "vmoe":
            assert any(".deepspeed_experts." in n for n in changed) and any(".gate.wg." in n for n in changed)
        _finished(phase, {n: p.detach() for n, p in model.named_parameters() if n in names})
        files.append(phase.out_dir / "stage.safetensors")
        stage_cfg_spec = phase.target_spec(0.0)
    path = assemble(run, files, 2, method="m2mkd")
    assert path == run / "m2mkd" / "assemble" / "model.safetensors"
    tensors, header = ckpt.load_tensors(path)
    whole = phases.make("e2e", _cfg(*sets), run, 10, resolve=False)
    model = whole.build_model(load=False)
    model.load_state_dict(tensors, strict=True)
    assert all(t.shape[-1] == (32 if student == "wider" else 24) for k, t in tensors.items() if k.endswith("norm1.weight"))
    stages = []
    for i, f in enumerate(files):
        s = staged.StagedModel(staged.divide(vit.build(stage_cfg_spec), [2, 2])).stages[i]
        s.load_state_dict(ckpt.load_tensors(f)[0], strict=True)
        stages.append(s.eval())
    model.eval()
    with torch.no_grad():
        h = x
        for s in stages:
            h = s(h)
        assert torch.equal(model(x), h)


def test_an_unfinished_m2mkd_job_passes_the_up_front_check_of_a_resumed_pipeline(run):
    """The CLI checks every phase before starting, unresolved (no teacher file yet): a student job's saved key names
    its resolved teacher, which is no difference; another teacher setting is."""
    from dsincubate.checks import check_output

    phase = phases.make("m2mkd", _cfg(), run, 10, 0)
    phase.out_dir.mkdir(parents=True)
    ckpt.atomic_write_json(phase.out_dir / "config_key.json", json.loads(json.dumps(phase.config_key(), default=str)))
    check_output(phases.make("m2mkd", _cfg(), run, 10, 0, resolve=False))
    check_output(phases.make("m2mkd", _cfg(), run, 10, 0))
    with pytest.raises(UserError, match="another config"):
        check_output(phases.make("m2mkd", _cfg("m2mkd.teacher=finetune"), run, 10, 0, resolve=False))
