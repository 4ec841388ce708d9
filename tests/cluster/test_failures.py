"""Failures on the cluster: a rank killed inside a multi-rank phase, SIGTERM to the launchers (what scancel, a job time
limit or Ctrl-C in a pipeline sends), and a host that dies during incubation. Each must end every process it
concerns on every host within a bound, leave no process, listening port or /dev/shm file behind, and (host death)
be recoverable by re-running the same command. Cluster tier: `make test-cluster` (see conftest.py)."""
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from cluster_helpers import (DEEPSPEED, LAUNCHERS, demo_args, job_env, next_port, proc_env, procs_with, run_logged,
                             runner_env_file, tail, wait_for)

pytestmark = pytest.mark.cluster


def start(cmd, log: Path, env, cwd) -> subprocess.Popen:
    f = open(log, "wb")
    p = subprocess.Popen([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                         start_new_session=True)
    f.close()
    return p


def wait_training(log: Path, p: subprocess.Popen, timeout: float = 240) -> None:
    """Until rank 0 has printed a progress line (every rank is then inside its training loop)."""
    def ready():
        if p.poll() is not None:
            raise AssertionError(f"the job ended early ({p.returncode}):\n" + tail(log))
        return " step " in tail(log, 20000) and "img/s" in tail(log, 20000)
    wait_for(ready, timeout, f"a progress line in {log}")


def leftovers(cluster, marker: str, port: int) -> dict:
    """What a finished job left behind: its processes (any host), its master port still listened on, DeepSpeed's
    /dev/shm all-reduce files of its port."""
    listening = []
    for i in range(cluster.n):
        out = subprocess.run(["ip", "netns", "exec", f"dsicl-h{i}", "ss", "-Hltn", f"sport = :{port}"],
                             capture_output=True, text=True).stdout.strip()
        if out:
            listening.append((cluster.hosts[i], out))
    local = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True).stdout.strip()
    if local:
        listening.append(("localhost", local))
    return {"processes": procs_with(marker), "listening": listening,
            "shm": sorted(str(p) for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))}


def wait_gone(cluster, marker: str, port: int, timeout: float) -> float:
    t0 = time.time()
    while time.time() - t0 < timeout:
        left = leftovers(cluster, marker, port)
        if not any(left.values()):
            return time.time() - t0
        time.sleep(0.1)
    raise AssertionError(f"left behind after {timeout}s: {leftovers(cluster, marker, port)}")


def rank_pids(marker: str) -> dict[int, int]:
    """rank -> pid of the training processes (not DeepSpeed's launchers) of the job whose run dir is `marker`."""
    out = {}
    for pid, cmd in procs_with(marker).items():
        if " -m dsincubate " in cmd and "--local_rank=" in cmd:
            rank = proc_env(pid).get("RANK")
            if rank is not None:
                out[int(rank)] = pid
    return out


def test_a_killed_rank_ends_every_rank_on_every_host_and_the_launcher_within_60s(cluster, shared, tmp_path):
    """2 hosts x 2 ranks; rank 3 (on the second host) is killed mid-training. Its host's launcher ends rank 2, the
    first host's ranks see their collective fail, and the runner exits non-zero: nothing waits for a timeout."""
    hf = cluster.write_hostfile(tmp_path / "hosts", [0, 1], slots=2)
    out, port, log = tmp_path / "run", next_port(), tmp_path / "job.log"
    p = start([LAUNCHERS / "phase.sh", "e2e", "--hostfile", hf, "--master_port", port, "--", "--recipe", "debug",
               "--output", out, *demo_args(shared), "--set", "e2e.epochs=200", "--set", "collective_timeout_s=30"],
              log, job_env(cluster, shared), tmp_path)
    try:
        wait_training(log, p)
        ranks = wait_for(lambda: (lambda r: r if len(r) == 4 else None)(rank_pids(str(out))), 30, "4 rank pids")
        t_kill = time.time()
        os.kill(ranks[3], signal.SIGKILL)
        rc = p.wait(timeout=60)
        t_launcher = time.time() - t_kill
        t_all = t_launcher + wait_gone(cluster, str(out), port, max(1.0, 60 - t_launcher))
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert rc != 0, tail(log)
    assert t_all <= 60, (t_launcher, t_all)
    print(f"rank killed: launcher exited {rc} after {t_launcher:.1f}s, every process gone after {t_all:.1f}s")


