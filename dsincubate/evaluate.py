"""`dsincubate eval`: top-1/top-5 on the validation data of any model the project makes, on one rank or many.

    dsincubate eval --output runs/demo --model meta          # the meta model
    dsincubate eval --output runs/demo --model hybrid:2      # the meta model with incubated module 2 (paper Fig. 9)
    dsincubate eval --output runs/kd --model m2mkd_hybrid:2  # the meta model with m2mKD student 2
    dsincubate eval --output runs/demo --model assemble      # the assembled model before fine-tuning
    dsincubate eval --output runs/demo --model finetune      # also e2e, e2e_tune
    dsincubate eval --output runs/demo --model runs/demo/export/finetune/model.safetensors   # any model file
    deepspeed --num_accelerators 2 --module dsincubate eval --output runs/demo --model e2e  # several ranks

Every rank holds the whole model and evaluates its share of the validation set (each sample once over all ranks);
the counts are summed, so the result does not depend on the number of ranks. The numbers are computed exactly as
the training loop's own evaluation (`accuracy` below, the run's ds_config precision), so they agree with
what each phase logged. The result is printed as one JSON line and written to `<model dir>/eval.json` (rank 0).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from dsincubate import checkpoint as ckpt, dist, dsconfig, phases, registry
from dsincubate.errors import UserError
from dsincubate.layout import STAGE_FILE, RunLayout
from dsincubate.models import family
from dsincubate.models.family import ModelSpec


def model_from_file(path: Path) -> torch.nn.Module:
    """Rebuild the model a safetensors file of this project holds (meta, assembled, phase output or export)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"eval: {path}: no such file")
    tensors, header = ckpt.load_tensors(path)
    kind = header.get("kind")
    if kind == "meta":
        spec = ModelSpec.from_json(header["meta_spec"])
        depths = [header["meta_depth_per_stage"]] * header["num_stages"]
    elif kind in ("assembled", "timm", *registry.exported()):
        spec = ModelSpec.from_json(header["spec"])
        depths = header.get("stage_depths")
    elif kind == "stage":
        raise UserError(f"eval: {path} is one incubated stage, not a model; use --model "
                        f"hybrid:{header.get('stage_index')}")
    else:
        raise UserError(f"eval: {path} is not a model file of dsincubate (kind={kind!r})")
    spec = ModelSpec(spec.timm_name, dict(spec.kwargs, drop_path_rate=0.0))
    if kind == "timm":  # exported: the whole model's own keys (timm's)
        model = family.build(spec)
    else:
        model = family.build_staged(spec, depths)
    model.load_state_dict(tensors, strict=True)
    return model


def resolve(which: str, cfg, root: Path, num_classes: int) -> tuple[torch.nn.Module, Path]:
    """(model, the directory its eval.json goes to) for a --model value."""
    layout = RunLayout(root)
    for method in registry.stage_phases():  # `<hybrid>:I`: stage output I inside the meta model
        prefix = f"{registry.phase(method).hybrid}:"
        if not which.startswith(prefix):
            continue
        try:
            stage_index = int(which.split(":", 1)[1])
        except ValueError:
            raise UserError(f"eval: --model {which!r}: use {prefix}<stage index>") from None
        # an m2mKD student sits in the meta model exactly as an incubated module does: the same hybrid, another file
        phase = phases.make("incubate", cfg, root, num_classes, stage_index)
        stage_dir = layout.phase_dir(method, stage_index)
        if not ckpt.complete(stage_dir):
            raise UserError(f"eval: {'incubated module' if method == 'incubate' else 'm2mKD student'} {stage_index} "
                            f"missing: {stage_dir / STAGE_FILE}")
        model = phase.build_model(load=True)
        tensors, _ = ckpt.load_tensors(stage_dir / STAGE_FILE)
        model.target_stage.load_state_dict(tensors, strict=True)
        return model, stage_dir
    if which in registry.named_models():
        path = layout.meta if which == "meta" else layout.model(which)
        if not ckpt.complete(path.parent):
            raise UserError(f"eval: {which} model missing or incomplete: {path}")
        return model_from_file(path), path.parent
    path = Path(which)
    return model_from_file(path), path.parent


def run_eval(which: str, cfg, root: Path, ctx: dist.DistContext, info, num_classes: int,
             write: bool = True, resolved: tuple[torch.nn.Module, Path] | None = None) -> dict:
    """Evaluate one model; `resolved` is `resolve(which, ...)`'s result where the caller already has it."""
    from dsincubate.data import build_val_loader

    model, where = resolved or resolve(which, cfg, root, num_classes)
    head = family.classifier(model)
    if head.out_features < info.num_classes:
        raise UserError(f"eval: the model has {head.out_features} classes but the data has {info.num_classes}")
    ds_cfg = dsconfig.load(dsconfig.find(cfg.ds_config, ctx.has_cuda))
    dtype = dsconfig.precision(ds_cfg)
    model = model.to(ctx.device, dtype)
    img = family.input_size(model)
    val = build_val_loader(cfg.data, info, batch_size=cfg.finetune.micro_batch, rank=ctx.rank,
                           world_size=ctx.world_size, img_size=img, device=ctx.device)
    result = dict(accuracy(model, val, ctx, dtype), model=which, world_size=ctx.world_size)
    if ctx.is_main:
        if write:
            ckpt.atomic_write_json(where / "eval.json", result)
        print(json.dumps(result))
    return result


def accuracy(engine, loader, ctx, dtype) -> dict:
    """top-1/top-5 and loss over the whole validation set (every sample once across ranks)."""
    engine.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # loss, top1, top5, count
    with torch.no_grad():
        for images, targets, valid in loader:
            logits = engine(images.to(ctx.device, dtype)).float().cpu()
            targets, valid = targets.cpu(), valid.cpu().bool()
            loss = torch.nn.functional.cross_entropy(logits, targets.clamp(min=0), reduction="none")
            top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hit = top5 == targets[:, None]
            sums += torch.tensor([loss[valid].sum().item(), hit[valid, 0].sum().item(),
                                  hit[valid].any(1).sum().item(), valid.sum().item()], dtype=torch.float64)
    sums = dist.all_reduce_sum(sums.to(ctx.device)).cpu()
    n = max(sums[3].item(), 1.0)
    return {"val_loss": sums[0].item() / n, "top1": 100 * sums[1].item() / n, "top5": 100 * sums[2].item() / n,
            "val_samples": int(sums[3].item())}
