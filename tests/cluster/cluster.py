"""A small real cluster on this one machine, for the cluster test tier (tests/cluster/, `make test-cluster`).

Each host is a network namespace with its own address on a bridge, its own PID and UTS namespace (its own process
table and host name, so DeepSpeed's `pkill -f` clean-up on one host cannot touch another host's processes or anything
else on this machine) and an sshd inside that accepts a generated root key. The machine's file system is shared by
all hosts, as a cluster's shared file system would be. Commands reach the hosts as on a cluster: `ssh <addr>` and
pdsh (`PDSH_RCMD_TYPE=ssh`) through an `ssh` wrapper on PATH that supplies the key and options (a user's
~/.ssh/config on a real cluster; root's own ~/.ssh is left alone).

    with Cluster(workdir, n=4) as c:
        c.hostfile            # DeepSpeed hostfile: "<addr> slots=1" per host
        c.env()               # environment for launcher commands (PATH with the ssh wrapper, pdsh over ssh)
        c.kill_host(2)        # the host dies: every process in it is killed at once
        c.cut_link(1)         # its network link goes down (processes live on, unreachable)
        c.restart_host(2)     # back up, same address

Only processes this class starts are ended (the host's namespace init, which takes everything started inside that
host with it), by their ids; the namespaces, veth links and the bridge it made are removed. Hosts left over by a
run that was killed before its clean-up (same names) are removed on start, with the processes inside them.

The tools come from Debian's packages; `ensure_packages` installs what is missing with apt-get and raises
`ClusterUnavailable` with the reason when it cannot (the tier then fails, it is not skipped).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

SUBNET = "10.213.7"  # a private /24 unlikely to be used by this machine's own networks
BRIDGE = "dsiclbr0"
NS_PREFIX = "dsicl-h"
VETH_PREFIX = "dsiclv"
LOGIN_ADDR = f"{SUBNET}.1"  # this machine's own address on the cluster network (the "login node")

# binary -> Debian package
CLUSTER_TOOLS = {"ip": "iproute2", "unshare": "util-linux", "nsenter": "util-linux", "sshd": "openssh-server",
                 "ssh": "openssh-client",
                 "ssh-keygen": "openssh-client", "pdsh": "pdsh", "pkill": "procps"}
SLURM_TOOLS = {"slurmctld": "slurmctld", "slurmd": "slurmd", "sbatch": "slurm-client", "munged": "munge"}


class ClusterUnavailable(RuntimeError):
    """The cluster cannot be built on this machine (no root, no namespaces, a package that does not install)."""


def _which(binary: str) -> str | None:
    return shutil.which(binary) or next((f"{d}/{binary}" for d in ("/usr/sbin", "/sbin", "/usr/bin")
                                         if os.access(f"{d}/{binary}", os.X_OK)), None)


def sh(*cmd: str, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise ClusterUnavailable(f"{' '.join(cmd)} failed ({p.returncode}): {(p.stderr or p.stdout).strip()[-500:]}")
    return p


def ensure_packages(tools: dict[str, str]) -> list[str]:
    """Install the Debian packages of the missing tools with apt-get (idempotent); returns what it installed."""
    missing = sorted({pkg for binary, pkg in tools.items() if _which(binary) is None})
    if not missing:
        return []
    if os.geteuid() != 0:
        raise ClusterUnavailable(f"packages {missing} are missing and this is not root (cannot apt-get install)")
    if not shutil.which("apt-get"):
        raise ClusterUnavailable(f"packages {missing} are missing and there is no apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
    p = subprocess.run(install, capture_output=True, text=True, env=env, timeout=600)
    if p.returncode != 0:  # package lists may be missing or stale on a fresh machine
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, text=True, env=env, timeout=300)
        p = subprocess.run(install, capture_output=True, text=True, env=env, timeout=600)
    if p.returncode != 0:
        raise ClusterUnavailable(f"apt-get install {' '.join(missing)} failed: {(p.stderr or p.stdout)[-800:]}")
    still = sorted(b for b in tools if _which(b) is None)
    if still:
        raise ClusterUnavailable(f"installed {missing} but {still} are still not found")
    return missing


def wait_port(addr: str, port: int, timeout: float) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection((addr, port), timeout=1):
                return True
        except OSError:
            time.sleep(0.1)
    return False


def _ns_pids(ns: str) -> list[int]:
    p = sh("ip", "netns", "pids", ns, check=False)
    return [int(x) for x in p.stdout.split()] if p.returncode == 0 else []


class Cluster:
    def __init__(self, workdir: Path, n: int = 4, slots: int = 1):
        self.workdir = Path(workdir)
        self.n, self.slots = n, slots
        self.hosts = [f"{SUBNET}.{11 + i}" for i in range(n)]
        self.names = [f"h{i}" for i in range(n)]
        self.inits: dict[int, subprocess.Popen] = {}
        self.hostfile = self.workdir / "hostfile"

    # ------------------------------------------------------------ set-up and tear-down
    def __enter__(self) -> "Cluster":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        if os.geteuid() != 0:
            raise ClusterUnavailable("the cluster tier needs root (network namespaces, sshd)")
        ensure_packages(CLUSTER_TOOLS)
        self._remove_stale()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._keys()
        sh("ip", "link", "add", BRIDGE, "type", "bridge")
        sh("ip", "addr", "add", f"{LOGIN_ADDR}/24", "dev", BRIDGE)
        sh("ip", "link", "set", BRIDGE, "up")
        for i in range(self.n):
            self._add_host(i)
        for i in range(self.n):
            self._start_sshd(i)
        self.hostfile.write_text("".join(f"{h} slots={self.slots}\n" for h in self.hosts))
        for i, h in enumerate(self.hosts):  # ready: ssh in and see the host's own name
            out = self.ssh(i, "hostname", timeout=30)
            if out.returncode != 0 or out.stdout.strip() != self.names[i]:
                raise ClusterUnavailable(f"ssh to {h} failed: {out.stderr.strip() or out.stdout.strip()}")

    def stop(self) -> None:
        for i in list(self.inits):
            self._kill_init(i)
        for i in range(self.n):
            sh("ip", "link", "del", f"{VETH_PREFIX}{i}", check=False)
            sh("ip", "netns", "del", f"{NS_PREFIX}{i}", check=False)
        sh("ip", "link", "del", BRIDGE, check=False)

    def _remove_stale(self) -> None:
        """Hosts of an earlier run of this fixture that never got to its clean-up: end what runs in them, remove."""
        listed = sh("ip", "netns", "list", check=False).stdout.split("\n")
        for line in listed:
            ns = line.split(" ")[0]
            if ns.startswith(NS_PREFIX):
                for pid in _ns_pids(ns):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                sh("ip", "netns", "del", ns, check=False)
        links = sh("ip", "-o", "link", "show", check=False).stdout
        for line in links.splitlines():
            name = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
            if name.startswith(VETH_PREFIX) or name == BRIDGE:
                sh("ip", "link", "del", name, check=False)

    def _keys(self) -> None:
        w = self.workdir
        for key in ("id_ed25519", "host_ed25519"):
            if not (w / key).exists():
                sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(w / key))
        (w / "authorized_keys").write_text((w / "id_ed25519.pub").read_text())
        os.chmod(w / "authorized_keys", 0o600)
        # The client side, as ~/.ssh/config would say on a cluster. Keepalives make a dead link fail the ssh
        # session (and so pdsh and the deepspeed runner) within seconds instead of TCP's minutes.
        (w / "ssh_config").write_text(
            f"Host *\n  User root\n  IdentityFile {w / 'id_ed25519'}\n  IdentitiesOnly yes\n  BatchMode yes\n"
            "  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n  ConnectTimeout 5\n"
            "  ServerAliveInterval 2\n  ServerAliveCountMax 3\n")
        (w / "bin").mkdir(exist_ok=True)
        wrapper = w / "bin" / "ssh"
        wrapper.write_text(f"#!/bin/sh\nexec {_which('ssh')} -F {w / 'ssh_config'} \"$@\"\n")
        wrapper.chmod(0o755)
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege-separation directory

    def _add_host(self, i: int) -> None:
        ns, veth = f"{NS_PREFIX}{i}", f"{VETH_PREFIX}{i}"
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "link", "set", veth, "master", BRIDGE, "up")
        sh("ip", "-n", ns, "addr", "add", f"{self.hosts[i]}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")

    def _start_sshd(self, i: int) -> None:
        w = self.workdir
        cfg = w / f"sshd_{i}.conf"
        cfg.write_text(
            f"ListenAddress {self.hosts[i]}\nPort 22\nHostKey {w / 'host_ed25519'}\n"
            f"AuthorizedKeysFile {w / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
            "PubkeyAuthentication yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
            "StrictModes no\nPidFile none\nClientAliveInterval 2\nClientAliveCountMax 3\nMaxStartups 200\n"
            "MaxSessions 200\nLogLevel ERROR\n")
        log = open(w / f"sshd_{i}.log", "ab")
        # unshare --fork --kill-child: the shell, then sshd, is PID 1 of the host's own PID namespace; when the
        # unshare process is killed, that init is killed and the kernel kills everything else in the host with it
        cmd = ["ip", "netns", "exec", f"{NS_PREFIX}{i}", _which("unshare"), "--pid", "--fork", "--kill-child",
               "--mount-proc", "--uts", "/bin/sh", "-c",
               f"hostname {self.names[i]} && exec {_which('sshd')} -D -e -f {cfg}"]
        self.inits[i] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        log.close()
        if not wait_port(self.hosts[i], 22, 20):
            raise ClusterUnavailable(f"sshd on {self.hosts[i]} did not start; see {w / f'sshd_{i}.log'}: "
                                     + (w / f"sshd_{i}.log").read_text()[-500:])

    def _kill_init(self, i: int) -> None:
        p = self.inits.pop(i, None)
        if p is None:
            return
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)  # --kill-child: the host's init and with it all its processes
            p.wait(timeout=30)
        deadline = time.time() + 20  # the kernel reaps the namespace's processes asynchronously
        while _ns_pids(f"{NS_PREFIX}{i}") and time.time() < deadline:
            time.sleep(0.1)

    # ------------------------------------------------------------ use
    def env(self, **extra) -> dict:
        """Environment for launcher commands on the login side: the ssh wrapper first on PATH, pdsh over ssh."""
        env = dict(os.environ, PDSH_RCMD_TYPE="ssh", PYTHONUNBUFFERED="1",
                   PATH=f"{self.workdir / 'bin'}:{os.environ.get('PATH', '/usr/bin:/bin')}")
        env.update(extra)
        return env

    def ssh(self, i: int, command: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.workdir / "bin" / "ssh"), self.hosts[i], command], capture_output=True,
                              text=True, timeout=timeout)

    def host_init_pid(self, i: int) -> int:
        """This machine's pid of host i's init (PID 1 of its PID namespace; its namespaces are the host's)."""
        p = self.inits[i]
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                kids = Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split()
            except OSError:
                kids = []
            if kids:
                return int(kids[0])
            time.sleep(0.05)
        raise ClusterUnavailable(f"host {i} has no init process")

    def in_host(self, i: int, mounts: bool = True) -> list[str]:
        """A command prefix that runs a command inside host i (its network, host name, process table and, with
        `mounts`, its mounts), as a daemon of that host would run: killed with the host by kill_host. Without
        `mounts` the command keeps this machine's mounts (`ip netns exec` gave the host a /sys without cgroups) and
        should mount its own /proc (in a mount namespace of its own) to see its host's process table."""
        return [_which("nsenter"), "--target", str(self.host_init_pid(i)), "--net", "--uts", "--pid",
                *(["--mount"] if mounts else []), "--"]

    def write_hostfile(self, path: Path, hosts: list[int], slots: int | None = None) -> Path:
        path.write_text("".join(f"{self.hosts[i]} slots={slots or self.slots}\n" for i in hosts))
        return path

    def host_pids(self, i: int) -> list[int]:
        """Processes running in host i (as this machine's PIDs), its init and sshd included."""
        return _ns_pids(f"{NS_PREFIX}{i}")

    def kill_host(self, i: int) -> None:
        """Host i dies: every process on it is killed at once."""
        self._kill_init(i)

    def restart_host(self, i: int) -> None:
        self._kill_init(i)
        self.restore_link(i)
        self._start_sshd(i)

    def cut_link(self, i: int) -> None:
        sh("ip", "link", "set", f"{VETH_PREFIX}{i}", "down")

    def restore_link(self, i: int) -> None:
        sh("ip", "link", "set", f"{VETH_PREFIX}{i}", "up")
