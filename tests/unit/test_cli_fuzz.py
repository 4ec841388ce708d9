"""Property test over the command line: generated invocations of every subcommand, with generated `--set` values
(valid, out of range, wrong type, unknown), either pass every check (`--dry-run`: exit 0, nothing written) or fail
with exactly one line on stderr and exit 2, leaving an existing run directory byte-identical. Never a traceback.

In-process through `cli.main` on a small sharded set, no training: `pytest tests/unit/test_cli_fuzz.py -q`
(`FUZZ_EXAMPLES=1000` for a longer search than the default 150 invocations).
"""
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from dsincubate import checkpoint as ckpt, cli, phases, recipes, registry
from dsincubate.config import TRAIN_SECTIONS, DataConfig, ModelConfig, RunConfig, TrainConfig, apply_overrides
from dsincubate.data.synth import id_samples
from dsincubate.data.writer import write_shards

COMMANDS = [*registry.list_phases(), "eval", "pipeline", "assemble", "export", "summary", "config"]
SECTIONS = {"model": ModelConfig, "data": DataConfig, **{s: TrainConfig for s in TRAIN_SECTIONS}}
KEYS = [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)
        if f.name not in ("train", "val", "demo_root", "train_manifest", "val_manifest", "teacher")]  # paths: own cases
KEYS += [f.name for f in dataclasses.fields(RunConfig) if f.name not in SECTIONS]
UNKNOWN = ["model.nope", "bogus", "meta.", ".lr", "e2e.lr.x", "data"]
# small enough to keep a check fast, valid for the debug recipe
SMALL = ["model.depth=4", "model.embed_dim=24", "model.num_heads=2", "model.num_stages=2", "model.img_size=16",
         "model.patch_size=8", "model.kernel_backend=torch"]


def _domain_values(key: str):
    """Values at and around a field's declared domain, plus wrong types."""
    section, _, name = key.rpartition(".")
    cls = SECTIONS.get(section, RunConfig)
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    md = f.metadata or {}
    vals = ["", "none", "nan", "inf", "-inf", "1e400", "abc", "0", "1", "-1", "0.5", "2,4", "true", "[1]", "{}"]
    if md.get("choices"):
        vals += [str(c) for c in md["choices"]] + [str(md["choices"][0]).upper()]
    for b in (md.get("lo"), md.get("hi")):
        if b is not None:
            vals += [repr(b), repr(b * 2 + 1), repr(b - 1), repr(b + 0.5), str(int(b))]
    return st.sampled_from(vals)


def _valid_values(key: str):
    """Values inside a field's declared domain (relations between fields may still refuse them)."""
    section, _, name = key.rpartition(".")
    cls = SECTIONS.get(section, RunConfig)
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    md = f.metadata or {}
    if md.get("choices"):
        return st.sampled_from([str(c) for c in md["choices"]])
    lo, hi = md.get("lo"), md.get("hi")
    if lo is None and hi is None:
        return st.sampled_from(["1", "0", "2"])
    lo = lo if lo is not None else -10
    hi = hi if hi is not None else lo + 64
    if isinstance(lo, int) and isinstance(hi, int) and "float" not in str(f.type):
        return st.integers(lo + bool(md.get("lo_open")), hi - bool(md.get("hi_open"))).map(str)
    return st.floats(lo, hi, exclude_min=bool(md.get("lo_open")), exclude_max=bool(md.get("hi_open"))).map(repr)


