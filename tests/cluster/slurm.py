"""A one-machine SLURM for the cluster test tier: munged, slurmctld and slurmd from Debian's packages, with their own
configuration, key, sockets, ports and state under a work directory (the machine's own munge and slurm set-up, if
any, are not touched). This machine is the controller and the one compute node; it declares more CPUs than the
machine has (`SlurmdParameters=config_overrides`) so that the K array tasks of the pipeline can run at once.

    with Slurm(workdir) as s:
        env = s.env()                       # SLURM_CONF for sbatch/squeue/scontrol
        s.wait_idle(timeout=600)            # until no job is queued or running

Only the daemons it starts are stopped (by their ids), after cancelling the jobs still in its queue.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from cluster import SLURM_TOOLS, ClusterUnavailable, _which, ensure_packages, sh, wait_port

CTLD_PORT, SLURMD_PORT = 16917, 16918


class Slurm:
    def __init__(self, workdir: Path, cpus: int = 16):
        self.w = Path(workdir)
        self.cpus = cpus
        self.node = socket.gethostname().split(".")[0]
        self.procs: dict[str, subprocess.Popen] = {}
        self.conf = self.w / "slurm.conf"

    def __enter__(self) -> "Slurm":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def env(self, **extra) -> dict:
        env = dict(os.environ, SLURM_CONF=str(self.conf))
        env.update(extra)
        return env

    def start(self) -> None:
        if os.geteuid() != 0:
            raise ClusterUnavailable("the SLURM test needs root (slurmd runs jobs as any user)")
        ensure_packages(SLURM_TOOLS)
        w = self.w
        for d in ("state", "spool", "munge"):
            (w / d).mkdir(parents=True, exist_ok=True)
        os.chmod(w / "munge", 0o700)
        key = w / "munge" / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        sock = w / "munge" / "munge.sock"
        self._spawn("munged", [_which("munged"), "--foreground", "--force", f"--socket={sock}",
                               f"--key-file={key}", f"--pid-file={w / 'munge' / 'munged.pid'}",
                               f"--log-file={w / 'munge' / 'munged.log'}", f"--seed-file={w / 'munge' / 'seed'}"])
        deadline = time.time() + 20
        while not sock.exists() and time.time() < deadline:
            time.sleep(0.1)
        if not sock.exists():
            raise ClusterUnavailable(f"munged did not start: {self._log('munged')}")
        self.conf.write_text(f"""ClusterName=dsitest
SlurmctldHost={self.node}
SlurmUser=root
SlurmdUser=root
SlurmctldPort={CTLD_PORT}
SlurmdPort={SLURMD_PORT}
AuthType=auth/munge
AuthInfo=socket={sock}
CredType=cred/munge
StateSaveLocation={w / 'state'}
SlurmdSpoolDir={w / 'spool'}
SlurmctldPidFile={w / 'slurmctld.pid'}
SlurmdPidFile={w / 'slurmd.pid'}
SlurmctldLogFile={w / 'slurmctld.log'}
SlurmdLogFile={w / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
SlurmdParameters=config_overrides
MinJobAge=600
InactiveLimit=0
KillWait=5
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory=1000 State=UNKNOWN
PartitionName=dsitest Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")
        env = self.env()
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)], env)
        if not wait_port("127.0.0.1", CTLD_PORT, 30):
            raise ClusterUnavailable(f"slurmctld did not start: {self._log('slurmctld')}")
        self._spawn("slurmd", [_which("slurmd"), "-D", "-f", str(self.conf)], env)
        deadline = time.time() + 60
        state = ""
        while time.time() < deadline:
            state = sh("sinfo", "-h", "-o", "%T", check=False, env=env).stdout.strip()
            if state in ("idle", "mixed", "allocated"):
                return
            time.sleep(0.5)
        raise ClusterUnavailable(f"the SLURM node did not come up (state {state!r}): {self._log('slurmd')}")

    def _spawn(self, name: str, cmd: list[str], env: dict | None = None) -> None:
        log = open(self.w / f"{name}.out", "ab")
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=env or os.environ, start_new_session=True)
        log.close()

    def _log(self, name: str) -> str:
        text = ""
        for f in (self.w / f"{name}.out", self.w / f"{name}.log", self.w / "munge" / f"{name}.log"):
            if f.exists():
                text += f.read_text(errors="replace")[-1500:]
        return text or "(no log)"

    def queue(self) -> list[str]:
        out = sh("squeue", "-h", "-o", "%i %j %T %r", check=False, env=self.env()).stdout
        return [ln for ln in out.splitlines() if ln.strip()]

    def wait_idle(self, timeout: float) -> float:
        t0 = time.time()
        while time.time() - t0 < timeout:
            if not self.queue():
                return time.time() - t0
            time.sleep(1)
        raise AssertionError(f"SLURM jobs still queued after {timeout}s: {self.queue()}")

    def job_state(self, job_id: str) -> str:
        out = sh("scontrol", "show", "job", job_id, check=False, env=self.env()).stdout
        for tok in out.split():
            if tok.startswith("JobState="):
                return tok.split("=", 1)[1]
        return "UNKNOWN"

    def stop(self) -> None:
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            sh("scancel", "--full", "--partition", "dsitest", check=False, env=self.env(), timeout=30)
            deadline = time.time() + 30
            while self.queue() and time.time() < deadline:
                time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            p = self.procs.pop(name, None)
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
