"""The one list of the project's phases and methods: everything that names a phase or a pipeline step reads it.

A phase declares (`PhaseSpec`) its name, its class (imported on first use, so that the CLI's parser, the config and
the launchers' plan need no torch), whether it takes a stage index (`--module I`), its config section, its output
directory and file, and how eval and export name its output. A method (di, e2e, e2e_tune, m2mkd) is an ordered list
of steps; `plan(methods, K)` joins the methods a pipeline runs into one order, each step once.

    from dsincubate import registry
    registry.list_phases()                      # ('meta', 'incubate', 'finetune', 'e2e', ...)
    registry.phase("incubate").per_stage        # True: one job per stage index, `--module I`
    registry.method_steps("di", 4)              # [Step('train', 'meta'), Step('train', 'incubate', 0), ...]
    python -m dsincubate config --plan --methods di,e2e   # the plan, one step a line (the launchers read it)

Adding a phase is one file holding its `Phase` subclass and one `register_phase(PhaseSpec(...))` call below (a
phase with a section of its own also needs that `TrainConfig` field in `RunConfig`); the CLI subcommand, `--module`,
the config check, the layout, eval, export, tune and the launchers follow from the entry.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field

from dsincubate.errors import UserError

STEP_KINDS = ("train", "assemble", "eval", "export", "summary")


@dataclass(frozen=True)
class PhaseSpec:
    """What the rest of the package needs to know about a training phase."""

    name: str
    cls: str
    """The `Phase` subclass as "module:Class", imported by `phase_class` on first use."""
    help: str
    per_stage: bool = False
    """One job per stage index I (the CLI's `--module I`); its output directory holds `{i}`."""
    section: str = ""
    """The RunConfig section (a TrainConfig field) holding its recipe; default: the phase's name."""
    out_dir: str = ""
    """Its output directory under the run root ("{i}": the stage index); default: the phase's name."""
    output_file: str = "model.safetensors"
    exports: bool = False
    """Its output is a whole target model: `export --source`, `import --as` and eval read it by the phase's name."""
    assembly: str = ""
    """Per-stage phases: the model name of its K outputs joined (`assemble --method NAME`), and eval's name of one
    output inside the meta model is `<hybrid>:<I>`."""
    assembly_dir: str = ""
    hybrid: str = ""
    resizes: bool = False
    """It may train at a resolution of its own (`<section>.img_size`: a high-resolution fine-tune)."""
    summary: str = ""
    """Its row label in `dsincubate summary` (top-1 and device-hours of each finished output); empty for the
    built-in phases, whose rows the summary's method tables (DI, E2E, m2mKD) give."""

    @property
    def config_section(self) -> str:
        return self.section or self.name

    def output_dir(self, stage_index: int | None = None) -> str:
        """Its output directory relative to the run root."""
        rel = self.out_dir or (f"{self.name}/module_{{i}}" if self.per_stage else self.name)
        if self.per_stage:
            if stage_index is None:
                raise ValueError(f"the {self.name} phase needs a stage_index")
            return rel.format(i=stage_index)
        return rel


@dataclass(frozen=True)
class Step:
    """One step of a pipeline: train a phase (at one stage index when `stage_index` is set), assemble a per-stage
    phase's outputs, evaluate or export a named model, print the summary."""

    kind: str
    name: str = ""
    stage_index: int | None = None


@dataclass(frozen=True)
class MethodSpec:
    name: str
    help: str
    steps: tuple[tuple[str, str], ...] = field(default=())
    """(kind, name) pairs; a `train` of a per-stage phase stands for its K jobs, independent of each other (they
    may run concurrently)."""


_PHASES: dict[str, PhaseSpec] = {}
_METHODS: dict[str, MethodSpec] = {}


def register_phase(spec: PhaseSpec) -> PhaseSpec:
    if spec.name in _PHASES or not spec.name.isidentifier():
        raise ValueError(f"phase {spec.name!r} is registered already or not an identifier")
    _PHASES[spec.name] = spec
    return spec


def register_method(spec: MethodSpec) -> MethodSpec:
    for kind, name in spec.steps:
        if kind not in STEP_KINDS or (kind in ("train", "assemble") and name not in _PHASES):
            raise ValueError(f"method {spec.name}: unknown step {kind} {name}")
    if spec.name in _METHODS:
        raise ValueError(f"method {spec.name!r} is registered already")
    _METHODS[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    """Remove a phase or method (tests that register a toy one)."""
    _PHASES.pop(name, None)
    _METHODS.pop(name, None)


def list_phases() -> tuple[str, ...]:
    return tuple(_PHASES)


def list_methods() -> tuple[str, ...]:
    return tuple(_METHODS)


def phase(name: str) -> PhaseSpec:
    if name not in _PHASES:
        raise UserError(f"unknown phase {name!r} (one of {', '.join(_PHASES)})")
    return _PHASES[name]


def method_help(name: str) -> str:
    return _METHODS[name].help


def phase_class(name: str) -> type:
    module, cls = phase(name).cls.split(":")
    return getattr(importlib.import_module(module), cls)


def stage_phases() -> tuple[str, ...]:
    """The phases that train one stage index per job (incubate, m2mkd)."""
    return tuple(n for n, s in _PHASES.items() if s.per_stage)


def train_sections() -> tuple[str, ...]:
    """The RunConfig sections the phases read (each once, in registration order)."""
    return tuple(dict.fromkeys(s.config_section for s in _PHASES.values()))


def resizing_sections() -> tuple[str, ...]:
    """The config sections whose `img_size` may differ from the model's (fine-tuning phases)."""
    return tuple(dict.fromkeys(s.config_section for s in _PHASES.values() if s.resizes))


def exported() -> tuple[str, ...]:
    """Phases whose output is a whole target model (export sources, import targets, eval names)."""
    return tuple(n for n, s in _PHASES.items() if s.exports)


def assemblies() -> dict[str, PhaseSpec]:
    """{assembled model name: the per-stage phase whose outputs it joins}."""
    return {s.assembly: s for s in _PHASES.values() if s.per_stage and s.assembly}


def summarized() -> tuple[str, ...]:
    """Phases with a summary row of their own (`PhaseSpec.summary`)."""
    return tuple(n for n, s in _PHASES.items() if s.summary)


def named_models() -> tuple[str, ...]:
    """The names `eval --model` takes for a run's whole models (besides `<hybrid>:I` and files)."""
    return ("meta", *assemblies(), *exported())


def method_steps(method: str, num_stages: int) -> list[Step]:
    """The steps of one method, per-stage phases expanded to their K jobs."""
    if method not in _METHODS:
        raise UserError(f"unknown method {method!r} (one of {', '.join(_METHODS)})")
    steps = []
    for kind, name in _METHODS[method].steps:
        if kind == "train" and _PHASES[name].per_stage:
            steps += [Step(kind, name, i) for i in range(num_stages)]
        else:
            steps.append(Step(kind, name))
    return steps


def trained_phases(method: str) -> tuple[str, ...]:
    """The phases a method trains, in its order, each once (a per-stage phase stands for its K jobs); what the
    benchmarks run, time and read the outputs of."""
    if method not in _METHODS:
        raise UserError(f"unknown method {method!r} (one of {', '.join(_METHODS)})")
    return tuple(dict.fromkeys(name for kind, name in _METHODS[method].steps if kind == "train"))


def parse_methods(text: str) -> list[str]:
    """A --methods comma list, checked, in the registry's order (the order the pipeline runs them)."""
    given = {m.strip() for m in text.split(",") if m.strip()}
    if not given or given - set(_METHODS):
        raise UserError(f"--methods {text!r}: use one or more of {', '.join(_METHODS)}")
    return [m for m in _METHODS if m in given]


def plan(methods, num_stages: int) -> list[Step]:
    """The steps of several methods in one order, each step once (di and m2mkd share the meta model; e2e_tune
    starts from e2e's model), then the summary."""
    steps = [s for m in parse_methods(",".join(methods)) for s in method_steps(m, num_stages)]
    return list(dict.fromkeys(steps)) + [Step("summary")]


def plan_lines(steps: list[Step]) -> list[str]:
    """The plan as the launchers read it, one line a step: `KIND NAME COUNT DIR`. Consecutive jobs of a per-stage
    phase are one line with COUNT K and DIR holding `{i}` (they are independent: they may run concurrently); NAME
    and DIR are `-` where a step has none; DIR is relative to the run's --output."""
    lines, i = [], 0
    while i < len(steps):
        s = steps[i]
        if s.kind == "train" and s.stage_index is not None:
            j = i
            while j < len(steps) and steps[j].kind == "train" and steps[j].name == s.name:
                j += 1
            lines.append(f"train {s.name} {j - i} {phase(s.name).out_dir or s.name + '/module_{i}'}")
            i = j
            continue
        lines.append(f"{s.kind} {s.name or '-'} 1 {_step_dir(s)}")
        i += 1
    return lines


def _step_dir(s: Step) -> str:
    if s.kind == "train":
        return phase(s.name).output_dir()
    if s.kind == "assemble":
        return phase(s.name).assembly_dir
    if s.kind == "export":
        return f"export/{s.name}"
    if s.kind == "eval":
        return assemblies()[s.name].assembly_dir if s.name in assemblies() else phase(s.name).output_dir()
    return "-"


# ------------------------------------------------------------------------------------------- the built-in entries

for _spec in (
    PhaseSpec("meta", "dsincubate.phases:MetaPhase", "pre-train the meta model"),
    PhaseSpec("incubate", "dsincubate.phases:IncubatePhase", "incubate target module I", per_stage=True,
              output_file="stage.safetensors", assembly="assemble", assembly_dir="assemble", hybrid="hybrid"),
    PhaseSpec("finetune", "dsincubate.phases:FinetunePhase", "fine-tune the assembled model", exports=True,
              resizes=True),
    PhaseSpec("e2e", "dsincubate.phases:E2EPhase", "train the target end to end", exports=True),
    PhaseSpec("e2e_tune", "dsincubate.phases:E2ETunePhase",
              "train the E2E model further with the fine-tune recipe (the paper's control)", exports=True,
              resizes=True),
    PhaseSpec("m2mkd", "dsincubate.m2mkd:M2mkdPhase",
              "distil teacher module I into student module I through the meta model (m2mKD)", per_stage=True,
              output_file="stage.safetensors", assembly="m2mkd_assemble", assembly_dir="m2mkd/assemble",
              hybrid="m2mkd_hybrid"),
    PhaseSpec("m2mkd_finetune", "dsincubate.m2mkd:M2mkdFinetunePhase", "train the assembled m2mKD students end to end",
              out_dir="m2mkd/finetune", exports=True),
):
    register_phase(_spec)

for _method in (
    MethodSpec("di", "Deep Incubation: meta model, K incubated modules, assembly, fine-tune",
               (("train", "meta"), ("train", "incubate"), ("assemble", "incubate"), ("eval", "assemble"),
                ("train", "finetune"), ("export", "finetune"))),
    MethodSpec("e2e", "the end-to-end baseline", (("train", "e2e"), ("export", "e2e"))),
    MethodSpec("e2e_tune", "E2E, then trained further with the fine-tune recipe (the paper's control)",
               (("train", "e2e"), ("export", "e2e"), ("train", "e2e_tune"))),
    # after di and e2e (registration order is run order): the teacher may be this run's finetune or e2e model
    MethodSpec("m2mkd", "m2mKD: distil m2mkd.teacher into K student modules, assemble, train them end to end",
               (("train", "meta"), ("train", "m2mkd"), ("assemble", "m2mkd"), ("eval", "m2mkd_assemble"),
                ("train", "m2mkd_finetune"), ("export", "m2mkd_finetune"))),
):
    register_method(_method)

# the decoupled baselines of the paper's Tab. 2 (dsincubate.decoupled; issue 24): after the built-in methods
register_phase(PhaseSpec("dgl", "dsincubate.decoupled:DGLPhase",
                         "train the target's K modules at once, each on its own auxiliary classifier (DGL)",
                         exports=True, summary="DGL"))
register_phase(PhaseSpec("infopro", "dsincubate.decoupled:InfoProPhase",
                         "train the target's K modules at once on InfoPro's local losses (reconstruction + CE)",
                         exports=True, summary="InfoPro"))
register_method(MethodSpec("dgl", "DGL: decoupled greedy learning, K gradient-isolated modules trained at once",
                           (("train", "dgl"), ("export", "dgl"))))
register_method(MethodSpec("infopro", "InfoPro: DGL's modules with InfoPro's local loss",
                           (("train", "infopro"), ("export", "infopro"))))


def main(argv=None) -> int:
    """`python -m dsincubate.registry phases|stage_phases|methods`: the names, one a line (for the launchers; needs
    no torch, so it starts fast)."""
    import sys

    what = (argv if argv is not None else sys.argv[1:]) or ["phases"]
    lists = {"phases": list_phases, "stage_phases": stage_phases, "methods": list_methods}
    if what[0] not in lists:
        print(f"registry: error: use one of {', '.join(lists)}", file=sys.stderr)
        return 2
    print("\n".join(lists[what[0]]()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