SETS = st.lists(st.one_of(
    st.sampled_from(KEYS).flatmap(lambda k: _valid_values(k).map(lambda v: f"{k}={v}")),
    st.sampled_from(KEYS).flatmap(lambda k: _valid_values(k).map(lambda v: f"{k}={v}")),
    st.sampled_from(KEYS).flatmap(lambda k: _domain_values(k).map(lambda v: f"{k}={v}")),
    st.tuples(st.sampled_from(UNKNOWN), st.text(max_size=5)).map(lambda kv: f"{kv[0]}={kv[1]}"),
    st.text(max_size=12),  # not even key=value
), max_size=2)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Train/val shards, and `meta_run`: a run directory holding a finished meta model (as `dsincubate meta` leaves
    it), so that incubation and `eval --model meta` can pass their checks."""
    d = tmp_path_factory.mktemp("cli_fuzz")
    classes = [f"c{i}" for i in range(10)]
    write_shards(id_samples(200), str(d / "train"), classes, maxcount=50, progress=False)
    write_shards(id_samples(60, start=500), str(d / "val"), classes, maxcount=30, progress=False)
    cfg = apply_overrides(recipes.get("debug"), SMALL + [f"data.train={d / 'train'}", f"data.val={d / 'val'}"])
    meta = phases.make("meta", cfg, d / "meta_run", 10)
    meta.out_dir.mkdir(parents=True)
    cfg.save(d / "meta_run" / "config.json")
    files = meta.save_output(meta.build_model().state_dict())
    (meta.out_dir / "run.json").write_text(json.dumps({"phase": "meta", "device_seconds": 1.0, "device_name": "cpu",
                                                       "epochs": 1, "final": {"top1": 10.0}}))
    ckpt.write_manifest(meta.out_dir, files + ["run.json"])
    # m2mKD teachers: a whole model that fits, one of another width, and a file that is no checkpoint at all
    for name, extra in (("teacher", []), ("teacher_wide", ["model.embed_dim=32"])):
        e2e = phases.make("e2e", apply_overrides(cfg, extra), d / name, 10)
        e2e.out_dir.mkdir(parents=True)
        ckpt.write_manifest(e2e.out_dir, e2e.save_output(e2e.build_model().state_dict()))
    (d / "junk.safetensors").write_bytes(b"\x00" * 64)
    return d


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()} if root.exists() else None


def _invoke(argv, capsys) -> tuple[int, str, str]:
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "150")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(command=st.sampled_from(COMMANDS), sets=SETS, module=st.integers(-1, 3),
       recipe=st.sampled_from(["debug"] * 6 + ["nonexistent", "deit_t_0", "deit_t_x"]),
       ds=st.sampled_from([None, None, "cpu", "nonexistent", "zero3_fp32"]),
       existing=st.sampled_from([None, "partial", "meta", "meta"]),
       extra=st.sampled_from([[]] * 8 + [["--bogus"], ["--module"], ["--set"], ["--methods", "di,nope"],
                              ["--methods", "m2mkd"], ["--methods", "di,e2e,m2mkd"]]),
       teacher=st.sampled_from([None, None, "teacher/e2e/model.safetensors", "teacher_wide/e2e/model.safetensors",
                                "junk.safetensors", "nonexistent.safetensors", "finetune"]))
@example(command="meta", sets=[], module=0, recipe="debug", ds=None, existing=None, extra=[], teacher=None)  # valid
@example(command="incubate", sets=[], module=1, recipe="debug", ds=None, existing="meta", extra=[], teacher=None)
@example(command="m2mkd", sets=[], module=0, recipe="debug", ds=None, existing="meta", extra=[],
         teacher="teacher/e2e/model.safetensors")
@example(command="pipeline", sets=[], module=0, recipe="debug", ds=None, existing=None, extra=["--methods", "m2mkd"],
         teacher="junk.safetensors")
def test_any_invocation_passes_its_checks_or_fails_with_one_line_and_touches_nothing(
        shards, capsys, command, sets, module, recipe, ds, existing, extra, teacher):
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        if existing == "partial":  # a run directory with an unfinished phase: must stay byte-identical
            (out / "meta").mkdir(parents=True)
            (out / "meta" / "run.json").write_text('{"phase": "meta"}')
            (out / "config.json").write_text("{}")
        elif existing == "meta":  # a finished meta model
            shutil.copytree(shards / "meta_run", out)
        before = _tree(out)
        argv = [command, "--recipe", recipe, "--output", str(out), "--train", str(shards / "train"),
                "--val", str(shards / "val"), "--dry-run"]
        for s in SMALL + sets:
            argv += ["--set", s]
        if ds:
            argv += ["--ds-config", ds]
        if teacher:
            argv += ["--set", f"m2mkd.teacher={shards / teacher if teacher.endswith('.safetensors') else teacher}"]
        if command in registry.stage_phases():
            argv += ["--module", str(module)]
        if command == "pipeline" and "--methods" not in extra:
            argv += ["--methods", "di,e2e"]
        code, _, err = _invoke(argv + extra, capsys)
        assert code in (0, 2), (argv, code, err)
        event(f"{command} exit {code}")
        if code == 2:
            lines = [ln for ln in err.splitlines() if ln.strip()]
            assert len(lines) == 1 and "error" in lines[0], (argv, err)
        assert "Traceback" not in err
        assert _tree(out) == before, argv  # a dry run or a refusal writes nothing


@pytest.mark.parametrize("output", ["{file}/run", "{file}"])
def test_output_that_cannot_be_a_run_directory_is_refused_before_anything_starts(shards, tmp_path, capsys, output):
    (tmp_path / "afile").write_text("keep")
    out = output.format(file=tmp_path / "afile")
    code, _, err = _invoke(["meta", "--recipe", "debug", "--output", out, "--train", str(shards / "train"),
                            "--val", str(shards / "val")] + [a for s in SMALL for a in ("--set", s)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--output" in err
    assert (tmp_path / "afile").read_text() == "keep"
