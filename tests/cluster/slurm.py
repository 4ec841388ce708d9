"""A SLURM on this machine for the cluster test tier: munged, slurmctld and slurmd from Debian's packages, with their
own configuration, key, sockets, ports and state under a work directory (the machine's own munge and slurm set-up, if
any, are not touched).

Two shapes:
- `Slurm(workdir, cluster=c, nodes=(0, 1))`: a multi-node SLURM. This machine (the cluster's login address) runs
  slurmctld and munged; every listed host of the namespace cluster (cluster.py) runs its own `slurmd -N h<i>` inside
  the host (its network, host name and process table), listed in slurm.conf with its own NodeAddr, so jobs get a
  node list like `h[0-1]`, srun starts tasks on both hosts and the ranks meet over the cluster network. The hosts
  resolve each other's names through an /etc/hosts seen only by slurmd and its jobs (a mount namespace of its own),
  as a cluster's nodes do through DNS. Each node declares `cpus` CPUs (2: 2 CPU ranks per node; 4 array tasks
  of one rank fill both nodes). No task/affinity binding: it needs a cgroup file system, which this machine lacks.
- `Slurm(workdir)`: this machine is controller and the one compute node, declaring more CPUs than it has
  (`SlurmdParameters=config_overrides`) so that the K array tasks of the pipeline can run at once.

    with Slurm(workdir, cluster=c) as s:
        env = s.env()                       # SLURM_CONF for sbatch/squeue/scontrol
        s.wait_idle(timeout=600)            # until no job is queued or running
        s.wait_job(job_id, timeout=300)     # until that job ended: its final state

Only the daemons it starts are stopped (by their ids), after cancelling the jobs still in its queue.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from cluster import LOGIN_ADDR, SLURM_TOOLS, Cluster, ClusterUnavailable, _which, ensure_packages, sh, wait_port

CTLD_PORT, SLURMD_PORT = 16917, 16918


class Slurm:
    def __init__(self, workdir: Path, cpus: int | None = None, cluster: Cluster | None = None,
                 nodes: tuple[int, ...] = (0, 1), mem_mb: int = 4000):
        self.w = Path(workdir)
        self.cluster = cluster
        self.host_ids = tuple(nodes) if cluster is not None else ()
        self.cpus = cpus or (2 if cluster is not None else 16)
        self.mem_mb = mem_mb
        self.node = socket.gethostname().split(".")[0]
        # the compute nodes' names (what jobs see in SLURM_JOB_NODELIST)
        self.nodes = [cluster.names[i] for i in self.host_ids] if cluster is not None else [self.node]
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
        if self.cluster is not None:
            c = self.cluster
            ctld_host = f"{self.node}({LOGIN_ADDR})"
            node_lines = "".join(f"NodeName={c.names[i]} NodeAddr={c.hosts[i]} CPUs={self.cpus} "
                                 f"RealMemory={self.mem_mb} State=UNKNOWN\n" for i in self.host_ids)
            task_plugin, spool, pidf, logf = "task/none", w / "spool" / "%n", w / "slurmd-%n.pid", \
                w / "slurmd-%n.log"
            for n in self.nodes:
                (w / "spool" / n).mkdir(parents=True, exist_ok=True)
        else:
            ctld_host = self.node
            node_lines = (f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.mem_mb} "
                          "State=UNKNOWN\n")
            task_plugin, spool, pidf, logf = "task/none", w / "spool", w / "slurmd.pid", w / "slurmd.log"
        self.conf.write_text(f"""ClusterName=dsitest
SlurmctldHost={ctld_host}
SlurmUser=root
SlurmdUser=root
SlurmctldPort={CTLD_PORT}
SlurmdPort={SLURMD_PORT}
AuthType=auth/munge
AuthInfo=socket={sock}
CredType=cred/munge
StateSaveLocation={w / 'state'}
SlurmdSpoolDir={spool}
SlurmctldPidFile={w / 'slurmctld.pid'}
SlurmdPidFile={pidf}
SlurmctldLogFile={w / 'slurmctld.log'}
SlurmdLogFile={logf}
ProctrackType=proctrack/linuxproc
TaskPlugin={task_plugin}
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
{node_lines}PartitionName=dsitest Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")
        env = self.env()
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)], env)
        if not wait_port("127.0.0.1", CTLD_PORT, 30):
            raise ClusterUnavailable(f"slurmctld did not start: {self._log('slurmctld')}")
        if self.cluster is None:
            self._spawn("slurmd", [_which("slurmd"), "-D", "-f", str(self.conf)], env)
        else:
            c = self.cluster
            hosts = w / "etc_hosts"
            hosts.write_text("127.0.0.1 localhost\n" + "".join(f"{a} {n}\n" for a, n in zip(c.hosts, c.names))
                             + f"{LOGIN_ADDR} {self.node}\n")
            for i in self.host_ids:
                name = c.names[i]
                # inside host i (network, host name, process table), with this machine's mounts (slurmd needs the
                # cgroup file system, which the host's own /sys lacks) in a private mount namespace: the host's
                # /proc, and the node names' /etc/hosts seen by slurmd and its jobs only
                inner = (f"mount -t proc proc /proc && mount --bind {hosts} /etc/hosts && "
                         f"exec {_which('slurmd')} -D -N {name} -f {self.conf}")
                self._spawn(f"slurmd-{name}", [*c.in_host(i, mounts=False), _which("unshare"), "--mount",
                                               "/bin/sh", "-c", inner], env)
        deadline = time.time() + 90
        states: list[str] = []
        while time.time() < deadline:
            states = sh("sinfo", "-h", "-N", "-o", "%T", check=False, env=env).stdout.split()
            if len(states) == len(self.nodes) and all(s in ("idle", "mixed", "allocated") for s in states):
                return
            time.sleep(0.5)
        raise ClusterUnavailable(f"the SLURM nodes did not come up (states {states!r}): "
                                 + " ".join(self._log(n) for n in self.procs if n.startswith("slurmd")))

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

    def wait_job(self, job_id: str, timeout: float, poll: float = 0.5) -> str:
        """Until the job has ended; its final state (COMPLETED, FAILED, CANCELLED, ...)."""
        t0 = time.time()
        while time.time() - t0 < timeout:
            state = self.job_state(job_id)
            if state not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "UNKNOWN"):
                return state
            time.sleep(poll)
        raise AssertionError(f"SLURM job {job_id} still {self.job_state(job_id)} after {timeout}s")

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
        slurmds = [n for n in self.procs if n.startswith("slurmd")]
        for name in (*slurmds, "slurmctld", "munged"):
            p = self.procs.pop(name, None)
            if p is not None and p.poll() is None:
                if name.startswith("slurmd-"):  # nsenter's child is slurmd (unshare and sh exec it)
                    for kid in _children(p.pid):
                        try:
                            os.kill(kid, signal.SIGTERM)
                        except ProcessLookupError:
                            pass
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


def _children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
