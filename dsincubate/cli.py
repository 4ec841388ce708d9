"""The `dsincubate` command: one thin subcommand per phase, plus pipeline, export, summary, ops and shards.

    dsincubate pipeline                                   # demo: meta, incubate x K, assemble, finetune, E2E, export
    dsincubate meta      --recipe vit_b16 --output runs/vitb --set data.train=... --set data.val=...
    dsincubate incubate  --recipe vit_b16 --output runs/vitb --module 2
    dsincubate assemble  --recipe vit_b16 --output runs/vitb [--stages a.safetensors b.safetensors ...]
    dsincubate finetune / e2e / export / summary  (same options)
    dsincubate config --plan --methods di,e2e --recipe vit_b16 --output runs/vitb   # check all, print the steps
    deepspeed --num_gpus 8 --module dsincubate incubate --module 0 ...    # the same, under the DeepSpeed launcher

The phases, their subcommands and options and the methods' steps come from `dsincubate.registry`.

Bad input (unknown model, missing data or checkpoint, K that does not fit, bad ds_config, ...) prints one line and
exits with status 2 before any heavy work, leaving existing outputs untouched.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from dsincubate import registry
from dsincubate.errors import UserError


class _Parser(argparse.ArgumentParser):
    """argparse with the project's error contract: one line on stderr, exit 2 (argparse prints usage first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", default=None, help="recipe name (debug, demo, vit_b16, vit_b_dn, vit_l16, vit_h14, "
                   "deit_t_<depth>); default demo, or the output's saved config when it has one")
    p.add_argument("--config", default=None, help="a saved config.json to run instead of a recipe")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. incubate.epochs=50 or model.stage_depths=2,4,4,2")
    p.add_argument("--output", default="runs/demo", help="run directory (one per pipeline run)")
    p.add_argument("--ds-config", default=None, help="ds_configs/ name or path (overrides the recipe's)")
    p.add_argument("--train", default=None, help="training data source (shards, pattern, pipe:, directory)")
    p.add_argument("--val", default=None, help="validation data source")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    p.add_argument("--dry-run", action="store_true", help="run every check a start would run (config, ds_config, "
                   "data, inputs, output, sizes), print what would run, exit 0; starts nothing, writes nothing")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dsincubate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher's
    sub = parser.add_subparsers(dest="command", required=True)
    phases = [(name, registry.phase(name).help) for name in registry.list_phases()]
    methods = ", ".join(f"{m} ({registry.method_help(m)})" for m in registry.list_methods())
    for name, help_ in (*phases,
                        ("eval", "top-1/top-5 of any model of a run (or a model file) on the validation data"),
                        ("pipeline", "every phase in order, then the summary"),
                        ("assemble", "join the K incubated modules"), ("export", "write a timm safetensors file"),
                        ("summary", "print the E2E vs Deep Incubation table of a run"),
                        ("config", "print the resolved config (and field docs with --fields)"),
                        ("import", "write an official Deep-Incubation .pth (meta, incubated module or model) as "
                                   "this run's output")):
        p = sub.add_parser(name, help=help_)
        _common(p)
        if name in registry.stage_phases():
            p.add_argument("--module", "--stage-index", dest="stage_index", type=int, required=True,
                           help="stage index I in 0..K-1")
        if name == "eval":
            hybrids = ", ".join(f"{registry.phase(n).hybrid}:I" for n in registry.stage_phases())
            p.add_argument("--model", dest="which", default="finetune",
                           help=f"{', '.join(registry.named_models())}, {hybrids} or a model file; a comma list "
                                "evaluates several in one start")
        if name == "assemble":
            p.add_argument("--stages", nargs="+", default=None, help="explicit stage files (default: the run's)")
            p.add_argument("--method", choices=registry.stage_phases(), default="incubate",
                           help="whose modules: incubation's (-> assemble/) or m2mKD's students (-> m2mkd/assemble/)")
        if name == "export":
            p.add_argument("--source", choices=registry.exported(), default="finetune")
        if name == "pipeline":
            p.add_argument("--methods", default="di,e2e", help=f"comma list of {methods}")
        if name == "config":
            p.add_argument("--fields", action="store_true", help="list every config field with its documentation")
            p.add_argument("--methods", default="di,e2e,e2e_tune",
                           help="check the phases of these pipeline methods (the launchers' fail-fast check)")
            p.add_argument("--plan", action="store_true", help="after the checks, print the steps of --methods, one "
                           "a line: KIND NAME COUNT DIR (what the launchers run; see dsincubate/plan.py)")
        if name == "import":
            p.add_argument("file", help="a .pth saved by the official code (with model_stages)")
            p.add_argument("--as", dest="as_", choices=registry.exported(), default=None,
                           help="where a whole model goes (default finetune)")
    ops = sub.add_parser("ops", help="report the fused kernels: compatible, built, backend in use, where verified")
    ops.add_argument("rest", nargs=argparse.REMAINDER)
    # Parsed by their own modules, imported on use (keeps start-up light).
    for name, help_ in (("shards", "write WebDataset shards from an ImageFolder or list file"),
                        ("tune", "sweep micro-batch, ZeRO stage, checkpointing and offload; write the best ds_config")):
        sub.add_parser(name, help=help_, add_help=False).add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def load_config(args):
    from dsincubate import recipes
    from dsincubate.config import RunConfig, apply_overrides

    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out} is a file, not a run directory")
    existing = next(p for p in [out, *out.absolute().parents] if p.exists())  # where the run directory would go
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--output {out}: {existing} is not a writable directory")
    saved = out / "config.json"
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise UserError(f"--config {path}: no such file")
        cfg = RunConfig.from_dict(_read_json(path, "--config"))
    elif args.recipe is None and saved.is_file():
        cfg = RunConfig.from_dict(_read_json(saved, "the run's saved config"))  # later phases reuse a run's config
    else:
        cfg = recipes.get(args.recipe or "demo")
    sets = list(args.overrides)
    if args.ds_config:
        sets.append(f"ds_config={args.ds_config}")
    if args.train:
        sets.append(f"data.train={args.train}")
    if args.val:
        sets.append(f"data.val={args.val}")
    return apply_overrides(cfg, sets)


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{what} {path}: unreadable ({e})") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{what} {path}: invalid JSON ({e.msg} at line {e.lineno})") from None


