"""The benchmarks read their phases, pipeline orders and output directories from dsincubate/registry.py (issue 23):
a phase added to a method in the registry shows up in what step_cost measures, what a gpu_hours budget trains and
counts, vith_memory's default phases and m2mKD's FLOP budget; paper_claims' tuning grid, decoupled cells and budget
split keep the override strings their finished runs are keyed by; and no benchmark source spells a phase list, a
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

from benchmarks import common, gpu_hours, m2mkd_vs_e2e, step_cost, tuning, vith_memory  # noqa: E402
from benchmarks import paper_claims_cells as cells, paper_claims_decoupled as decoupled  # noqa: E402
from dsincubate import accounting, checkpoint as ckpt, registry  # noqa: E402
from dsincubate.errors import UserError  # noqa: E402


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


@pytest.fixture
def own_phase(monkeypatch):
    """A phase "toy2" with a recipe section of its own (its name), trained by di right after incubation (before the
    assembly, so from a cold start), and a method "toyb" that trains it alone and exports it."""
    registry.register_phase(registry.PhaseSpec("toy2", "dsincubate.phases:MetaPhase", "a toy phase", exports=True))
    spec = registry._METHODS["di"]
    steps = list(spec.steps)
    steps.insert(steps.index(("train", "incubate")) + 1, ("train", "toy2"))
    monkeypatch.setitem(registry._METHODS, "di", dataclasses.replace(spec, steps=tuple(steps)))
    registry.register_method(registry.MethodSpec("toyb", "a toy baseline", (("train", "toy2"), ("export", "toy2"))))
    yield
    registry.unregister("toyb")
    registry.unregister("toy2")


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


# ------------------------------------------------------------------ paper_claims: the keys of finished runs

# Literals ONLY for this identity check: the values the code of 64cf2a9 spelled out (phase lists in tuning.py and
# paper_claims_decoupled.py), computed from it once. Finished runs are found by cell_key of these override strings,
# so the registry-derived ones must equal them byte for byte.
_LR = ["meta.lr={lr}", "incubate.lr={lr}", "finetune.lr={lr}", "e2e.lr={lr}"]
_WU = ["meta.warmup_epochs={wu}", "incubate.warmup_epochs={wu}", "e2e.warmup_epochs={wu}"]
OLD_GRID = [(f"lr {lr} wu {wu}", [s.format(lr=lr) for s in _LR] + [s.format(wu=wu) for s in _WU])
            for lr in ("4e-3", "8e-3", "1.6e-2") for wu in ("1", "3")]
OLD_EQUAL = ["meta.clip_grad=1.0", "incubate.clip_grad=1.0", "finetune.clip_grad=1.0", "e2e.clip_grad=1.0"]
OLD_RESNET = ["model.depth=9", "model.kernel_backend=torch", "meta.epochs=8", "incubate.epochs=4", "finetune.epochs=4",
              "meta.warmup_epochs=1.0", "meta.eval_every=100", "incubate.warmup_epochs=1.0", "incubate.eval_every=100",
              "e2e.warmup_epochs=1.0", "e2e.eval_every=100", "dgl.warmup_epochs=1.0", "dgl.eval_every=100",
              "infopro.warmup_epochs=1.0", "infopro.eval_every=100", "finetune.eval_every=100", "data.num_workers=1"]
OLD_BASELINES = ("e2e", "dgl", "infopro")
OLD_SPLIT = ("meta", "incubate", "finetune")
OLD_KEYS = {"DeiT-T-32": "demo_cc48ee7fb262", "DeiT-T-32-s1000": "demo_7cfb59c8e0b0",
            "ResNet-20": "resnet110_cifar_83e640700430", "lr 4e-3 wu 1": "demo_dbff64056303",
            "lr 1.6e-2 wu 3": "demo_45824f7ab70a"}


def _keys() -> dict[str, str]:
    grid = {lb: cells.cell_key("demo", tuning.EQUAL + sets) for lb, sets in tuning.grid()}
    return {**{lb: cells.cell_key(r, sets) for r, lb, sets in decoupled.DECOUPLED_CELLS}, **grid}


def test_paper_claims_overrides_and_cell_keys_are_those_the_finished_runs_were_keyed_by():
    assert tuning.GRID == tuning.grid() == OLD_GRID and tuning.EQUAL == tuning.equal() == OLD_EQUAL
    assert decoupled._RESNET == OLD_RESNET and decoupled.BASELINES == decoupled.baselines() == OLD_BASELINES
    assert decoupled._DECOUPLED_EVAL == ["dgl.eval_every=100", "infopro.eval_every=100"]
    assert decoupled.split_phases() == OLD_SPLIT
    keys = _keys()
    assert {k: keys[k] for k in OLD_KEYS} == OLD_KEYS


def test_a_phase_di_trains_on_incubations_recipe_after_assembly_changes_no_override_and_stops_the_split(toy):
    """toy (the fixture) reads incubate's recipe section and runs after DI's assembly, and m2mKD trains it too: the
    grid already sets incubate.lr/clip_grad, a phase after the assembly starts warm (no warm-up of the grid), and
    m2mKD is not tuned, so the grid, the clipping, the baselines and the ResNet cell's overrides stay as they were
    (finished runs keep their keys). The budget split gives each of DI's phases a share: with a fourth DI phase
    SPLITS has none for it, so split_phases refuses (naming it) instead of leaving it out."""
    assert tuning.grid() == OLD_GRID and tuning.equal() == OLD_EQUAL
    assert decoupled.baselines() == OLD_BASELINES
    assert common.sections([*common.cold_phases("di"), *map(decoupled._phase, OLD_BASELINES)]) == \
        ("meta", "incubate", "e2e", "dgl", "infopro")
    with pytest.raises(UserError, match="toy"):
        decoupled.split_phases()


def test_a_phase_with_its_own_recipe_that_di_trains_cold_is_tuned_warmed_up_and_clipped_like_the_others(own_phase):
    """Intended change: equal tuning covers every phase DI trains, so a phase the registry adds to DI with a recipe
    section of its own gets the grid's learning rate and clipping, and (trained before the assembly, from a cold
    start) its warm-up, in DI's order; a method training the whole target in one phase of its own is one more
    decoupled baseline."""
    lr = ["meta.lr=4e-3", "incubate.lr=4e-3", "toy2.lr=4e-3", "finetune.lr=4e-3", "e2e.lr=4e-3"]
    wu = ["meta.warmup_epochs=1", "incubate.warmup_epochs=1", "toy2.warmup_epochs=1", "e2e.warmup_epochs=1"]
    assert tuning.grid()[0] == ("lr 4e-3 wu 1", lr + wu)
    assert tuning.equal() == OLD_EQUAL[:2] + ["toy2.clip_grad=1.0"] + OLD_EQUAL[2:]
    assert decoupled.baselines() == OLD_BASELINES + ("toyb",)


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
        found = _phase_literals(ast.parse(path.read_text()), phases, stage)
        if found:
            bad[path.name] = found
    assert not bad, "benchmarks must take these from dsincubate.registry:\n" + json.dumps(bad, indent=1)


def test_m2mkd_table_pairs_each_seeds_students_and_its_verdict_follows_the_interval():
    def seed(s, kd, e2e):
        return {"ok": True, "seed": s, "teacher": 33.0, "meta": 25.0, "assembled": 20.0, "kd": kd, "e2e": e2e,
                "kd_hours": 0.01, "e2e_hours": 0.01, "kd_flops": 2e12, "e2e_flops": 2.1e12}

    table, summary = m2mkd_vs_e2e.summarise([seed(0, 30.0, 31.0), seed(1, 29.0, 30.5), seed(2, 30.8, 32.0),
                                             {"ok": False, "seed": 3, "error": "not run"}])
    assert summary["paired"]["n"] == 3 and summary["paired"]["hi"] < 0  # behind in every seed, by a steady margin
    assert summary["verdict"] == "E2E better" and "m2mKD" not in summary["verdict"]
    assert "-1.2 [" in table and "E2E better" in table
    table, summary = m2mkd_vs_e2e.summarise([seed(0, 30.0, 31.0), seed(1, 33.0, 30.5)])
    assert summary["paired"]["lo"] < 0 < summary["paired"]["hi"] and "no difference" in summary["verdict"]
    _, summary = m2mkd_vs_e2e.summarise([seed(0, 35.0, 31.0), seed(1, 34.0, 30.5), seed(2, 36.0, 32.0)])
    assert summary["verdict"] == "m2mKD better"
