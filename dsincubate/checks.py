"""The checks of a training phase that need no process group, engine or data read, and the plan they produce: the CLI
runs them for every phase a command will train before anything starts (bad input is one error line, exit 2, nothing
written); `--dry-run` stops there, and the run executes the same plans (`trainer.run_phase(plan, ctx, info)`), so
the ds_config is resolved and the steps are counted once per phase.

    plan = check_plan(phases.make("incubate", cfg, root, n_cls, 2, resolve=False), info, world_size=8, has_cuda=True)
    plan.ds_cfg, plan.steps_per_epoch
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from dsincubate import checkpoint as ckpt, dist, dsconfig
from dsincubate.config import RunConfig
from dsincubate.data import DataInfo, build_mixup, build_train_loader
from dsincubate.engine import resolve_ds_config
from dsincubate.errors import UserError
from dsincubate.phase_base import Phase


@dataclass(frozen=True)
class PhasePlan:
    """A phase's run as sized before anything starts (`check_plan`, once): its resolved ds_config and steps. They do
    not depend on earlier phases' outputs, so a plan made before those exist (a pipeline's up-front checks) holds
    when the phase runs with its inputs resolved."""

    phase: Phase
    ds_file: Path
    ds_cfg: dict
    """The dict handed to `deepspeed.initialize` (read only: the run takes a copy)."""
    micro_steps: int
    """Micro-batches per rank and epoch (>= the gradient accumulation)."""
    world_size: int
    has_cuda: bool
    output_key: str
    """The output identity (`phase.config_key()`, as JSON) that `check_output` accepted."""

    @property
    def accum(self) -> int:
        return self.ds_cfg["gradient_accumulation_steps"]

    @property
    def steps_per_epoch(self) -> int:
        return self.micro_steps // self.accum


def output_key(phase: Phase) -> str:
    return json.dumps(phase.config_key(), default=str, sort_keys=True)


def preflight(plan: PhasePlan) -> None:
    """After the plan's checks, before the process group: the collective timeout of the group to come, and where
    this rank runs."""
    dist.set_collective_timeout(plan.phase.cfg.collective_timeout_s)
    if not ckpt.complete(plan.phase.out_dir):
        write_host_record(plan.phase)


def write_host_record(phase: Phase) -> Path:
    """`<phase>/ranks/rank_<r>.json`: this rank's host, address and pid, written before any collective (so that a
    rank that then hangs, e.g. started on the wrong host, has left its whereabouts)."""
    rec = dist.host_record()
    path = phase.out_dir / "ranks" / f"rank_{rec['rank']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt.atomic_write_json(path, rec)
    return path


def check_plan(phase: Phase, info: DataInfo, world_size: int, has_cuda: bool) -> PhasePlan:
    """Every check of a phase that needs no process group, engine or data read (the CLI runs it before any starts):
    the ds_config merged with the recipe, an output made with another config, mixup's even batch, and an epoch of at
    least one optimizer step per rank. Returns the phase's plan."""
    tc, m = phase.train_cfg, phase.cfg.model
    ds_file, ds_cfg = resolve_ds_config(phase, has_cuda, world_size)
    check_output(phase)
    if m.moe_every and phase.name != "meta":  # the meta model is dense
        if dsconfig.zero_stage(ds_cfg) == 3:
            raise UserError(f"{phase.label}: a V-MoE (model.moe_every={m.moe_every}) needs ZeRO stage 0-2; DeepSpeed's "
                            "MoE layers do not support ZeRO-3 (use ds_config zero2_bf16 or cpu)")
        if world_size % m.moe_ep_size:
            raise UserError(f"{phase.label}: world size {world_size} is not a multiple of model.moe_ep_size="
                            f"{m.moe_ep_size}")
    if build_mixup(phase.cfg.data, phase.num_classes) is not None and tc.micro_batch % 2:
        raise UserError(f"{phase.label}: mixup/cutmix need an even micro_batch (got {tc.micro_batch})")
    cfg = phase.cfg
    try:
        micro_steps = len(build_train_loader(cfg.data, info, batch_size=tc.micro_batch, rank=0, world_size=world_size,
                                             epoch=0, seed=cfg.seed, img_size=phase.img_size,
                                             subset_index=phase.stage_index))
    except UserError as e:
        raise UserError(f"{phase.label}: {e}") from None
    accum = ds_cfg["gradient_accumulation_steps"]
    if micro_steps < accum:
        raise UserError(f"{phase.label}: an epoch has {micro_steps} micro-batches per rank, fewer than gradient "
                        f"accumulation {accum}; lower micro_batch or use more data")
    return PhasePlan(phase, ds_file, ds_cfg, micro_steps, world_size, has_cuda, output_key(phase))


def check_output(phase: Phase) -> None:
    """Refuse to resume into (or overwrite) an output directory made with another config."""
    saved = phase.out_dir / "config_key.json"
    if saved.is_file():
        try:
            old = json.loads(saved.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"{saved} is unreadable ({e}); use another --output or remove {phase.out_dir}") from None
        new = json.loads(json.dumps(phase.config_key(), default=str))
        defaults = json.loads(json.dumps(RunConfig().to_dict(), default=str))
        for k, section in old.items():  # a field added since the output was made counts at its default
            if isinstance(section, dict) and isinstance(new.get(k), dict) and isinstance(defaults.get(k), dict):
                old[k] = {**{f: v for f, v in new[k].items() if f not in section and v == defaults[k].get(f)},
                          **section}
        # a phase made without resolving its inputs (the CLI's up-front check of every phase) does not know the meta
        # model's sha256 or the m2mKD teacher's file yet (None): that is not a difference; training resolves and
        # compares them
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k)
                         and not (k in ("meta_sha256", "teacher") and new.get(k) is None))
        if changed:
            raise UserError(f"{phase.out_dir} holds a {phase.label} run with another config (differs in: "
                            f"{', '.join(changed)}); use another --output")