def _preflight(cfg, has_cuda: bool):
    """Cheap checks every command shares: model, K, ds_config, data sources. Returns the data info."""
    from dsincubate import dsconfig
    from dsincubate.data import resolve_data
    from dsincubate.models import family

    family.stage_depths(cfg.model, family.target_spec(cfg.model))
    dsconfig.load(dsconfig.find(cfg.ds_config, has_cuda))
    info = resolve_data(cfg.data, cfg.model.num_classes)
    if cfg.model.num_classes and cfg.model.num_classes < info.num_classes:
        raise UserError(f"model.num_classes={cfg.model.num_classes} but the data has {info.num_classes} classes")
    return info


def _num_classes(cfg, info) -> int:
    return cfg.model.num_classes or info.num_classes


def run(args) -> int:
    if args.command == "ops":
        from dsincubate.ops import report

        return report.main(args.rest)
    if args.command in ("shards", "tune"):
        import importlib

        mod = importlib.import_module("dsincubate.data.shards_cli" if args.command == "shards" else "dsincubate.tune")
        parser = argparse.ArgumentParser(prog=f"dsincubate {args.command}")
        mod.add_arguments(parser)
        return mod.run(parser.parse_args(args.rest))
    cfg = load_config(args)
    root = Path(args.output)
    if args.command == "config" and args.fields:
        from dsincubate.config import ALL_SECTIONS, config_lines

        for cls in ALL_SECTIONS:
            print("\n".join(config_lines(cls)))
        return 0
    if args.command == "import":  # needs no data: the class count comes from the file's head
        from dsincubate.importer import import_file

        if args.dry_run:
            raise UserError("import has no --dry-run; it writes nothing when the file does not fit")
        print(f"[dsincubate] import: wrote {import_file(Path(args.file), cfg, root, args.as_)}")
        return 0
    import torch

    if not torch.cuda.is_available():
        # without a GPU, DeepSpeed would print a warning before choosing the CPU, and torch's extension builder one
        # about the missing CUDA runtime, on every start: noise in front of any error line that follows
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    train = args.command in registry.list_phases()
    if train or args.command in ("pipeline", "eval"):
        from dsincubate.ranks import check_world

        check_world()  # an N-task srun without rank variables: refused before demo data or rank records are written
    info = _preflight(cfg, torch.cuda.is_available())
    n_cls = _num_classes(cfg, info)
    if args.command == "config":  # also the launchers' fail-fast check: it refuses what training would refuse
        from dsincubate import plan

        steps = plan.check_phases(cfg, root, n_cls, info, registry.parse_methods(args.methods), _world_size())
        print("\n".join(registry.plan_lines([s for s, _ in steps])) if args.plan else
              json.dumps(cfg.to_dict(), indent=2))
        return 0
    if args.command == "summary":
        from dsincubate.accounting import format_summary, summarize

        print(format_summary(summarize(root, cfg.model.num_stages, write=not args.dry_run)))
        return 0
    if args.command in ("assemble", "export"):
        return _single_process(args, cfg, root)
    return _train_or_eval(args, cfg, root, info, n_cls)


