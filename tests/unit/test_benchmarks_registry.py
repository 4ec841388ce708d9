"""The benchmarks read their phases, pipeline orders and output directories from dsincubate/registry.py (issue 23):
a phase added to a method in the registry shows up in what step_cost measures, what a gpu_hours budget trains and
counts, vith_memory's default phases and m2mKD's FLOP budget; and no benchmark source spells a phase list, a
per-stage phase test or a per-stage output directory itself (an AST scan that the code of 2fa0a8a fails).

    pytest tests/unit/test_benchmarks_registry.py -q
"""
import ast
import dataclasses
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from benchmarks import common, gpu_hours, m2mkd_vs_e2e, step_cost, vith_memory  # noqa: E402
from dsincubate import accounting, checkpoint as ckpt, registry  # noqa: E402

# Benchmarks that still list phases, left to other changes: paper_claims.py's ablation filter and tuning.py's grid
# (issue 23), paper_claims_decoupled.py's baselines and epoch shares (issue 24). Remove an entry when its file reads
# the registry.
NOT_YET = {"paper_claims.py", "tuning.py", "paper_claims_decoupled.py"}


@pytest.fixture
def toy(monkeypatch):
    """A per-stage phase "toy" (incubation's class and recipe, output under toy_out/) trained by di after incubate
    and by m2mkd after its students; the registry is restored afterwards."""
    registry.register_phase(registry.PhaseSpec("toy", "dsincubate.phases:IncubatePhase", "a toy phase",
                                               per_stage=True, section="incubate", out_dir="toy_out/m{i}"))
    for name, after in (("di", ("assemble", "incubate")), ("m2mkd", ("train", "m2mkd"))):
        spec = registry._METHODS[name]
        steps = list(spec.steps)
        steps.insert(steps.index(after) + 1, ("train", "toy"))
        monkeypatch.setitem(registry._METHODS, name, dataclasses.replace(spec, steps=tuple(steps)))
    yield
    registry.unregister("toy")


def _run(root: Path, rel: str, wall: float, top1: float, **extra) -> None:
    d = root / rel
    d.mkdir(parents=True)
    ckpt.atomic_write_json(d / "run.json", {"wall_seconds": wall, "world_size": 1, "epochs": 2,
                                            "device_seconds": accounting.device_seconds(wall, 1),
                                            "final": {"top1": top1}, **extra})
    ckpt.write_manifest(d, ["run.json"])


def test_step_cost_measures_every_training_step_of_the_registrys_methods(toy):
    assert step_cost.kinds(2) == ["e2e", "meta", "incubate0", "incubate1", "toy0", "toy1", "finetune"]
    assert step_cost.label("toy1") == "toy[1]" and step_cost.label("meta") == "meta"
    assert step_cost.make_phase("toy1", "tiny", 2).stage_index == 1  # a per-stage phase gets its stage index


def test_gpu_hours_trains_and_counts_a_phase_the_registry_adds_to_deep_incubation(toy, tmp_path):
    assert gpu_hours.sweep_phases() == ("meta", "incubate", "toy", "finetune", "e2e")
    _run(tmp_path, "meta", 360, 40.0)
    for i in range(2):
        _run(tmp_path, f"incubate/module_{i}", 720, 50.0)
    _run(tmp_path, "finetune", 900, 70.0)
    _run(tmp_path, "e2e", 1800, 65.0)
    assert "di" not in gpu_hours.collect(tmp_path, 2)  # the toy jobs have not run: DI is unfinished
    for i in range(2):
        _run(tmp_path, f"toy_out/m{i}", 180, 55.0)
    di = gpu_hours.collect(tmp_path, 2)["di"]
    assert di["device_hours"] == pytest.approx((360 + 2 * 720 + 2 * 180 + 900) / 3600)
    assert di["phases_hours"]["toy"] == [pytest.approx(0.05)] * 2 and di["top1"] == 70.0
    assert list(di["epochs"]) == ["meta", "incubate", "toy", "finetune"]