CASES = {
    # target, hosts (None = this machine, no hostfile), what gets SIGTERM
    "incubate.sh over pdsh": ("incubate", [0, 1]),
    "phase.sh over pdsh": ("phase", [0, 1]),
    "deepspeed runner over pdsh": ("deepspeed", [0, 1]),
    "deepspeed runner on one host": ("deepspeed", None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sigterm_to_a_launcher_ends_every_rank_on_every_host_within_10s(cluster, shared, tmp_path, case):
    what, hosts = CASES[case]
    out, port, log = tmp_path / "run", next_port(), tmp_path / "job.log"
    dsi = ["--recipe", "debug", "--output", out, *demo_args(shared), "--set", "meta.epochs=200"]
    if hosts is None:
        where, env = ["--num_accelerators", "2"], job_env(None, shared)
    else:
        where, env = ["--hostfile", cluster.write_hostfile(tmp_path / "hosts", hosts)], job_env(cluster, shared)
    if what == "incubate":
        cmd = [LAUNCHERS / "incubate.sh", *where, "--master_port", port, "--recipe", "debug", "--output", out, "--",
               *dsi[4:]]
    elif what == "phase":
        cmd = [LAUNCHERS / "phase.sh", "meta", *where, "--master_port", port, "--", *dsi]
    else:
        force = ["--force_multi"] if hosts else []
        cmd = [DEEPSPEED, *where, *force, "--master_port", port, "--module", "dsincubate", "meta", *dsi]
        if hosts:  # the bare runner sends the other hosts only its env file's lines: the session's op cache too
            env["DS_ENV_FILE"] = str(runner_env_file(shared, tmp_path / "ds_env"))
    p = start(cmd, log, env, tmp_path)
    try:
        wait_training(log, p)
        t0 = time.time()
        os.kill(p.pid, signal.SIGTERM)  # the process itself, not its group: as scancel or `kill PID` would
        t_gone = wait_gone(cluster, str(out), port, 10.0)
        p.wait(timeout=10)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode != 0
    assert t_gone <= 10
    print(f"SIGTERM to {case}: every rank gone after {time.time() - t0:.1f}s")


def test_a_host_dying_during_incubation_fails_only_its_module_and_a_rerun_completes_just_that(cluster, shared,
                                                                                               cluster_run, tmp_path):
    """4 concurrent incubation jobs; host 2 dies (every process on it killed) while module 2 runs. The launcher names
    module 2 and exits non-zero once the other modules finished; the same command again runs only module 2 (on the
    restarted host) and completes the pipeline."""
    out = tmp_path / "run"
    out.mkdir()
    shutil.copytree(cluster_run / "meta", out / "meta")  # meta pre-training is done already
    shutil.copy(cluster_run / "config.json", out / "config.json")
    port, log1, log2 = next_port(), tmp_path / "first.log", tmp_path / "rerun.log"
    cmd = [LAUNCHERS / "incubate.sh", "--hostfile", cluster.hostfile, "--recipe", "debug", "--output", out,
           "--master_port", port, "--methods", "di", "--", *demo_args(shared)]
    env = job_env(cluster, shared)
    p = start(cmd, log1, env, tmp_path)
    victim = 2
    try:
        rank_file = out / f"incubate/module_{victim}/ranks/rank_0.json"
        wait_for(lambda: rank_file.is_file() or p.poll() is not None, 240, "module 2's rank to start")
        assert p.poll() is None, tail(log1)
        t_kill = time.time()
        cluster.kill_host(victim)
        rc = p.wait(timeout=180)
        t_exit = time.time() - t_kill
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        cluster.restart_host(victim)
    text = tail(log1, 100000)
    assert rc != 0, text
    assert f"incubation of module {victim} failed" in text and cluster.hosts[victim] in text, text[-3000:]
    for i in range(4):
        done = (out / f"incubate/module_{i}/MANIFEST.json").is_file()
        assert done == (i != victim), (i, text[-3000:])
    assert not (out / "finetune").exists()
    kept = {i: (out / f"incubate/module_{i}/run.json").read_bytes() for i in range(4) if i != victim}

    rc2, secs = run_logged([str(c) for c in cmd], log2, env, tmp_path, timeout=600)
    assert rc2 == 0, tail(log2)
    rerun = log2.read_text()
    for i in kept:  # not re-run: not launched again, its record untouched
        assert f"module {i}: already complete" in rerun
        assert (out / f"incubate/module_{i}/run.json").read_bytes() == kept[i]
    run = json.loads((out / f"incubate/module_{victim}/run.json").read_text())
    assert [r["addr"] for r in run["ranks"]] == [cluster.hosts[victim]]
    assert (out / "finetune/MANIFEST.json").is_file()
    print(f"host {victim} killed: launcher exited {rc} after {t_exit:.1f}s; re-run completed in {secs:.0f}s")
