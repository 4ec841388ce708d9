"""Shared helpers of the benchmarks: which device this is, the git commit, result files and tables.

Every benchmark writes `benchmarks/results/<name>_<device-kind>_<YYYY-MM-DD>.json` (`write_result`; a second run on
the same day gets `_2`, `_3`, ..., so a rerun never overwrites an earlier result) holding the device description, the
exact command, the git commit, the date and the load average at the start (`header`; the numbers are only comparable
between runs on the same kind of device with a quiet machine), plus the printed table as text next to it (`.txt`).
Child processes, their results and the process's memory are `dsincubate.procutil`'s. Import from a benchmark script
as `from benchmarks import common` (the scripts put the repository root on sys.path). Which phases a benchmark trains
or reads, in which order, and where their outputs are come from `dsincubate.registry` (`train_dirs`, `step_kinds`,
`split_kind`; `registry.trained_phases`): no benchmark lists phases itself (tests/unit/test_benchmarks_registry.py).

Honest rows: every throughput/step-cost row names the model's parameter count, and `check_params` refuses a ViT-B/L/H
preset whose count is not the real model's (a recipe's depth/width override kept under `model.preset=` once turned
a 4-block width-48 model into "ViT-H"). MFU is model FLOP/s per device over the device's dense bf16 peak from
`PEAK_BF16_TFLOPS` (`peak_bf16_tflops`, by the name torch reports); a measured matmul rate is its own number.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path

from dsincubate.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# Dense (no sparsity) bf16 tensor-core peak, TFLOP/s, from NVIDIA's datasheets, matched against the name
# torch.cuda.get_device_name() reports ("NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA A100-SXM4-80GB", ...).
# The first match wins; H100 NVL / H200 NVL (835) and GH200 are left out: an unknown device gets no MFU, not a wrong
# one.
PEAK_BF16_TFLOPS: tuple[tuple[str, str, float], ...] = (
    ("H100 PCIe", r"\bH100\b.*\bPCIE\b", 756.0),
    ("H100 SXM", r"\bH100\b(?!.*\b(PCIE|NVL)\b)", 989.0),
    ("H200", r"\bH200\b(?!.*\bNVL\b)", 989.0),
    ("A100", r"\bA100\b", 312.0),
)

# Parameters of the presets with an ImageNet-1k head (1000 classes), and how far a build may be off.
EXPECTED_PARAMS = {"vit_b16": 86.6e6, "vit_l16": 304e6, "vit_h14": 632e6}
PARAM_TOLERANCE = 0.005


def peak_bf16_tflops(device_name: str) -> tuple[str, float] | None:
    """(table entry, dense bf16 TFLOP/s) for a device name as torch reports it; None for a device not in the table."""
    name = device_name.upper()
    for entry, pattern, tflops in PEAK_BF16_TFLOPS:
        if re.search(pattern, name):
            return entry, tflops
    return None


def mfu(flops_per_image: float, images_per_second: float, devices: int, peak_tflops: float | None) -> float | None:
    """Model FLOP utilisation: the model's FLOP/s per device over the device's peak (None without a peak)."""
    if not peak_tflops or not images_per_second or devices < 1:
        return None
    return flops_per_image * images_per_second / devices / (peak_tflops * 1e12)


def expected_params(preset: str, num_classes: int, embed_dim: int) -> float | None:
    """The preset's real parameter count with a `num_classes` head (the table is for 1000 classes)."""
    if preset not in EXPECTED_PARAMS:
        return None
    return EXPECTED_PARAMS[preset] + (num_classes - 1000) * (embed_dim + 1)


def check_params(preset: str, params: int, num_classes: int, embed_dim: int) -> str | None:
    """None when `params` is the preset's real model (within PARAM_TOLERANCE), else the one-line reason."""
    want = expected_params(preset, num_classes, embed_dim)
    if want is None or abs(params - want) <= PARAM_TOLERANCE * want:
        return None
    return (f"preset {preset}: the model has {params / 1e6:.1f} M parameters, the real {preset} {want / 1e6:.1f} M "
            f"({num_classes} classes): a recipe's depth/width override is shaping it; refusing to report it as "
            f"{preset}")


