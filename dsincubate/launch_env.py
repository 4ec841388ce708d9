"""What the `deepspeed` launcher must be told that it cannot find out itself: which physical GPUs a job may use, and
which environment variables the ranks on other hosts need. Called by launchers/incubate.sh and launchers/phase.sh:

    python -m dsincubate.launch_env gpus --jobs K [--num-gpus N]
        line 1: the node's usable GPUs as physical ids for the full allocation (`4,5,6,7`; empty: no GPU);
        lines 2..K+1: the K module jobs' groups (`4,5` and `6,7`), absent when there are fewer GPUs than K
    python -m dsincubate.launch_env env-file (--out FILE | --check) [--env NAME[,NAME...]]...
        writes the variables of this host that the ranks of a pdsh launch need into FILE (DeepSpeed's
        `.deepspeed_env` format, merged with the user's own file) for DS_ENV_FILE=FILE

GPU ids. DeepSpeed reads `--include localhost:0,1` as physical ids and sets each rank's CUDA_VISIBLE_DEVICES to
them itself; it drops the CUDA_VISIBLE_DEVICES it was started with whenever --include/--num_gpus is given (and
without them turns it into --include). So the ids handed to it must be physical: CUDA_VISIBLE_DEVICES when set,
else SLURM's SLURM_STEP_GPUS / SLURM_JOB_GPUS, else every device. The launchers start DeepSpeed with
CUDA_VISIBLE_DEVICES unset, so that its slot check counts every device of the node (or of the job's device cgroup).

Environment. DeepSpeed's pdsh runner exports to the other hosts only variables named PYTHON*, MLFLOW*, MV2*, UCX*
(and NCCL* when the launching host has a GPU), plus the lines of `.deepspeed_env` (DS_ENV_FILE) in the home
directory and the working directory. `remote_env` adds what our ranks read (CUDA_HOME, TORCH_EXTENSIONS_DIR,
TORCH_CUDA_ARCH_LIST, OMP_NUM_THREADS, every DSI_* and NCCL_*) and the names the user lists
(`--env NAME` or DSI_FORWARD_ENV="A,B"), keeping the user's own file's lines.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from dsincubate.errors import UserError

# Read by our ranks or the kernel builder (dsincubate/ops/builder.py) and not forwarded by DeepSpeed's pdsh runner.
# Not LD_LIBRARY_PATH or PATH: a compute node's own (its driver's libraries) must not be replaced by the login
# node's; list them with --env where the login node's are right.
FORWARD_NAMES = ("CUDA_HOME", "TORCH_EXTENSIONS_DIR", "TORCH_CUDA_ARCH_LIST", "OMP_NUM_THREADS")
# DeepSpeed forwards NCCL* only when the launching host has a GPU (a CPU login node forwards none of them).
FORWARD_PREFIXES = ("DSI_", "NCCL_")
# Set per host / per rank by DeepSpeed's launcher: forwarding the launching host's value would be wrong.
RESERVED = ("CUDA_VISIBLE_DEVICES", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "CROSS_RANK", "CROSS_SIZE",
            "MASTER_ADDR", "MASTER_PORT", "DS_ENV_FILE")
# DeepSpeed's own rule (runner.py EXCLUDE_ENVS): where a node sets these itself, the launching host's are not sent.
EXCLUDE_IF = {"AISC_JOB_NAME": ("NCCL_IB_HCA", "UCX_NET_DEVICES")}
# The names forwarded, written into the file itself so that every rank can record what it received.
FORWARDED_LIST = "DSI_FORWARDED_ENV"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# pdsh runs `export NAME=VALUE;` in a remote shell; DeepSpeed double-quotes a value with other characters than
# [\w@%+=:,./-], so these would be expanded or end the quote there.
_UNSAFE = re.compile(r'["$`\\\n]')


# ----------------------------------------------------------------------------------------------------- GPU ids
def _parse_ids(text: str, var: str) -> list[int]:
    ids: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)  # SLURM may write ranges (0-3)
        if not m:
            raise UserError(f"{var}={text!r}: only integer GPU indices can be mapped to DeepSpeed's --include "
                            "(GPU UUIDs and MIG names cannot); set CUDA_VISIBLE_DEVICES to indices")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        ids.extend(range(lo, hi + 1))
    if len(set(ids)) != len(ids):
        raise UserError(f"{var}={text!r} names a GPU twice")
    return ids


def usable_gpus(environ: dict, device_count: int) -> list[int]:
    """The physical ids of the GPUs this node's job may use.

    CUDA_VISIBLE_DEVICES when set (empty, or -1: none). Else SLURM's binding, SLURM_STEP_GPUS inside a step, then
    SLURM_JOB_GPUS: these are the node's indices, valid as they are when the job sees every device; under a device
    cgroup (ConstrainDevices) the job sees only its own n devices, numbered 0..n-1, so ids beyond the count seen
    with exactly n devices seen mean 0..n-1. Else every one of the `device_count` devices the process sees.
    """
    cvd = environ.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None:
        cvd = cvd.strip()
        return [] if cvd in ("", "-1", "NoDevFiles") else _parse_ids(cvd, "CUDA_VISIBLE_DEVICES")
    for var in ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS"):
        text = (environ.get(var) or "").strip()
        if not text:
            continue
        ids = _parse_ids(text, var)
        if all(i < device_count for i in ids):
            return ids
        if len(ids) == device_count:  # a device cgroup renumbers the job's GPUs from 0
            return list(range(device_count))
        raise UserError(f"{var}={text} but this process sees {device_count} GPU(s): set CUDA_VISIBLE_DEVICES")
    return list(range(device_count))


def full_allocation(ids: list[int], num_gpus: int | None = None) -> list[int]:
    """The GPUs of a job on the whole node: all usable ones, or the first `num_gpus` of them."""
    if num_gpus is None:
        return list(ids)
    if not 1 <= num_gpus <= len(ids):
        raise UserError(f"--num_gpus {num_gpus}: this node has {len(ids)} usable GPU(s) ({_fmt(ids)})")
    return list(ids[:num_gpus])


def gpu_groups(ids: list[int], jobs: int) -> list[list[int]]:
    """`jobs` disjoint groups of equal size G // jobs for concurrent jobs (contiguous, so a job's GPUs are
    neighbours on the node's interconnect); [] when G < jobs (the jobs then run one after another on all GPUs).
    The G % jobs remaining GPUs stay idle: a module trained on more ranks would have a larger global batch than
    the others, and the paper's modules are trained alike."""
    if jobs < 1:
        raise UserError(f"jobs must be >= 1 (got {jobs})")
    per = len(ids) // jobs
    return [list(ids[i * per:(i + 1) * per]) for i in range(jobs)] if per else []