def _train_or_eval(args, cfg, root: Path, info, n_cls: int) -> int:
    """A phase, the pipeline or eval: every check and plan first (all that --dry-run does), then the process group."""
    import torch

    from dsincubate import checks, dist, phases, plan, trainer

    planned = None  # the phase command's checks.PhasePlan: checked here, executed by the run
    world_size = _world_size()
    # its inputs checked and its run planned before any process group or engine exists
    if args.command in registry.list_phases():
        planned = checks.check_plan(phases.make(args.command, cfg, root, n_cls, getattr(args, "stage_index", None)),
                                    info, world_size, torch.cuda.is_available())
    if args.command == "pipeline":
        steps = plan.check_phases(cfg, root, n_cls, info, registry.parse_methods(args.methods), world_size)
    if args.command == "eval":
        from dsincubate.evaluate import resolve

        which = [w.strip() for w in args.which.split(",") if w.strip()]
        # a missing or wrong model fails here, before the process group; each is loaded once
        models = {w: resolve(w, cfg, root, n_cls) for w in which}
    if args.dry_run:
        print(f"dsincubate {args.command}: dry run, all checks passed; would write under {root}")
        return 0
    if planned is not None:
        checks.preflight(planned)
    ctx = dist.init()
    if args.command == "eval":
        from dsincubate.evaluate import run_eval

        for w in which:
            run_eval(w, cfg, root, ctx, info, n_cls, resolved=models[w])
    else:
        if ctx.is_main:
            root.mkdir(parents=True, exist_ok=True)
            if not (root / "config.json").is_file():
                cfg.save(root / "config.json")
        if planned is not None:
            trainer.run_phase(planned, ctx, info)
        else:
            plan.run_pipeline(steps, cfg, root, ctx, info, n_cls)
    # reached only when the work finished (an error left above, exit non-zero): the engines are released by then
    # (trainer.release); the groups go before the interpreter exits, or finalization may abort the rank (exit -6)
    if dist.shutdown() and planned is not None:
        _record_shutdown(planned.phase)
    return 0


def _record_shutdown(phase) -> None:
    """Add to this rank's record (`<phase>/ranks/rank_<r>.json`, written at its start) that its process group is
    destroyed and no V-MoE expert group of DeepSpeed's is left (a phase that was complete already has no record)."""
    import time

    import torch.distributed as tdist
    from deepspeed.utils import groups

    from dsincubate import checkpoint as ckpt

    path = phase.out_dir / "ranks" / f"rank_{os.environ.get('RANK', '0')}.json"
    if path.is_file():
        left = len(groups._EXPERT_PARALLEL_GROUP) + len(groups._EXPERT_DATA_PARALLEL_GROUP)
        rec = dict(json.loads(path.read_text()), process_group_destroyed=not tdist.is_initialized(),
                   deepspeed_expert_groups_left=left, shutdown_at=time.time())
        ckpt.atomic_write_json(path, rec)


def _world_size() -> int:
    """The world size the command will run at (the launcher's WORLD_SIZE; 1 alone), known before any process group."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _single_process(args, cfg, root: Path) -> int:
    from dsincubate.assemble import assemble, export

    if os.environ.get("RANK", "0") != "0" and not args.dry_run:
        return 0  # under a launcher, rank 0 alone writes the files
    if args.command == "assemble":
        path = assemble(root, [Path(s) for s in args.stages] if args.stages else None, cfg.model.num_stages,
                        dry_run=args.dry_run, method=args.method)
    else:
        path = export(root, args.source, dry_run=args.dry_run)
    print(f"dsincubate {args.command}: dry run, all checks passed; would write {path}" if args.dry_run else
          f"[dsincubate] {args.command}: wrote {path}")
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command in ("shards", "tune", "ops"):
        # their own parsers get the words after the command's name as given (argparse would have moved the options
        # before the first positional word behind the others: `tune --recipe debug` lost --recipe's value)
        argv = sys.argv[1:] if argv is None else list(argv)
        args.rest = argv[argv.index(args.command) + 1:]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return run(args)
    except UserError as e:
        print(f"dsincubate: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dsincubate: interrupted; the latest complete checkpoint is kept", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `dsincubate config --fields | head`: the reader left; no traceback, like other tools
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