def model_params(cfg, num_classes: int | None = None) -> dict:
    """The target model of a RunConfig counted on the meta device (no memory, no init): parameters, depth, width."""
    import torch

    from dsincubate.models import vit

    spec = vit.target_spec(cfg.model, num_classes)
    with torch.device("meta"):
        model = vit.build(spec)
    kw = spec.kwargs
    return {"params": sum(p.numel() for p in model.parameters()), "depth": kw["depth"], "embed_dim": kw["embed_dim"],
            "num_heads": kw["num_heads"], "num_classes": kw.get("num_classes", 0)}


# ---------------------------------------------------------------- phases and their outputs: the registry's

def train_dirs(method: str, num_stages: int) -> list[str]:
    """The output directories (relative to a run's root) of the training steps of a method, in its order, a
    per-stage phase's K jobs each: where a benchmark reads the run.json of each phase it counts."""
    from dsincubate import registry

    return [registry.phase(s.name).output_dir(s.stage_index) for s in registry.method_steps(method, num_stages)
            if s.kind == "train"]


def split_kind(kind: str) -> tuple[str, int | None]:
    """A step kind as the benchmarks name it, `<phase>` or `<per-stage phase><I>` (incubate2), as (phase, I)."""
    from dsincubate import registry

    if kind in registry.list_phases() and not registry.phase(kind).per_stage:
        return kind, None
    for name in registry.stage_phases():
        if kind.startswith(name) and kind[len(name):].isdigit():
            return name, int(kind[len(name):])
    raise UserError(f"unknown step {kind!r}: a phase of {', '.join(registry.list_phases())}, a per-stage one "
                    "followed by its stage index")


def step_kinds(methods, num_stages: int) -> list[str]:
    """The training steps of methods in order, each once, as step kinds (`meta`, `incubate0`, ...)."""
    from dsincubate import registry

    return list(dict.fromkeys(f"{s.name}{'' if s.stage_index is None else s.stage_index}" for m in methods
                              for s in registry.method_steps(m, num_stages) if s.kind == "train"))


def cold_phases(method: str) -> tuple[str, ...]:
    """The phases a method trains from a cold start, in its order, each once: those before its first assembly (DI's
    meta model and incubation, not its fine-tune, which starts from the assembled model; every phase of E2E). What
    gets a warm-up of its own in tuning.py's grid and the decoupled ResNet cell."""
    from dsincubate import registry

    steps = registry.method_steps(method, 1)
    kinds = [s.kind for s in steps]
    cold = steps[:kinds.index("assemble")] if "assemble" in kinds else steps
    return tuple(dict.fromkeys(s.name for s in cold if s.kind == "train"))


def sections(phases) -> tuple[str, ...]:
    """The config sections of phases (the KEY of an override `KEY.lr=...`), each once, in the phases' order: a phase
    reading another's recipe (PhaseSpec.section) is set through that one's section."""
    from dsincubate import registry

    return tuple(dict.fromkeys(registry.phase(p).config_section for p in phases))


def exit_with(main) -> None:
    """Exit with a benchmark's `main()`: bad input or settings found mid-run (`UserError`: a tuning cell with two
    optimizers, an unfinished search) end in one line on stderr and exit 2, not a traceback."""
    from dsincubate.errors import UserError

    try:
        sys.exit(main())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def extra_sets(extra: list[str]) -> list[str]:
    """The overrides of a dsincubate argument list: the value after each `--set`."""
    return [extra[i + 1] for i, a in enumerate(extra[:-1]) if a == "--set"]


