"""Rank variables on SLURM: one DeepSpeed launcher per node of a job step, and the refusal of worlds nobody set up.

SLURM jobs of this project start each training phase as

    srun --nodes N --ntasks-per-node 1 --cpus-per-task C --kill-on-bad-exit=1 \\
        python -m dsincubate.ranks --ranks-per-node R --master_port P -- PHASE [dsincubate options]

(launchers/slurm_pipeline.sh and launchers/slurm_incubate.sbatch do). On every node this module builds DeepSpeed's
world description from the step's node list (`SLURM_STEP_NODELIST`, bracket ranges such as `gpu[01-03,07]` expanded
here), the node's rank in it and the node's GPUs as SLURM bound them, and execs DeepSpeed's per-node launcher
(`deepspeed.launcher.launch`), which starts R ranks with RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_SIZE and MASTER_* set.

Why one launcher per node rather than mapping SLURM_PROCID/SLURM_LOCALID of `srun -n N` tasks to torch variables:
- it is what SLURM users of DeepSpeed and torchrun do (BigScience's scripts, torchrun's SLURM recipe): one step task
  per node owns the node's share of the job, the launcher splits it into ranks;
- SLURM's CPU binding then gives that task all the cores the job asked for on the node (--cpus-per-task = R x cores
  per rank); its ranks inherit the mask and the data loader divides it by the ranks on the node. With one SLURM task
  per rank the same division would count each rank's cores R times too few;
- the GPUs are the ones SLURM bound to the step (CUDA_VISIBLE_DEVICES, which SLURM sets from the job's GPUs): they
  are passed on as they are, so two jobs that share a node never land on the same device (DeepSpeed's hostfile path
  resets the devices to 0..R-1);
- scancel's SIGTERM goes through srun to the launcher, which ends its ranks, and the ranks watch the launcher
  (dsincubate/dist.py, watch_launcher), exactly as under the pdsh runner: one code path for ranks on every cluster.

A process started with no rank variables where SLURM, MPI or PMI say the world is larger (`srun -n 2 python -m
dsincubate meta`, DeepSpeed's `--launcher slurm` or `openmpi`) would train alone as rank 0 of 1, every copy writing
the same run directory: `check_world` (called by dist.init) refuses that with one error line.

Unit tests: tests/unit/test_ranks.py; on a 2-node SLURM: tests/cluster/test_slurm.py.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import re
import sys

from dsincubate.errors import UserError


def expand_nodelist(spec: str) -> list[str]:
    """A SLURM host list as `scontrol show hostnames` prints it: `gpu[01-03,07],login` -> gpu01 gpu02 gpu03 gpu07
    login (zero padding kept, several bracket groups in one name expanded in order)."""
    names: list[str] = []
    for part in _split_top(spec.strip()):
        names.extend(_expand_one(part))
    return names


def _split_top(spec: str) -> list[str]:
    """Split at the commas outside brackets."""
    parts, depth, cur = [], 0, ""
    for ch in spec:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if depth != 0:
        raise UserError(f"SLURM node list {spec!r}: unbalanced brackets")
    parts.append(cur)
    return [p for p in (s.strip() for s in parts) if p]


def _expand_one(name: str) -> list[str]:
    m = re.search(r"\[([^\]]*)\]", name)
    if not m:
        return [name]
    head, tail = name[:m.start()], name[m.end():]
    out = []
    for rng in m.group(1).split(","):
        lo, _, hi = rng.strip().partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise UserError(f"SLURM node list entry {name!r}: {rng!r} is not a number or a range")
        for n in range(int(lo), int(hi or lo) + 1):
            out.extend(head + str(n).zfill(len(lo)) + rest for rest in _expand_one(tail))
    return out


def node_gpu_ids(env: dict) -> list[str] | None:
    """The GPUs SLURM bound to this step on this node, as ids valid in this process (None when nothing says).

    SLURM sets CUDA_VISIBLE_DEVICES from the GPUs it allocated (with cgroup device constraints these are 0..n-1 of
    the devices the job can see; without, the physical ids, e.g. 4,5 for the second job on a node): either way they
    are the ids to use. SLURM_STEP_GPUS / SLURM_JOB_GPUS (physical ids) only when CUDA_VISIBLE_DEVICES is absent."""
    for var in ("CUDA_VISIBLE_DEVICES", "SLURM_STEP_GPUS", "SLURM_JOB_GPUS"):
        val = env.get(var)
        if val is not None and val.strip() not in ("", "NoDevFiles"):
            return [v.strip() for v in val.split(",") if v.strip()]
    return None


def world_info(env: dict, ranks_per_node: int | None) -> tuple[dict[str, list], int, str]:
    """(DeepSpeed's world_info, this node's rank, the master host) for this task of a one-task-per-node step.

    Every node is given the same number of ranks (R); this node's entry lists its own GPU ids (or 0..R-1 for CPU
    ranks), the other nodes' entries only count (DeepSpeed's launch reads their lengths)."""
    spec = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if not spec:
        raise UserError("dsincubate.ranks runs inside a SLURM step (srun --ntasks-per-node 1 ...): "
                        "SLURM_STEP_NODELIST is not set")
    nodes = expand_nodelist(spec)
    ntasks = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or len(nodes))
    if ntasks != len(nodes):
        raise UserError(f"dsincubate.ranks needs one SLURM task per node (srun --ntasks-per-node 1); this step has "
                        f"{ntasks} tasks on {len(nodes)} node(s)")
    me = env.get("SLURMD_NODENAME")
    if me in nodes:
        node_rank = nodes.index(me)
    else:
        node_rank = int(env.get("SLURM_NODEID") or 0)
    gpus = node_gpu_ids(env)
    if ranks_per_node is None:
        if not gpus:
            raise UserError("no GPUs bound to this SLURM step (CUDA_VISIBLE_DEVICES unset): pass --ranks-per-node R "
                            "for CPU ranks, or request GPUs (--gpus-per-node)")
        ranks_per_node = len(gpus)
    if ranks_per_node < 1:
        raise UserError(f"--ranks-per-node {ranks_per_node}: must be >= 1")
    if gpus is not None and ranks_per_node > len(gpus):
        raise UserError(f"--ranks-per-node {ranks_per_node} but SLURM bound {len(gpus)} GPU(s) to this node "
                        f"({','.join(gpus)})")
    mine = gpus[:ranks_per_node] if gpus is not None else list(range(ranks_per_node))
    info = {n: (mine if i == node_rank else list(range(ranks_per_node))) for i, n in enumerate(nodes)}
    return info, node_rank, nodes[0]


def larger_world(env: dict) -> str | None:
    """What says this process is one of several, when no launcher set RANK (None when nothing does)."""
    def size(var: str) -> int:
        try:
            return int(env.get(var) or 0)
        except ValueError:
            return 0

    if size("WORLD_SIZE") > 1:
        return f"WORLD_SIZE={env['WORLD_SIZE']} without RANK"
    # inside a job step (srun); a batch script's own environment has SLURM_NTASKS of the job but is one process
    if env.get("SLURM_STEP_ID") not in (None, "", "batch", "4294967294") and \
            max(size("SLURM_STEP_NUM_TASKS"), size("SLURM_NTASKS")) > 1:
        n = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS")
        return f"this is task {env.get('SLURM_PROCID', '?')} of {n} of SLURM step {env.get('SLURM_JOB_ID', '?')}." \
               f"{env['SLURM_STEP_ID']}"
    for var, what in (("OMPI_COMM_WORLD_SIZE", "Open MPI"), ("PMI_SIZE", "PMI"), ("PMIX_SIZE", "PMIx")):
        if size(var) > 1:
            return f"{what} started {env[var]} processes ({var}={env[var]})"
    return None


def check_world(env: dict | None = None) -> None:
    """Refuse to become a one-rank world when something says the world is larger (see the module docstring)."""
    env = os.environ if env is None else env
    if "RANK" in env:
        return
    why = larger_world(env)
    if why:
        raise UserError(f"no rank variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR) but {why}: each process "
                        "would train alone as rank 0 of 1; start phases with launchers/slurm_pipeline.sh, "
                        "launchers/slurm_incubate.sbatch, `srun --ntasks-per-node 1 python -m dsincubate.ranks ...` "
                        "or the deepspeed launcher")


def launch_command(env: dict, ranks_per_node: int | None, master_port: int, phase_args: list[str],
                   python: str = sys.executable) -> list[str]:
    """DeepSpeed's per-node launcher for this node of the step, running `python -m dsincubate PHASE_ARGS`."""
    info, node_rank, master = world_info(env, ranks_per_node)
    b64 = base64.urlsafe_b64encode(json.dumps(info).encode()).decode()
    return [python, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={b64}", f"--node_rank={node_rank}",
            f"--master_addr={master}", f"--master_port={master_port}", "--module", "dsincubate", *phase_args]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsincubate.ranks", description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks-per-node", type=int, default=None,
                   help="ranks on each node (default: the GPUs SLURM bound to the step on the node)")
    p.add_argument("--master_port", type=int, default=None,
                   help="rendezvous port on the first node (default 29500 + SLURM_JOB_ID %% 1000 * 10)")
    p.add_argument("phase_args", nargs=argparse.REMAINDER, help="-- PHASE [dsincubate options]")
    args = p.parse_args(argv)
    rest = args.phase_args[1:] if args.phase_args[:1] == ["--"] else args.phase_args
    if not rest:
        p.error("give the phase after --: -- PHASE [dsincubate options]")
    port = args.master_port or 29500 + int(os.environ.get("SLURM_JOB_ID", "0") or 0) % 1000 * 10
    try:
        cmd = launch_command(dict(os.environ), args.ranks_per_node, port, rest)
    except UserError as e:
        print(f"dsincubate.ranks: error: {e}", file=sys.stderr)
        return 2
    # The ranks are not SLURM tasks: SLURM_CPUS_PER_TASK counts the cores of this node's task, which all its ranks
    # share. Left in place it reads as each rank's own share (the data loader sizes its workers from it: 8 ranks of
    # a 64-core task would each start 63 workers); it is passed on as DSI_NODE_TASK_CPUS instead.
    if "SLURM_CPUS_PER_TASK" in os.environ:
        os.environ["DSI_NODE_TASK_CPUS"] = os.environ.pop("SLURM_CPUS_PER_TASK")
    sys.stdout.flush()
    os.execv(cmd[0], cmd)  # the launcher takes this task's pid: srun's signals reach it directly


if __name__ == "__main__":
    sys.exit(main())
