"""Process-group set-up shared by every phase: under the `deepspeed` launcher or as a plain single process.

Under the launcher, RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* are set and `deepspeed.init_distributed` picks NCCL on GPUs
or gloo on DeepSpeed's CPU accelerator. Run as a plain process (`dsincubate pipeline` on a laptop), we fill in a
one-rank world on a free local port so the same engine code runs unchanged.

Failure handling on clusters (tested by tests/cluster/):
- collectives time out after `collective_timeout_s` (RunConfig; `set_collective_timeout` before `init`), so a rank
  whose peer vanished without closing its sockets (host down, link cut) stops instead of waiting DeepSpeed's default;
- a rank started by DeepSpeed's per-node launcher watches that launcher and the process that started it: when either
  is gone (SIGTERM to the `deepspeed` runner, which takes its single-host path without forwarding signals; an ssh
  session of the pdsh runner that dropped), it stops the launcher and itself instead of training on orphaned;
- gloo announces the address its host name resolves to; where that is a loopback address (Debian's /etc/hosts maps
  the host name to 127.0.1.1) or does not resolve, the other hosts cannot connect and init fails after its timeout,
  so without GLOO_SOCKET_IFNAME set we pick the interface that routes to MASTER_ADDR;
- `host_record()` says where this rank really runs (host name, the address it reaches MASTER_ADDR from, pid), which
  the trainer writes per rank before the process group exists.
"""
from __future__ import annotations

import datetime
import os
import random
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch

from dsincubate.procutil import free_port


@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    device_type: str
    device_name: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def has_cuda(self) -> bool:
        return self.device_type == "cuda"


DEFAULT_COLLECTIVE_TIMEOUT_S = 600.0
_collective_timeout_s = DEFAULT_COLLECTIVE_TIMEOUT_S


def set_collective_timeout(seconds: float) -> None:
    """The timeout of every collective of the process group `init` creates (call before it)."""
    global _collective_timeout_s
    _collective_timeout_s = float(seconds)


def init() -> DistContext:
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ:
        # never a one-rank world when SLURM, MPI or PMI say there are more processes (each would train alone)
        from dsincubate.ranks import check_world

        check_world()
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    else:
        watch_launcher()
        _pick_gloo_interface()
    if not dist.is_initialized():
        deepspeed.init_distributed(verbose=False, timeout=datetime.timedelta(seconds=_collective_timeout_s))
    acc = get_accelerator()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device_type = acc.device_name()
    if device_type == "cpu":
        _unlink_shm_buffer(dist)
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        device_name = torch.cuda.get_device_name(device)
    else:
        device = torch.device(device_type)
        device_name = f"{device_type} ({os.cpu_count()} cores)"
        if "OMP_NUM_THREADS" not in os.environ:
            # Ranks sharing a CPU must split its cores: oversubscribed OpenMP threads make every op several times
            # slower.
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", 0)) or
                              min(dist.get_world_size(), os.cpu_count() or 1))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device, device_type, device_name)


def _unlink_shm_buffer(dist) -> None:
    """Remove the name of this rank's DeepSpeed CPU all-reduce buffer from /dev/shm, keeping the mapping.

    DeepSpeed's CPU accelerator maps one 69 MB /dev/shm file per rank at init and never unlinks it, so every CPU run
    (and every test run) leaked RAM in tmpfs until reboot: gigabytes after a day of runs, enough to OOM-kill a ViT-H
    step. Every rank maps all ranks' files during init_distributed, so after a barrier the names are no longer needed;
    the mappings live until the processes exit, even when they are killed.
    """
    name = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}")
    if dist.get_world_size() > 1:
        dist.barrier()  # on every rank, file or not, so no rank waits alone
    try:
        os.unlink(name)
    except FileNotFoundError:
        pass