def set_threads(n: int | None = None) -> int:
    """Use every core once (or `n`): an oversubscribed CPU makes torch many times slower."""
    import torch

    n = n or int(os.environ.get("OMP_NUM_THREADS", 0) or os.cpu_count() or 1)
    torch.set_num_threads(n)
    return n


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def device(accelerator: bool = True) -> dict:
    """What the numbers were measured on: the accelerator if there is one (and `accelerator`), else the CPU."""
    import torch

    d = {"cpu_model": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(),
         "python": platform.python_version(), "torch": torch.__version__,
         "load_average_at_start": list(os.getloadavg())}
    try:
        import deepspeed

        d["deepspeed"] = deepspeed.__version__
    except Exception:  # noqa: BLE001
        pass
    if accelerator and torch.cuda.is_available():
        d.update(type="cuda", name=torch.cuda.get_device_name(0), count=torch.cuda.device_count(),
                 memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
    else:
        d.update(type="cpu", name=f"{d['cpu_model']} ({d['cores']} cores)", count=1,
                 memory_gib=round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1))
    return d


def device_kind(d: dict | None = None) -> str:
    """Short name for result files: `cpu2` (2 cores), `h100`, `a100`, ..."""
    d = d or device()
    if d["type"] == "cpu":
        return f"cpu{d['cores']}"
    m = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Z]?)\b", d["name"].upper())
    return (m.group(1) if m else re.sub(r"[^a-z0-9]+", "_", d["name"].lower())).lower()


def git_commit(root: Path = ROOT) -> str:
    """HEAD, '+dirty' where the code (dsincubate/, benchmarks/, ds_configs/) differs from it. benchmarks/results/ is
    not code: a worktree that other runs are writing results into still ran clean code."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "dsincubate", "benchmarks", "ds_configs",
                                ":(exclude)benchmarks/results"],
                               cwd=root, capture_output=True, text=True).stdout.strip()
        return sha + ("+dirty" if sha and dirty else "")
    except OSError:
        return "unknown"


def command() -> str:
    return " ".join(shlex.quote(a) for a in [os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(
        str(ROOT)) else sys.executable, *sys.argv])


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def header(benchmark: str, dev: dict | None = None) -> dict:
    return {"benchmark": benchmark, "date": now(), "command": command(), "git_commit": git_commit(),
            "device": dev or device()}


def result_path(name: str, dev: dict | None = None, date: str | None = None, suffixes=(".json", ".txt"),
                kind: str | None = None) -> Path:
    """`benchmarks/results/<name>_<device-kind>_<YYYY-MM-DD>.json`, with `_2`, `_3`, ... where a file of that name
    (with any of `suffixes`) exists already: a rerun never overwrites an earlier result. `kind` overrides the
    device kind; `date` (ISO, as in `header`) defaults to today (UTC)."""
    day = (date or now())[:10]
    stem = f"{name}_{kind or device_kind(dev)}_{day}"
    n = 1
    while True:
        path = RESULTS / (f"{stem}.json" if n == 1 else f"{stem}_{n}.json")
        if not any(path.with_suffix(s).exists() for s in suffixes):
            return path
        n += 1


def write_result(name: str, record: dict, table: str | None = None, out: str | Path | None = None,
                 kind: str | None = None) -> Path:
    """Write the JSON record (and the table as text next to it, and inside it): to `out` where given, else to a new
    `result_path` under benchmarks/results/ named after the record's device and date."""
    path = Path(out) if out else result_path(name, record.get("device"), record.get("date"), kind=kind)
    path.parent.mkdir(parents=True, exist_ok=True)
    if table is not None:
        record = dict(record, table=table.splitlines())
        path.with_suffix(".txt").write_text(table + "\n")
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    tmp.replace(path)
    return path


def fmt(v, spec: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float) and spec:
        return format(v, spec)
    return str(v)


def table(headers: list[str], rows: list[list], specs: list[str] | None = None) -> str:
    """A plain aligned text table; `specs` are format specs per column for floats."""
    specs = specs or [""] * len(headers)
    cells = [[fmt(v, s) for v, s in zip(r, specs)] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells])
