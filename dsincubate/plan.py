"""A pipeline's plan and its execution: the steps of the --methods (`dsincubate.registry.plan`), checked up front
and run in one process group (`dsincubate pipeline`), or printed for the launchers (`dsincubate config --plan`).

    dsincubate config --plan --methods di,e2e --recipe demo --output runs/demo
      train meta 1 meta
      train incubate 4 incubate/module_{i}      # K jobs, independent: launchers/incubate.sh runs them concurrently
      assemble incubate 1 assemble
      ...
      summary - 1 -

launchers/incubate.sh and launchers/slurm_pipeline.sh read that plan instead of keeping their own copy of the order.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from dsincubate import registry
from dsincubate.errors import UserError


def check_phases(cfg, root: Path, n_cls: int, info, methods, world_size: int) -> list[tuple[registry.Step, object]]:
    """checks.check_plan for every phase the methods train (sizes, ds_config, outputs made with another config), so
    that a pipeline or `config` refuses at once what a later phase would refuse hours later. Returns the steps, each
    with its phase's `checks.PhasePlan` (None for a step that trains nothing): what `run_pipeline` executes."""
    import torch

    from dsincubate import checks, phases

    steps = registry.plan(methods, cfg.model.num_stages)
    if "m2mkd" in methods:
        check_teacher(cfg, root, methods, n_cls)
    # resolve=False: earlier phases' outputs need not exist yet (the plans do not depend on them)
    return [(s, checks.check_plan(phases.make(s.name, cfg, root, n_cls, s.stage_index, resolve=False), info,
                                  world_size, torch.cuda.is_available()) if s.kind == "train" else None)
            for s in steps]


def check_teacher(cfg, root: Path, methods, n_cls: int) -> None:
    """The m2mKD teacher exists and fits the run (a whole model of the meta model's width, the run's classes and K
    modules), or a method of this pipeline makes it (before m2mkd runs): a wrong teacher is refused before the meta
    model trains, not after."""
    from dsincubate import checkpoint as ckpt
    from dsincubate.layout import RunLayout
    from dsincubate.m2mkd import teacher_spec

    t = cfg.m2mkd.teacher
    made_by = {"e2e": "e2e", "finetune": "di"}
    if t in made_by:
        if made_by[t] in methods:
            return  # trained by this pipeline first, from this config
        if not ckpt.complete(RunLayout(root).phase_dir(t)):
            raise UserError(f"m2mkd.teacher={t}: this run has no finished {t} model; add {made_by[t]} to --methods "
                            "or give a model file")
        teacher_spec(cfg, n_cls, RunLayout(root).model(t))
    elif not Path(t).is_file():
        raise UserError(f"m2mkd.teacher={t}: no such model file")
    else:
        teacher_spec(cfg, n_cls, Path(t))


def run_pipeline(steps: list[tuple[registry.Step, object]], cfg, root: Path, ctx, info, n_cls: int) -> None:
    """Run the plan's steps in order in one process group; stops after a phase that stopped early
    (stop_after_epochs). A finished phase, assembly or evaluation is skipped, so re-running resumes."""
    from dsincubate import dist, phases, trainer
    from dsincubate.accounting import format_summary, summarize
    from dsincubate.assemble import assemble, export
    from dsincubate.evaluate import run_eval
    from dsincubate.layout import RunLayout

    layout = RunLayout(root)
    for s, planned in steps:
        if s.kind == "train":  # the plan checked up front, with the phase's inputs resolved now that they exist
            phase = phases.make(s.name, cfg, root, n_cls, s.stage_index)
            rec = trainer.run_phase(dataclasses.replace(planned, phase=phase), ctx, info)
            if "stopped_at_epoch" in rec:
                return
        elif s.kind == "assemble":
            if ctx.is_main and not (layout.assemble_dir_of(s.name) / "MANIFEST.json").is_file():
                assemble(root, None, cfg.model.num_stages, method=s.name)
        elif s.kind == "eval":  # the assembled model's accuracy before fine-tuning (paper Fig. 10)
            if not (layout.model(s.name).parent / "eval.json").is_file():
                run_eval(s.name, cfg, root, ctx, info, n_cls)
        elif s.kind == "export":
            if ctx.is_main:
                export(root, s.name)
        elif s.kind == "summary":
            dist.barrier()
            if ctx.is_main:
                print(format_summary(summarize(root, cfg.model.num_stages)))
            continue
        if s.kind != "train":
            dist.barrier()
