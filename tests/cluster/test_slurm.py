"""`launchers/slurm_pipeline.sh` on a real SLURM of 2 nodes (slurm.py: slurmctld here, a slurmd in each of 2 hosts of
the namespace cluster, 2 CPUs each): the dependency chain meta -> K-task incubation array -> assemble + fine-tune ->
report runs to the end, meta and fine-tune as one world of 4 ranks over both nodes, the array's tasks spread over
both, and gives what the same pipeline as 4 ranks on one host gives; the jobs ask for cores and memory; a failing
array task stops the chain and the report names it; `--method m2mkd` runs the students' array and their fine-tune
the same way; a 2-task `srun` of a phase without rank variables is refused. Cluster tier: `make test-cluster`."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cluster_helpers import LAUNCHERS, REPO, demo_args, next_port
from dsincubate import checkpoint as ckpt

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cluster import ClusterUnavailable  # noqa: E402
from slurm import Slurm  # noqa: E402

pytestmark = pytest.mark.cluster
NODES = ("h0", "h1")  # the cluster's hosts 0 and 1 (cluster.names)


@pytest.fixture(scope="module")
def slurm(cluster, tmp_path_factory):
    try:
        with Slurm(tmp_path_factory.mktemp("slurm"), cluster=cluster, nodes=(0, 1), cpus=2) as s:
            yield s
    except ClusterUnavailable as e:
        pytest.fail(f"cannot start the test SLURM: {e}", pytrace=False)


def submit(slurm, out: Path, cwd: Path, *options: str, sets: tuple[str, ...] = (), expect: int = 0):
    # 2 nodes x 2 CPU ranks (one core each, 200 MB each); the 4 array tasks run 1 rank on 1 node each
    cmd = [str(LAUNCHERS / "slurm_pipeline.sh"), "--gpus", "0", "--nodes", "2", "--ranks-per-node", "2",
           "--array-nodes", "1", "--cpus-per-rank", "1", "--mem-per-rank", "200M", "--k", "4",
           "--master_port", str(next_port()), *options, "--", "--recipe", "debug", "--output", str(out),
           *demo_args(cwd), *[a for s in sets for a in ("--set", s)]]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=300,
                       env=slurm.env(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))
    assert p.returncode == expect, p.stdout + p.stderr
    if expect:
        return p
    line = next(ln for ln in p.stdout.splitlines() if ln.startswith("submitted:"))
    # "submitted: meta 12, incubation array 13 (4 tasks), assemble+finetune 14, report 15"
    words = line.replace(",", "").split()
    return {"meta": words[2], "array": words[5], "finetune": words[9], "report": words[11]}


@pytest.fixture(scope="module")
def slurm_run(slurm, shared):
    out = shared / "slurm_run"
    jobs = submit(slurm, out, shared)
    slurm.wait_idle(timeout=900)
    return out, jobs


def _logs(out: Path) -> str:
    return "\n".join(f"{p.name}:\n{p.read_text()[-1500:]}" for p in sorted((out / "logs/slurm").glob("*.out")))


def _job(slurm, job_id: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, env=slurm.env()).stdout
    return dict(tok.split("=", 1) for tok in out.split() if "=" in tok)


def test_slurm_chain_runs_the_array_and_completes_the_pipeline(slurm, slurm_run):
    out, jobs = slurm_run
    report = (out / "logs/slurm/report.txt").read_text()
    assert "pipeline: complete" in report, report + "\n" + _logs(out)
    for i in range(4):  # each module ran as its own array task, with its own log
        log = (out / f"logs/slurm/incubate-{jobs['array']}_{i}.out").read_text()
        assert f"incubation of module {i} on" in log
        run = json.loads((out / f"incubate/module_{i}/run.json").read_text())
        assert run["world_size"] == 1
    assert (out / "export/finetune/model.safetensors").is_file()
    assert slurm.job_state(jobs["finetune"]) == "COMPLETED"


def test_meta_and_finetune_are_one_world_of_four_ranks_over_both_slurm_nodes(slurm, slurm_run):
    out, _ = slurm_run
    for name in ("meta", "finetune"):
        run = json.loads((out / name / "run.json").read_text())
        assert run["world_size"] == 4, (name, run.get("ranks"))
        assert [r["rank"] for r in run["ranks"]] == [0, 1, 2, 3], (name, run["ranks"])
        assert [r["host"] for r in run["ranks"]] == ["h0", "h0", "h1", "h1"], (name, run["ranks"])
        assert [r["local_rank"] for r in run["ranks"]] == [0, 1, 0, 1], (name, run["ranks"])
        assert {r["master_addr"] for r in run["ranks"]} == {"h0"}
        assert len({r["addr"] for r in run["ranks"]}) == 2  # two hosts, two addresses on the cluster network


def test_the_incubation_array_tasks_run_on_both_slurm_nodes(slurm_run):
    out, _ = slurm_run
    hosts = [json.loads((out / f"incubate/module_{i}/run.json").read_text())["ranks"][0]["host"] for i in range(4)]
    assert sorted(hosts) == ["h0", "h0", "h1", "h1"], hosts  # 1 core each, 2 cores per node: both nodes used


def test_slurm_jobs_ask_for_the_cores_and_memory_of_their_ranks(slurm, slurm_run):
    _, jobs = slurm_run
    meta = _job(slurm, jobs["meta"])  # 2 ranks per node x 1 core, 200 MB: one task per node with 2 cores, 400 MB
    assert (meta["NumNodes"], meta["CPUs/Task"], meta["MinMemoryNode"]) == ("2", "2", "400M"), meta
    task = _job(slurm, f"{jobs['array']}_0")  # an array task: 1 rank on 1 node
    assert (task["NumNodes"], task["CPUs/Task"], task["MinMemoryNode"]) == ("1", "1", "200M"), task


def test_a_two_task_srun_of_a_phase_without_rank_variables_is_refused(slurm, shared, tmp_path):
    # what DeepSpeed's --launcher slurm starts (srun -n N python -m dsincubate ...): before the fix, each task
    # trained alone as rank 0 of 1 into the same run directory
    out = tmp_path / "run"
    py = REPO / ".venv/bin/python"
    py = py if py.exists() else Path(sys.executable)
    phase = " ".join(["srun", "--ntasks", "2", "--nodes", "1", str(py), "-m", "dsincubate", "meta", "--recipe",
                      "debug", "--output", str(out), *demo_args(shared)])
    # submitted and then polled: `sbatch --wait` polls at 2, 10, 42 s (x4 up to 32 s apart), so a job of ~5 s
    # cost this test 10 s and, on a loaded machine, 42 s
    p = subprocess.run(["sbatch", "--parsable", "--nodes", "1", "--ntasks", "2", "--mem", "400M",
                        "--output", str(tmp_path / "job.out"), "--chdir", str(REPO), "--wrap", phase],
                       capture_output=True, text=True, timeout=60, env=slurm.env(OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr
    job_id = p.stdout.strip().split(";")[0]
    state = slurm.wait_job(job_id, timeout=300)
    log = (tmp_path / "job.out").read_text()
    assert state != "COMPLETED", (state, log)  # sbatch --wait's non-zero exit: the job did not succeed
    errors = [ln for ln in log.splitlines() if ln.startswith("dsincubate: error: no rank variables")]
    assert len(errors) == 2 and any("task 0 of 2" in e for e in errors) and any("task 1 of 2" in e for e in errors), log
    assert "exit code 2" in log or _job(slurm, job_id)["ExitCode"].startswith("2:"), log
    assert not (out / "meta/model.safetensors").exists()


def test_slurm_pipeline_gives_the_same_model_as_the_local_run(slurm_run, one_host_run):
    out, _ = slurm_run
    a, _ = ckpt.load_tensors(out / "finetune/model.safetensors")
    b, _ = ckpt.load_tensors(one_host_run / "finetune/model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    top1 = lambda root: json.loads((root / "finetune/run.json").read_text())["final"]["top1"]  # noqa: E731
    assert top1(out) == top1(one_host_run)


def test_a_failed_array_task_stops_the_chain_and_the_report_names_it(slurm, slurm_run, shared, tmp_path):
    done, _ = slurm_run
    out = tmp_path / "run"
    out.mkdir()
    shutil.copytree(done / "meta", out / "meta")
    shutil.copy(done / "config.json", out / "config.json")
    for i in (0, 2, 3):
        shutil.copytree(done / f"incubate/module_{i}", out / f"incubate/module_{i}")
    # module 1 fails at run time, after its engine started (what the launcher's up-front checks cannot see): its
    # latest resumable checkpoint is damaged (a manifest, no files)
    (out / "incubate/module_1/checkpoints/epoch00001").mkdir(parents=True)
    (out / "incubate/module_1/checkpoints/epoch00001/MANIFEST.json").write_text("{}")
    jobs = submit(slurm, out, shared)  # the finished run's settings (its demo data too), so its phases are reused
    slurm.wait_idle(timeout=600)
    report = (out / "logs/slurm/report.txt").read_text()
    assert "incubate module 1: FAILED" in report and f"incubate-{jobs['array']}_1.out" in report, report
    assert "pipeline: FAILED" in report
    assert all(f"incubate module {i}: complete" in report for i in (0, 2, 3)), report
    log = (out / f"logs/slurm/incubate-{jobs['array']}_1.out").read_text()
    assert "cannot be loaded" in log, log[-2000:]
    assert slurm.job_state(jobs["finetune"]) == "CANCELLED"  # the chain stopped: fine-tuning never started
    assert not (out / "finetune").exists()
    report_log = next((out / "logs/slurm").glob(f"report-{jobs['report']}.out")).read_text()
    assert "FAILED" in report_log


def test_slurm_m2mkd_chain_distils_each_module_in_its_own_array_task_and_finetunes_the_students(slurm, slurm_run,
                                                                                                shared, tmp_path):
    done, _ = slurm_run
    out = tmp_path / "kd"
    out.mkdir()
    for d in ("meta", "finetune"):  # the finished meta model, and the fine-tuned model as the teacher
        shutil.copytree(done / d, out / d)
    shutil.copy(done / "config.json", out / "config.json")
    # a teacher this run does not have is refused before anything is queued
    bad = submit(slurm, tmp_path / "nokd", shared, "--method", "m2mkd", sets=("m2mkd.teacher=e2e",), expect=2)
    assert "m2mkd.teacher=e2e" in bad.stderr and not (tmp_path / "nokd" / "logs").exists(), bad.stderr
    meta_before = (out / "meta/model.safetensors").read_bytes()
    jobs = submit(slurm, out, shared, "--method", "m2mkd", sets=("m2mkd.teacher=finetune",))
    slurm.wait_idle(timeout=900)
    report = (out / "logs/slurm/report.txt").read_text()
    assert "pipeline: complete" in report, report + "\n" + "\n".join(
        f"{p.name}:\n{p.read_text()[-1500:]}" for p in sorted((out / "logs/slurm").glob("*.out")))
    for i in range(4):
        log = (out / f"logs/slurm/m2mkd-{jobs['array']}_{i}.out").read_text()
        assert f"m2mKD: distilling module {i} on" in log
        run = json.loads((out / f"m2mkd/module_{i}/run.json").read_text())
        assert run["world_size"] == 1 and run["phase"] == "m2mkd"
    assert json.loads((out / "m2mkd/finetune/run.json").read_text())["world_size"] == 4
    assert ckpt.complete(out / "m2mkd/assemble") and (out / "export/m2mkd_finetune/model.safetensors").is_file()
    assert (out / "meta/model.safetensors").read_bytes() == meta_before  # the finished meta job was a no-op
    assert not (out / "incubate").exists()
