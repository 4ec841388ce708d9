"""The phase and method registry (dsincubate/registry.py) is the one list every consumer reads: a phase registered
here (one class and one entry, as a new phase file would add) appears in the CLI's subcommands and choices, the
config's sections, the layout, tune, the summary and `config --plan`, and disappears with its entry; the built-in methods keep the
pipeline's order; the phases module no longer imports m2mkd (the package's import cycle is gone).

    pytest tests/unit/test_registry.py -q
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dsincubate import cli, registry
from dsincubate.errors import UserError
from dsincubate.layout import RunLayout
from dsincubate.phases import E2EPhase

REPO = Path(__file__).resolve().parents[2]


class ToyPhase(E2EPhase):
    """What a new phase file holds: a Phase subclass (here E2E's model and loss under another name)."""

    name = "toy"


@pytest.fixture
def toy():
    """A per-stage toy phase reading e2e's recipe, writing under toy_out/, and a method that trains and exports it;
    unregistered afterwards."""
    spec = registry.register_phase(registry.PhaseSpec(
        "toy", f"{__name__}:ToyPhase", "a toy phase", per_stage=True, section="e2e", out_dir="toy_out/m{i}",
        exports=True, summary="Toy"))
    registry.register_method(registry.MethodSpec("toy_method", "toy", (("train", "toy"), ("export", "toy"))))
    yield spec
    registry.unregister("toy")
    registry.unregister("toy_method")


def test_a_registered_phase_appears_in_the_cli_layout_tune_and_the_plan_and_goes_with_its_entry(toy, tmp_path):
    parser = cli.build_parser()
    args = parser.parse_args(["toy", "--module", "2", "--output", str(tmp_path)])
    assert (args.command, args.stage_index) == ("toy", 2)
    with pytest.raises(SystemExit):  # a per-stage phase needs its stage index
        parser.parse_args(["toy", "--output", str(tmp_path)])
    assert parser.parse_args(["export", "--source", "toy"]).source == "toy"
    assert RunLayout(tmp_path).phase_dir("toy", 3) == tmp_path / "toy_out" / "m3"
    from dsincubate import tune

    tune_parser = __import__("argparse").ArgumentParser()
    tune.add_arguments(tune_parser)
    assert tune_parser.parse_args(["--phase", "toy"]).phase == "toy"
    from dsincubate import checkpoint as ckpt
    from dsincubate.accounting import format_summary, summarize

    out = RunLayout(tmp_path).phase_dir("toy", 1)  # a finished toy output: the summary gives it a row
    ckpt.atomic_write_json(out / "run.json", {"final": {"top1": 12.5}, "device_seconds": 36.0})
    ckpt.write_manifest(out, ["run.json"])
    assert summarize(tmp_path, 2, write=False)["phases"] == {"Toy module 1": {"top1": 12.5, "device_hours": 0.01}}
    assert "Toy module 1" in format_summary(summarize(tmp_path, 2, write=False))
    assert [(s.kind, s.name, s.stage_index) for s in registry.plan(["toy_method"], 2)] == [
        ("train", "toy", 0), ("train", "toy", 1), ("export", "toy", None), ("summary", "", None)]
    registry.unregister("toy")
    registry.unregister("toy_method")
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["toy", "--module", "2"])
    with pytest.raises(UserError, match="unknown phase 'toy'"):
        RunLayout(tmp_path).phase_dir("toy", 3)


def test_config_plan_prints_a_registered_phase_after_running_its_checks(toy, tmp_path, capsys, monkeypatch):
    """`dsincubate config --plan` runs the phase's up-front checks (its class, made from the entry) and prints
    its steps as the launchers read them: KIND NAME COUNT DIR."""
    monkeypatch.chdir(tmp_path)
    rc = cli.main(["config", "--plan", "--methods", "toy_method,e2e", "--recipe", "debug", "--output",
                   str(tmp_path / "run"), "--set", f"data.demo_root={tmp_path / 'demo'}"])
    assert rc == 0
    assert capsys.readouterr().out.splitlines() == [
        "train e2e 1 e2e", "export e2e 1 export/e2e", "train toy 4 toy_out/m{i}", "export toy 1 export/toy",
        "summary - 1 -"]