def _fmt(ids: list[int]) -> str:
    return ",".join(map(str, ids))


# ------------------------------------------------------------------------------------------------- environment
def split_names(values) -> list[str]:
    """Names from `--env A,B --env C` / DSI_FORWARD_ENV="A, B", each checked (one error line for a bad one)."""
    names: list[str] = []
    for v in values:
        for n in (x.strip() for x in v.split(",")):
            if not n:
                continue
            if not _NAME.match(n):
                raise UserError(f"--env / DSI_FORWARD_ENV: '{n}' is not a variable name")
            if n in RESERVED:
                raise UserError(f"--env / DSI_FORWARD_ENV: {n} is set per host by DeepSpeed's launcher and cannot "
                                "be forwarded")
            if n not in names:
                names.append(n)
    return names


def parse_env_file(text: str, source: str) -> dict[str, str]:
    """A `.deepspeed_env`: NAME=VALUE lines. Blank and # lines are skipped here (DeepSpeed's runner would stop on
    them with a bare ValueError)."""
    env: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, sep, val = line.partition("=")
        if not sep or not _NAME.match(key.strip()):
            raise UserError(f"{source}:{n}: not a NAME=VALUE line: {line!r}")
        env[key.strip()] = val.strip()
    return env


def user_env_files(environ: dict, cwd: str, home: str) -> list[Path]:
    """The files DeepSpeed's runner reads (runner.py: DS_ENV_FILE or `.deepspeed_env`, joined to the home directory,
    then to the working directory; an absolute DS_ENV_FILE is the same file twice), existing ones, in its order."""
    name = environ.get("DS_ENV_FILE", ".deepspeed_env")
    found: list[Path] = []
    for base in (home, cwd):
        p = Path(os.path.join(base, name))
        if p.is_file() and p.resolve() not in [f.resolve() for f in found]:
            found.append(p)
    return found