def host_record() -> dict:
    """Where this process runs: host name, the local address it reaches MASTER_ADDR from (its address on the
    cluster network), pid, the rank variables the launcher gave it, and what it has of the variables a launch
    forwards to other hosts and of the socket interfaces (`env`, dsincubate.launch_env.rank_env)."""
    from dsincubate.launch_env import rank_env

    addr = None
    master = os.environ.get("MASTER_ADDR")
    if master:
        try:  # a UDP connect sends nothing; it only picks the route, hence our address towards the master
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.connect((master, int(os.environ.get("MASTER_PORT", "9") or 9)))
                addr = s.getsockname()[0]
        except OSError:
            addr = None
    env = {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    return {"rank": int(env["RANK"] or 0), "local_rank": int(env["LOCAL_RANK"] or 0),
            "world_size": int(env["WORLD_SIZE"] or 1), "host": socket.gethostname(), "addr": addr, "pid": os.getpid(),
            "master_addr": env["MASTER_ADDR"], "master_port": env["MASTER_PORT"], "started_at": time.time(),
            "env": rank_env()}


def _pick_gloo_interface() -> str | None:
    """Set GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME to the interface this host reaches MASTER_ADDR through (each
    unless the user set it; returns the interface found, None when none was looked for or found).

    Picked here, on each rank, not on the launching host: hosts may name the same network differently (eth0, ens1).
    NCCL's own choice is the first non-loopback, non-docker interface, which on a host with several networks can be
    one the master's host cannot reach (bootstrap then hangs until the collective timeout). A loopback route (all
    ranks on one host) is left to NCCL, whose intra-node traffic does not use sockets."""
    want = [v for v in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME") if not os.environ.get(v)]
    if not want or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    addr = host_record()["addr"]
    if not addr:
        return None
    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == addr for a in addrs):
            for v in want:
                if v == "NCCL_SOCKET_IFNAME" and addr.startswith("127."):
                    continue
                os.environ[v] = name
            return name
    return None


def log_prefix() -> str:
    """`[host rank r/w]`: on every rank's log lines, so that interleaved logs of many hosts can be told apart."""
    return f"[{socket.gethostname()} rank {os.environ.get('RANK', '0')}/{os.environ.get('WORLD_SIZE', '1')}]"


def _ppid_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def watch_launcher(poll_s: float = 0.5) -> bool:
    """Stop this rank when DeepSpeed's per-node launcher, or the process that started that launcher, is gone.

    DeepSpeed's `deepspeed` runner, when it runs ranks on this host itself (one host, no pdsh), does not forward
    SIGTERM: killing it (scancel, a job time limit, `kill` on the pipeline) left `deepspeed.launcher.launch` and its
    ranks training on for a minute or more. Under pdsh the launcher's parent is the remote shell of an ssh session;
    when the session drops the ranks would likewise go on alone. A daemon thread polls both parents; on a change it
    sends SIGTERM to the launcher (which ends all ranks of this host) and then ends this rank.
    Returns whether a watch was started (only under DeepSpeed's launcher, found through /proc).
    """
    launcher = os.getppid()
    try:
        with open(f"/proc/{launcher}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    if "deepspeed.launcher.launch" not in cmd:
        return False
    starter = _ppid_of(launcher)

    def loop():
        while True:
            time.sleep(poll_s)
            if os.getppid() != launcher:
                why = "DeepSpeed's launcher exited"
            elif _ppid_of(launcher) != starter:
                why = "the process that started DeepSpeed's launcher (the deepspeed runner or ssh session) is gone"
            else:
                continue
            print(f"{log_prefix()} [dsincubate] {why}; stopping this rank", file=sys.stderr, flush=True)
            if os.getppid() == launcher:  # still ours (once it exited, its pid could belong to anyone)
                try:
                    os.kill(launcher, signal.SIGTERM)  # its handler ends every rank on this host
                except OSError:
                    pass
                time.sleep(2.0)
            os._exit(143)

    threading.Thread(target=loop, name="dsincubate-launcher-watch", daemon=True).start()
    return True


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------- shutdown (the end of every finished command)

def shutdown() -> bool:
    """Tear down the process group of a command that finished: a barrier, then DeepSpeed's groups (expert and
    expert-data-parallel groups of a V-MoE included) and torch's process groups, in this order. Returns whether a
    process group was destroyed. Call it after the engines are released (`trainer.release`) and only on success.

    Why: a process group still alive at interpreter exit is destroyed during finalization, while gloo's worker
    threads may still hold work objects; a 2-rank V-MoE phase that had logged "done" aborted there ("terminate called
    without an active exception", exit -6) about once in four CI runs, failing the launcher and the pipeline.
    The barrier makes every rank leave its last collective before any rank destroys its groups. A failed rank does
    not come here: a barrier would wait for peers that may be stuck in another collective; it exits non-zero and its
    launcher ends the others.
    """
    import torch.distributed as tdist

    if not (tdist.is_available() and tdist.is_initialized()):
        return False
    if tdist.get_world_size() > 1:
        tdist.barrier()
    _destroy_groups()
    return True


def _destroy_groups() -> None:
    """deepspeed.comm's destroy (all torch groups, then DeepSpeed's references to them: expert, expert-data,
    ZeRO and world-clone groups), or torch's plus those references when deepspeed.comm never started."""
    import torch.distributed as tdist
    from deepspeed import comm as dscomm
    from deepspeed.utils import groups

    if dscomm.comm.cdb is not None and dscomm.comm.cdb.is_initialized():
        dscomm.destroy_process_group()
    else:
        tdist.destroy_process_group()
        groups._release_process_group_references(group=None)


def release_engine(engine) -> None:
    """Destroy a DeepSpeed engine and drop what DeepSpeed's module globals keep of it, so that it is freed once the
    caller drops its references (found with gc, following the referrers of a destroyed engine that outlived
    gc.collect()): `engine.destroy()` removes ZeRO-3's hooks and buffers and the debug name maps that held the
    engine's modules; ZeRO-3's stack of modules in forward and the class-wide lru_cache of
    PartitionedParameterCoordinator's `__params_to_release` (its keys hold every coordinator and submodule it saw)
    kept the model, and through its hooks the whole engine, for good. Call it between phases, never in a forward."""
    from deepspeed.runtime.zero import parameter_offload
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator as PPC

    try:
        engine.destroy()
    finally:
        parameter_offload.FWD_MODULE_STACK.clear()
        fn = PPC.__dict__.get("_PartitionedParameterCoordinator__params_to_release")
        for f in [fn, *(c.cell_contents for c in (getattr(fn, "__closure__", None) or ()))]:  # under instrument_w_nvtx
            if hasattr(f, "cache_clear"):
                f.cache_clear()