def test_the_config_reads_its_training_sections_from_the_registry(toy):
    from dsincubate import config

    registry.unregister("toy")
    registry.register_phase(registry.PhaseSpec("toy", f"{__name__}:ToyPhase", "toy", section="toy"))
    assert config.TRAIN_SECTIONS[-1] == "toy"
    with pytest.raises(UserError, match="no training section 'toy'"):  # a new section needs its RunConfig field
        config.RunConfig().validate()
    registry.unregister("toy")
    config.RunConfig().validate()
    assert config.TRAIN_SECTIONS == registry.train_sections() and "toy" not in config.TRAIN_SECTIONS


def test_the_builtin_methods_run_in_the_pipeline_order_each_step_once():
    steps = [(s.kind, s.name, s.stage_index) for s in registry.plan(["m2mkd", "e2e_tune", "e2e", "di"], 2)]
    assert steps == [
        ("train", "meta", None), ("train", "incubate", 0), ("train", "incubate", 1), ("assemble", "incubate", None),
        ("eval", "assemble", None), ("train", "finetune", None), ("export", "finetune", None),
        ("train", "e2e", None), ("export", "e2e", None), ("train", "e2e_tune", None),
        ("train", "m2mkd", 0), ("train", "m2mkd", 1), ("assemble", "m2mkd", None), ("eval", "m2mkd_assemble", None),
        ("train", "m2mkd_finetune", None), ("export", "m2mkd_finetune", None), ("summary", "", None)]
    with pytest.raises(UserError, match="--methods 'di,bogus'"):
        registry.parse_methods("di,bogus")


def test_every_builtin_phase_class_carries_its_registered_name_and_layout():
    for name in registry.list_phases():
        assert registry.phase_class(name).name == name
    layout = RunLayout("/r")
    assert layout.phase_dir("m2mkd", 1) == Path("/r/m2mkd/module_1")
    assert layout.model("m2mkd_finetune") == Path("/r/m2mkd/finetune/model.safetensors")
    assert layout.model("m2mkd_assemble") == Path("/r/m2mkd/assemble/model.safetensors")
    assert layout.stage(2) == Path("/r/incubate/module_2/stage.safetensors")
    assert registry.named_models() == ("meta", "assemble", "m2mkd_assemble", "finetune", "e2e", "e2e_tune",
                                       "m2mkd_finetune", "dgl", "infopro")


def test_the_phases_module_no_longer_imports_m2mkd_and_the_registry_and_parser_need_no_torch():
    code = ("import sys, json; import dsincubate.registry, dsincubate.config, dsincubate.cli as c; c.build_parser();"
            "t = 'torch' in sys.modules; import dsincubate.phases; "
            "print(json.dumps([t, 'dsincubate.m2mkd' in sys.modules]))")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(p.stdout) == [False, False]


def test_the_registry_lists_its_names_for_the_launchers():
    p = subprocess.run([sys.executable, "-m", "dsincubate.registry", "stage_phases"], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.split() == ["incubate", "m2mkd"]


def test_tune_through_the_cli_takes_every_registered_phase_and_its_options_in_order(capsys):
    """`dsincubate tune --recipe debug --phase P`: the options reach tune's parser as given (on b0a3766 the leading
    `--recipe` lost its value), and its --phase choices are the registry's."""
    with pytest.raises(SystemExit) as e:
        cli.main(["tune", "--recipe", "debug", "--phase", "bogus"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'bogus'" in err and all(f"'{p}'" in err for p in registry.list_phases())



def test_trained_phases_are_a_methods_train_steps_in_order_each_once(toy):
    assert registry.trained_phases("di") == ("meta", "incubate", "finetune")
    assert registry.trained_phases("e2e_tune") == ("e2e", "e2e_tune")
    assert registry.trained_phases("toy_method") == ("toy",)  # a per-stage phase once, not once per stage index
    with pytest.raises(UserError):
        registry.trained_phases("nonesuch")