def remote_env(environ: dict, names: list[str], user_files: list[Path]) -> tuple[dict[str, str], list[str]]:
    """(the variables for the other hosts, warnings). Precedence, lowest first: the variables of this host that
    the ranks read (FORWARD_NAMES, FORWARD_PREFIXES), the user's own env file(s) (written for the other hosts, so
    they win over this host's values), the names the user listed for this run (`names`, which must be set)."""
    out: dict[str, str] = {}
    warnings: list[str] = []
    excluded = {n for key, names in EXCLUDE_IF.items() if key in environ for n in names}
    for k, v in environ.items():
        if (k in FORWARD_NAMES or k.startswith(FORWARD_PREFIXES)) and k not in RESERVED and k != FORWARDED_LIST \
                and k not in excluded:
            if _UNSAFE.search(v):
                warnings.append(f"not forwarding {k} to the other hosts: its value has one of \" $ ` \\ or a "
                                "newline, which the remote shell of DeepSpeed's pdsh runner would change")
                continue
            out[k] = v
    for f in user_files:
        out.update(parse_env_file(f.read_text(), str(f)))
    for n in names:
        if n not in environ:
            raise UserError(f"--env / DSI_FORWARD_ENV: {n} is not set on this host")
        if _UNSAFE.search(environ[n]):
            raise UserError(f"--env / DSI_FORWARD_ENV: the value of {n} has one of \" $ ` \\ or a newline, which "
                            "the remote shell of DeepSpeed's pdsh runner would change")
        out[n] = environ[n]
    out[FORWARDED_LIST] = ",".join(sorted(out))
    return out, warnings


def render_env_file(env: dict[str, str]) -> str:
    return "".join(f"{k}={v}\n" for k, v in env.items())


def write_env_file(out: Path, environ: dict, names: list[str], cwd: str | None = None,
                   home: str | None = None) -> dict[str, str]:
    """Write FILE for DS_ENV_FILE (a new file: the user's own file is read, never changed) and return its variables."""
    out = Path(out).resolve()
    files = [f for f in user_env_files(environ, cwd or os.getcwd(), home or os.path.expanduser("~"))
             if f.resolve() != out]  # our own file of an earlier run is no user file
    env, warnings = remote_env(environ, names, files)
    for w in warnings:
        print(f"launch_env: warning: {w}", file=sys.stderr)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")  # concurrent launches of one run may write the same file
    tmp.write_text(render_env_file(env))
    os.replace(tmp, out)
    return env


def rank_env(environ: dict | None = None) -> dict[str, str | None]:
    """What this rank has of the forwarded variables (for its host record, dist.host_record): FORWARD_NAMES, every
    name the launching host's env file listed, and the socket interfaces of gloo and NCCL; None where unset."""
    environ = os.environ if environ is None else environ
    listed = [n for n in (environ.get(FORWARDED_LIST) or "").split(",") if n]
    names = set(FORWARD_NAMES) | set(listed) | {"GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"}
    return {n: environ.get(n) for n in sorted(names)}


# ----------------------------------------------------------------------------------------------------------- CLI
def _device_count() -> int:
    import torch  # only here: the rank-side functions above must stay cheap to import

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsincubate.launch_env", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("gpus", help="physical GPU ids: the full allocation, then the K job groups")
    g.add_argument("--jobs", type=int, default=1, help="number of concurrent module jobs K (>= 1)")
    g.add_argument("--num-gpus", type=int, default=None, help="use only the first N usable GPUs")
    e = sub.add_parser("env-file", help="write the variables the ranks on other hosts need (DS_ENV_FILE format)")
    e.add_argument("--out", type=Path, help="the file to write (required unless --check)")
    e.add_argument("--check", action="store_true", help="only check the names and values (one error line, exit 2)")
    e.add_argument("--env", action="append", default=[], metavar="NAME[,NAME...]",
                   help="also forward these variables of this host (as DSI_FORWARD_ENV does)")
    a = p.parse_args(argv)
    try:
        if a.cmd == "gpus":
            if a.jobs < 1:
                raise UserError(f"--jobs must be >= 1 (got {a.jobs})")
            count = _device_count()
            ids = full_allocation(usable_gpus(dict(os.environ), count) if count else [], a.num_gpus)
            groups = gpu_groups(ids, a.jobs) if ids else []
            print(_fmt(ids))
            for grp in groups:
                print(_fmt(grp))
            if groups and len(ids) % a.jobs:
                print(f"launch_env: {len(ids) % a.jobs} of {len(ids)} GPUs ({_fmt(ids[-(len(ids) % a.jobs):])}) stay "
                      f"idle during the {a.jobs} concurrent module jobs (equal groups of {len(groups[0])})",
                      file=sys.stderr)
        else:
            names = split_names([os.environ.get("DSI_FORWARD_ENV", ""), *a.env])
            if a.check:
                remote_env(dict(os.environ), names, [])
            elif a.out is None:
                raise UserError("env-file needs --out FILE (or --check)")
            else:
                write_env_file(a.out, dict(os.environ), names)
    except UserError as err:
        print(f"launch_env: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