def test_vith_memory_defaults_to_deep_incubations_phases_and_refuses_unknown_ones(toy, capsys):
    assert vith_memory.build_parser().parse_args([]).phases == "meta,incubate,toy,finetune"
    assert vith_memory.main(["--phases", "meta,nonesuch"]) == 2
    assert "nonesuch" in capsys.readouterr().err


def test_m2mkd_budget_counts_every_phase_m2mkd_trains(toy, tmp_path):
    def run(rel, flops):
        _run(tmp_path, rel, 100, 1.0, flops={"train_step_per_image": flops}, images_processed=10,
             history=[{"epoch_seconds": 1000.0}])
    dirs = common.train_dirs("m2mkd", 2)
    assert dirs == ["meta", "m2mkd/module_0", "m2mkd/module_1", "toy_out/m0", "toy_out/m1", "m2mkd/finetune"]
    for rel in dirs:
        run(rel, 1.0)
    # six phases of 10 images at 1 FLOP each, the assembled student 5 FLOPs an epoch: 12 epochs (device-seconds
    # ask for fewer: 600 s against 1000 s an epoch)
    epochs, plan = m2mkd_vs_e2e.e2e_epochs(tmp_path, 2)
    assert plan["kd_flops"] == 60.0 and epochs == 12


# ------------------------------------------------------------------ the source scan

def _phase_literals(tree: ast.AST, phases: set[str], stage_phases: set[str]) -> list[str]:
    """What in a module spells the registry's knowledge: a list/tuple/set, dict keys or comma string of two or more
    phase names and nothing else; a comparison or startswith against a per-stage phase's name (which phases take a
    stage index); a string holding the per-stage output layout `module_`."""
    found = []

    def names(values) -> bool:
        strs = [v.value for v in values if isinstance(v, ast.Constant) and isinstance(v.value, str)]
        return len(values) >= 2 and len(strs) == len(values) and set(strs) <= phases

    for node in ast.walk(tree):
        line = getattr(node, "lineno", "?")
        if isinstance(node, (ast.List, ast.Tuple, ast.Set)) and names(node.elts):
            found.append(f"line {line}: a phase list")
        elif isinstance(node, ast.Dict) and None not in node.keys and names(node.keys):
            found.append(f"line {line}: a dict keyed by phases")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            parts = node.value.split(",")
            if len(parts) >= 2 and set(parts) <= phases:
                found.append(f"line {line}: a comma list of phases {node.value!r}")
            if "module_" in node.value:
                found.append(f"line {line}: a per-stage output directory {node.value!r}")
        elif isinstance(node, ast.Compare):
            consts = [c.value for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
            if set(consts) & stage_phases:
                found.append(f"line {line}: a comparison with a per-stage phase's name")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "startswith"
              and any(isinstance(a, ast.Constant) and a.value in stage_phases for a in node.args)):
            found.append(f"line {line}: startswith a per-stage phase's name")
    return found


def test_the_scan_finds_each_way_of_hard_coding_phases():
    src = """
for name in ("meta", "incubate", "finetune"): pass
runs = {"meta": 1, "e2e": 2}
p = "--phases", "meta,incubate"
d = f"m2mkd/module_{i}"
x = i if phase == "incubate" else None
y = kind.startswith("incubate")
ok = ("teacher", "meta", "e2e"), {"e2e": 1}, "e2e", name == "e2e"
"""
    found = _phase_literals(ast.parse(src), set(registry.list_phases()), set(registry.stage_phases()))
    assert sorted(int(f.split(":")[0].removeprefix("line ")) for f in found) == [2, 3, 4, 5, 6, 7]


def test_no_benchmark_spells_a_phase_list_or_a_per_stage_layout_itself():
    phases, stage = set(registry.list_phases()), set(registry.stage_phases())
    bad = {}
    for path in sorted((REPO / "benchmarks").glob("*.py")):
        if path.name not in NOT_YET:
            found = _phase_literals(ast.parse(path.read_text()), phases, stage)
            if found:
                bad[path.name] = found
    assert not bad, "benchmarks must take these from dsincubate.registry:\n" + json.dumps(bad, indent=1)
