"""LAMB is LAMB under DeepSpeed (issue 21, item 5). Under ZeRO >= 1 DeepSpeed hands the client optimizer one flat fp32
shard per parameter group, so timm's Lamb would compute its per-tensor trust ratios (and its global gradient-norm
clip) over a rank's whole shard. The ViT-L/H recipes' LAMB phase (E2E), resolved as a GPU run resolves it
(`ds_config=auto`: ZeRO-0, fp32 weights, bf16 compute through DeepSpeed's `torch_autocast`), trained for 5 steps on
2 CPU ranks through the real `deepspeed` launcher, must equal a single-process timm Lamb given the same two halves of
every batch, step for step (1e-6); the same steps under ZeRO-2 (built directly, past the refusal) must not, which
shows the comparison can see the difference. And naming a ZeRO >= 1 ds_config for a LAMB phase is refused in one line
before anything starts. On the same ranks, the recipe's AdamW phases resolved for 2 x 80 GB run ZeRO-2 with bf16
weights and reduce their gradients in fp32 (item 8). Integration tier."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

SHRINK = ["model.preset=tiny", "model.depth=4", "model.embed_dim=48", "model.num_heads=3", "model.num_stages=4",
          "model.kernel_backend=torch", "e2e.drop_path=0.0", "e2e.micro_batch=4", "e2e.lr=3.2", "e2e.warmup_lr=0.0"]

CHILD = r'''
import json, sys, torch, deepspeed
import torch.nn.functional as F
from pathlib import Path
from timm.optim import Lamb, param_groups_weight_decay
from dsincubate import dist, phases, recipes
from dsincubate.config import apply_overrides
from dsincubate.engine import build_engine, resolve_ds_config, scaled_lr
ctx = dist.init()
out = Path(sys.argv[-1])
cfg = apply_overrides(recipes.get("vit_h14"), json.loads(sys.argv[-2]))
phase = phases.make("e2e", cfg, out, 10, None, resolve=False)
tc = phase.train_cfg
ds_file, ds_cfg = resolve_ds_config(phase, True, ctx.world_size)  # as a GPU run of the recipe resolves it
built = build_engine(phase, ctx, ds_cfg, steps_per_epoch=None, load=False)  # constant lr
engine = built.engine
autocast = bool(ds_cfg.get("torch_autocast", {}).get("enabled"))
lr = scaled_lr(tc.lr, ds_cfg["train_batch_size"])
micro, steps = tc.micro_batch, 5
gen = torch.Generator().manual_seed(1)
batches = [(torch.randn(2 * micro, 3, 32, 32, generator=gen), torch.randint(0, 10, (2 * micro,), generator=gen))
           for _ in range(steps)]


def reference_model():
    dist.seed_everything(cfg.seed)  # as build_engine does before building
    m = phase.build_model(load=False)
    groups = param_groups_weight_decay(m, tc.weight_decay, no_weight_decay_list=m.no_weight_decay())
    return m, Lamb(groups, lr=lr, betas=tc.betas)


def reference_step(m, opt, x, y):
    """Both ranks' halves in one process: each half's gradient as its rank computes it, then their mean."""
    grads = []
    for r in range(2):
        m.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = m(x[r * micro:(r + 1) * micro])
        F.cross_entropy(logits.float(), y[r * micro:(r + 1) * micro]).backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    for n, p in m.named_parameters():
        if n in grads[0]:
            p.grad = (grads[0][n] + grads[1][n]) * 0.5
    opt.step()


def max_diff(module, ref):
    want = dict(ref.named_parameters())
    return max(float((p.detach().float() - want[n].detach().float()).abs().max()) for n, p in module.named_parameters())


ref, ref_opt = reference_model()
res = {"ds_config": ds_file.stem, "autocast": autocast, "zero_stage": ds_cfg.get("zero_optimization", {}).get("stage", 0),
       "optimizer_sees": sorted({type(p).__name__ + str(tuple(p.shape)) for g in built.optimizer.param_groups
                                 for p in g["params"]})[:3],
       "start": max_diff(engine.module, ref), "steps": [], "moved": []}
init = {n: p.detach().clone() for n, p in ref.named_parameters()}
for x, y in batches:
    xs, ys = x[ctx.rank * micro:(ctx.rank + 1) * micro], y[ctx.rank * micro:(ctx.rank + 1) * micro]
    loss = F.cross_entropy(engine(xs).float(), ys)
    engine.backward(loss)
    engine.step()
    reference_step(ref, ref_opt, x, y)
    res["steps"].append(max_diff(engine.module, ref))
res["moved"] = max(float((p.detach() - init[n]).abs().max()) for n, p in ref.named_parameters())

# item 8 on the same ranks: the recipe's AdamW phases, resolved for 2 x 80 GB, run ZeRO-2 bf16 and reduce in fp32
import deepspeed.runtime.zero.stage_1_and_2 as zero12
ft = phases.make("finetune", cfg, out, 10, None, resolve=False)
ft_file, ft_cfg = resolve_ds_config(ft, True, ctx.world_size, device_bytes=80 * 2**30)
ft_engine = build_engine(ft, ctx, ft_cfg, steps_per_epoch=None, load=False).engine
reduced = []
plain_all_reduce = zero12.dist.all_reduce
zero12.dist.all_reduce = lambda t, *a, **k: (reduced.append(str(t.dtype)), plain_all_reduce(t, *a, **k))[1]
ft_engine.backward(ft_engine(batches[0][0][:micro].bfloat16()).float().logsumexp(-1).mean())
ft_engine.step()
zero12.dist.all_reduce = plain_all_reduce
res["finetune"] = {"ds_config": ft_file.stem, "weights": str(next(ft_engine.module.parameters()).dtype),
                   "buckets": sorted(str(k) for k in ft_engine.optimizer.ipg_buckets), "reduced": sorted(set(reduced))}

# the control: the same steps with the same Lamb under ZeRO-2 (fp32, so precision is not the difference), built
# directly with deepspeed.initialize, past dsincubate's refusal
dist.seed_everything(cfg.seed)
m2 = phase.build_model(load=False)
opt2 = Lamb(param_groups_weight_decay(m2, tc.weight_decay, no_weight_decay_list=m2.no_weight_decay()), lr=lr,
            betas=tc.betas)
z2 = {"zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0, "steps_per_print": 10**9,
      "train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1, "train_batch_size": 2 * micro}
eng2, *_ = deepspeed.initialize(model=m2, optimizer=opt2, config=z2)
ref2, ref2_opt = reference_model()
autocast = False
for x, y in batches:
    xs, ys = x[ctx.rank * micro:(ctx.rank + 1) * micro], y[ctx.rank * micro:(ctx.rank + 1) * micro]
    eng2.backward(F.cross_entropy(eng2(xs).float(), ys))
    eng2.step()
    reference_step(ref2, ref2_opt, x, y)
res["zero2_shards"] = [int(p.numel()) for g in opt2.param_groups for p in g["params"]]
res["zero2_diff"] = max_diff(eng2.module, ref2)
if ctx.rank == 0:
    (out / "result.json").write_text(json.dumps(res))
dist.shutdown()  # groups left to interpreter finalisation abort gloo at exit now and then (dsincubate.dist.shutdown)
'''


def test_recipe_lamb_phase_on_two_ranks_equals_single_process_timm_lamb_step_for_step(tmp_path, two_rank_script):
    res = two_rank_script(CHILD, tmp_path, 29561, json.dumps(SHRINK), str(tmp_path))
    # a GPU run of the ViT-H recipe runs its LAMB phase under ZeRO-0, fp32 weights, bf16 autocast
    assert (res["ds_config"], res["zero_stage"], res["autocast"]) == ("zero0_autocast_bf16", 0, True), res
    assert res["start"] == 0.0, res
    assert res["moved"] > 1e-3, res  # the steps are large enough for a wrong trust ratio to show
    assert len(res["steps"]) == 5 and max(res["steps"]) <= 1e-6, res
    # the AdamW phases: ZeRO-2 with bf16 weights, gradients reduced in fp32 (grad_reduce_dtype=fp32 in the recipe)
    ft = res["finetune"]
    assert (ft["ds_config"], ft["weights"], ft["buckets"]) == ("zero2_bf16", "torch.bfloat16", ["torch.float32"]), res
    assert "torch.bfloat16" not in ft["reduced"] and "torch.float32" in ft["reduced"], res
    # under ZeRO-2 the optimizer sees a flat shard per group and the weights come out different
    assert all(n > 1000 for n in res["zero2_shards"]) and res["zero2_diff"] > 1e-4, res


def test_lamb_phase_with_a_zero_ds_config_is_refused_in_one_line_before_anything_starts(tmp_path):
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "dsincubate", "e2e", "--recipe", "debug", "--output", str(out),
                        "--ds-config", "zero2_bf16", "--set", "e2e.optimizer=lamb"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2])))
    err = [ln for ln in p.stderr.splitlines() if ln.strip() and "[WARNING]" not in ln]
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
    assert len(err) == 1 and "e2e.optimizer=lamb" in err[0] and "ZeRO stage 2" in err[0], err
    assert not out.exists()
