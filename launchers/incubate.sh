#!/usr/bin/env bash
# The whole Deep Incubation pipeline through the `deepspeed` launcher.
#
#   launchers/incubate.sh                                     # no GPU: the demo on the CPU (runs/demo)
#   launchers/incubate.sh --hostfile hosts --recipe vit_h14 --output /shared/runs/vith -- --train ... --val ...
#   launchers/incubate.sh --num_gpus 8 --recipe vit_b16 --output runs/vitb
#
# Options (passed to every `deepspeed` call): --hostfile F, --include S, --exclude S, --num_gpus N, --num_nodes N,
# --master_port P (base port; concurrent jobs use P+1..P+K). Pipeline options: --recipe R | --config C,
# --output DIR, --ds-config D, --methods di,e2e[,e2e_tune,m2mkd], --cpu-ranks N (ranks per CPU job, default 1),
# --env NAME[,NAME] (repeatable; also DSI_FORWARD_ENV="A,B"): variables of this host to set on every host. Anything
# after `--` goes to every `dsincubate` call (e.g. --set incubate.epochs=50, --train/--val).
#
# The steps and their order are `dsincubate config --plan --methods ...`'s (dsincubate/registry.py): each phase on the
# full allocation, except a per-module phase's K jobs (incubation, m2mKD), which need no communication:
#   * a hostfile with >= K hosts: job i runs on hosts i, i+K, ... concurrently, each with its own master port;
#   * one node with G >= K usable GPUs: job i runs on the i-th group of G//K of them concurrently; the G%K left over
#     stay idle meanwhile. GPU ids are physical, taken from CUDA_VISIBLE_DEVICES (else SLURM's SLURM_STEP_GPUS /
#     SLURM_JOB_GPUS, else all): with CUDA_VISIBLE_DEVICES=4,5,6,7 and K=2 the jobs get 4,5 and 6,7, and the
#     full-allocation phases 4-7 (--num_gpus N: the first N of them); see dsincubate/launch_env.py;
#   * no GPU and --cpu-ranks R >= K: job i runs R/K CPU ranks, concurrently;
#   * otherwise one after another on the full allocation.
# It waits for all, names any that failed (module, hosts, log in DIR/logs/), and stops; else assembles, fine-tunes
# on the full allocation, exports, runs the E2E baseline and prints the summary. Method m2mkd (after di and e2e, whose
# model may be its teacher) runs its K student jobs (`dsincubate m2mkd --module I`) the same way, then assembles
# them (m2mkd/assemble), trains them end to end (m2mkd/finetune) and exports. The output directory must be on a
# file system every host sees. Re-running the same command resumes: finished phases and modules are skipped (a
# module whose output is complete is not even launched), unfinished ones resume from their last checkpoint.
#
# With a hostfile every job goes through DeepSpeed's multi-node runner (pdsh over ssh; --force_multi), also a job
# given a single host: without it DeepSpeed starts a one-host job on *this* machine while MASTER_ADDR names the
# remote host, and the job hangs. DeepSpeed's pdsh runner sets on the other hosts only PYTHON*, UCX*, ... (NCCL*
# only from a GPU host); this script writes DIR/logs/deepspeed_env (DS_ENV_FILE) with what the ranks also need:
# CUDA_HOME, TORCH_EXTENSIONS_DIR, TORCH_CUDA_ARCH_LIST, OMP_NUM_THREADS, DSI_*, NCCL_* where set
# here, the --env names, and the lines of your own .deepspeed_env (which is read, never changed). Each rank sets
# GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME (unless set) to its interface towards MASTER_ADDR.
# SIGTERM/SIGINT/SIGHUP to this script stop every job on every host.
# Tested on a cluster of network namespaces with sshd and pdsh (tests/cluster/, `make test-cluster`).
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"

HOSTFILE="" INCLUDE="" EXCLUDE="" NUM_GPUS="" NUM_NODES="" PORT=29500
RECIPE="" CONFIG="" OUTPUT="" DSCFG="" METHODS="di,e2e" CPU_RANKS=1
EXTRA=() FWD=()
die() { echo "incubate.sh: error: $*" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --hostfile|--include|--exclude|--num_gpus|--num_nodes|--master_port|--recipe|--config|--output|--ds-config|\
    --methods|--cpu-ranks|--env) [ $# -ge 2 ] || die "$1 needs a value (see --help)";;&
    --hostfile) HOSTFILE="$2"; shift 2;;
    --include) INCLUDE="$2"; shift 2;;
    --exclude) EXCLUDE="$2"; shift 2;;
    --num_gpus) NUM_GPUS="$2"; shift 2;;
    --num_nodes) NUM_NODES="$2"; shift 2;;
    --master_port) PORT="$2"; shift 2;;
    --recipe) RECIPE="$2"; shift 2;;
    --config) CONFIG="$2"; shift 2;;
    --output) OUTPUT="$2"; shift 2;;
    --ds-config) DSCFG="$2"; shift 2;;
    --methods) METHODS="$2"; shift 2;;
    --cpu-ranks) CPU_RANKS="$2"; shift 2;;
    --env) FWD+=(--env "$2"); shift 2;;
    --) shift; EXTRA=("$@"); break;;
    -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0;;
    *) die "unknown option $1 (see --help)";;
  esac
done
# numbers are checked here, before anything starts (0 CPU ranks would start a job of the default size)
posint() { [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "$1 must be a positive integer (got '$2')"; }
posint --cpu-ranks "$CPU_RANKS"
[ -n "$NUM_GPUS" ] && posint --num_gpus "$NUM_GPUS"
[ -n "$NUM_NODES" ] && posint --num_nodes "$NUM_NODES"
posint --master_port "$PORT"
[ "$PORT" -le 65000 ] || die "--master_port $PORT: use a port <= 65000 (module jobs use the ports after it)"
if [ -n "$HOSTFILE" ] || [ ${#FWD[@]} -gt 0 ]; then  # the --env names (on one host they are simply inherited)
  "$PY" -m dsincubate.launch_env env-file --check "${FWD[@]+"${FWD[@]}"}" || exit 2
fi

HAS_GPU=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)
if [ -z "$RECIPE$CONFIG" ] && [ "$HAS_GPU" = 0 ] && [ -z "$HOSTFILE" ]; then RECIPE=demo; fi
OUTPUT="${OUTPUT:-runs/${RECIPE:-run}}"
[ -n "$HOSTFILE" ] && [ ! -f "$HOSTFILE" ] && die "hostfile $HOSTFILE not found"

CLI=(--output "$OUTPUT")
[ -n "$RECIPE" ] && CLI+=(--recipe "$RECIPE")
[ -n "$CONFIG" ] && CLI+=(--config "$CONFIG")
[ -n "$DSCFG" ] && CLI+=(--ds-config "$DSCFG")
CLI+=("${EXTRA[@]+"${EXTRA[@]}"}")

# Launcher arguments for the full allocation (GPU ids of a one-node GPU run: below, once K is known).
FULL=()
[ -n "$HOSTFILE" ] && FULL+=(--hostfile "$HOSTFILE" --force_multi)
[ -n "$INCLUDE" ] && FULL+=(--include "$INCLUDE")
[ -n "$EXCLUDE" ] && FULL+=(--exclude "$EXCLUDE")
[ -n "$NUM_NODES" ] && FULL+=(--num_nodes "$NUM_NODES")
[ "$HAS_GPU" = 0 ] && [ -z "$HOSTFILE" ] && FULL+=(--num_accelerators "$CPU_RANKS")
# One node with GPUs, no filter of the user's: the ids go through dsincubate.launch_env (physical ids), and
# DeepSpeed starts without CUDA_VISIBLE_DEVICES so that its slot check sees every device the node gives us.
MAP_GPUS=0
if [ -z "$HOSTFILE" ] && [ "$HAS_GPU" = 1 ] && [ -z "$INCLUDE$EXCLUDE$NUM_NODES" ]; then MAP_GPUS=1
elif [ -n "$NUM_GPUS" ]; then FULL+=(--num_gpus "$NUM_GPUS"); fi
DS_RUN=("$DS")
[ "$MAP_GPUS" = 1 ] && DS_RUN=(env -u CUDA_VISIBLE_DEVICES "$DS")

# Every job runs in the background and is waited for, so that a signal reaches the trap at once (bash runs traps
# only between commands); the trap passes SIGTERM to every runner (DeepSpeed's pdsh runner then ends the ranks on
# every host) and waits for them.
JOBS=()
stop_all() {
  trap '' TERM INT HUP
  echo "incubate.sh: $1: stopping ${#JOBS[@]} job(s)" >&2
  for p in "${JOBS[@]+"${JOBS[@]}"}"; do kill -TERM "$p" 2>/dev/null || true; done
  local t=0
  while [ $t -lt 8 ]; do
    local alive=0
    for p in "${JOBS[@]+"${JOBS[@]}"}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && break
    sleep 1; t=$((t + 1))
  done
  for p in "${JOBS[@]+"${JOBS[@]}"}"; do kill -KILL "$p" 2>/dev/null || true; done
  exit 143
}
trap 'stop_all SIGTERM' TERM
trap 'stop_all SIGINT' INT
trap 'stop_all SIGHUP' HUP

launch() {  # launch <port> <launcher args...> -- <dsincubate args...>   (in the foreground, signals handled)
  local port="$1"; shift
  local largs=() ; while [ "$1" != "--" ]; do largs+=("$1"); shift; done; shift
  "${DS_RUN[@]}" "${largs[@]+"${largs[@]}"}" --master_port "$port" --module dsincubate "$@" &
  local pid=$!
  JOBS+=("$pid")
  local rc=0
  wait "$pid" || rc=$?
  JOBS=("${JOBS[@]/$pid}")
  return $rc
}

complete() { [ -f "$1/MANIFEST.json" ]; }  # an output counts once its manifest is written (written last)

# Fail fast on bad input (one line, exit 2) before starting any job; the steps to run, one a line
# (KIND NAME COUNT DIR, dsincubate/plan.py): the order is dsincubate.registry's, not this script's.
PLAN=$("$PY" -m dsincubate config --plan --methods "$METHODS" "${CLI[@]}")
mapfile -t STEPS <<<"$PLAN"
K=$(awk '$1 == "train" && index($4, "{i}") {print $3; exit}' <<<"$PLAN")
K="${K:-1}"  # no per-module phase in these methods: the module jobs are not used
if [ "$MAP_GPUS" = 1 ]; then
  GPU_OUT=$("$PY" -m dsincubate.launch_env gpus --jobs "$K" ${NUM_GPUS:+--num-gpus "$NUM_GPUS"}) || exit 2
  mapfile -t GPU_LINES <<<"$GPU_OUT"
  [ -n "${GPU_LINES[0]}" ] || die "torch sees a GPU but none is usable (CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-})"
  FULL+=(--include "localhost:${GPU_LINES[0]}")
fi
mkdir -p "$OUTPUT/logs"
if [ -n "$HOSTFILE" ]; then  # what the ranks on the other hosts need (read by DeepSpeed's runner on this host)
  ENV_FILE="$(cd "$OUTPUT/logs" && pwd)/deepspeed_env"
  "$PY" -m dsincubate.launch_env env-file --out "$ENV_FILE" "${FWD[@]+"${FWD[@]}"}" || exit 2
  export DS_ENV_FILE="$ENV_FILE"
fi

# Decide how K independent module jobs (incubation or m2mKD) share the allocation.
JOB_ARGS=()
if [ -n "$HOSTFILE" ]; then
  mapfile -t HOSTS < <(grep -v '^\s*#' "$HOSTFILE" | awk 'NF {print $1}')
  if [ "${#HOSTS[@]}" -ge "$K" ]; then
    for ((i = 0; i < K; i++)); do
      sel=""; for ((h = i; h < ${#HOSTS[@]}; h += K)); do sel="${sel:+$sel@}${HOSTS[$h]}"; done
      JOB_ARGS+=("--hostfile $HOSTFILE --force_multi --include $sel")
    done
  fi
elif [ "$MAP_GPUS" = 1 ]; then  # GPU_LINES[1..K]: the K groups of physical ids (none when fewer GPUs than K)
  for ((i = 1; i < ${#GPU_LINES[@]}; i++)); do JOB_ARGS+=("--include localhost:${GPU_LINES[$i]}"); done
elif [ "$HAS_GPU" = 0 ] && [ "$CPU_RANKS" -ge "$K" ]; then
  for ((i = 0; i < K; i++)); do JOB_ARGS+=("--num_accelerators $((CPU_RANKS / K))"); done
fi

whole() {  # whole PHASE DIR: one phase on the full allocation (skipped when its output is complete)
  echo "== $1"
  if complete "$OUTPUT/$2"; then echo "   already complete"; else
    launch "$PORT" "${FULL[@]+"${FULL[@]}"}" -- "$1" "${CLI[@]}"
  fi
}

modules() {  # modules PHASE DIR: the K module jobs (DIR holds {i}), concurrently where the allocation allows
  local phase="$1" i rc f doing="$1:" what="$1" mdir
  if [ "$phase" = incubate ]; then doing=incubating; what=incubation; fi
  if [ "$phase" = m2mkd ]; then doing="m2mKD: distilling"; what="m2mKD"; fi
  if [ "${#JOB_ARGS[@]}" -eq "$K" ]; then
    echo "== $doing $K modules concurrently"
    local PIDS=() FAILED=() JA
    for ((i = 0; i < K; i++)); do
      PIDS+=("")
      mdir="${2//\{i\}/$i}"
      if complete "$OUTPUT/$mdir"; then echo "   module $i: already complete"; continue; fi
      read -r -a JA <<<"${JOB_ARGS[$i]}"
      echo "   module $i on: ${JOB_ARGS[$i]} (log: $OUTPUT/logs/${phase}_$i.log)"
      "${DS_RUN[@]}" "${JA[@]}" --master_port $((PORT + 1 + i)) --module dsincubate "$phase" --module "$i" \
        "${CLI[@]}" >"$OUTPUT/logs/${phase}_$i.log" 2>&1 &
      PIDS[$i]=$!
      JOBS+=("$!")
    done
    for ((i = 0; i < K; i++)); do
      [ -n "${PIDS[$i]}" ] || continue
      rc=0; wait "${PIDS[$i]}" || rc=$?
      [ $rc = 0 ] || FAILED+=("$i:$rc")
    done
    JOBS=()
    if [ "${#FAILED[@]}" -gt 0 ]; then
      for f in "${FAILED[@]}"; do
        i="${f%%:*}"
        echo "incubate.sh: error: $what of module $i failed (exit ${f#*:}) on ${JOB_ARGS[$i]##*--include }; see $OUTPUT/logs/${phase}_$i.log" >&2
        tail -n 5 "$OUTPUT/logs/${phase}_$i.log" >&2 || true
      done
      echo "incubate.sh: error: ${#FAILED[@]} of $K $what job(s) failed; the others finished; run the same command again to re-run only the failed module(s)" >&2
      exit 1
    fi
  else
    echo "== $doing $K modules one after another (fewer than K hosts/GPUs)"
    for ((i = 0; i < K; i++)); do
      mdir="${2//\{i\}/$i}"
      if complete "$OUTPUT/$mdir"; then echo "   module $i: already complete"; continue; fi
      launch "$PORT" "${FULL[@]+"${FULL[@]}"}" -- "$phase" --module "$i" "${CLI[@]}"
    done
  fi
}

# The plan's steps in order. Its eval steps (the assembled model's accuracy before fine-tuning) are left to
# `dsincubate eval --model assemble` or `dsincubate pipeline`.
for line in "${STEPS[@]}"; do
  read -r kind name _count dir <<<"$line"
  case "$kind" in
    train) if [[ "$dir" == *"{i}"* ]]; then modules "$name" "$dir"; else whole "$name" "$dir"; fi;;
    assemble) echo "== assemble ($name)"; "$PY" -m dsincubate assemble --method "$name" "${CLI[@]}";;
    export) "$PY" -m dsincubate export --source "$name" "${CLI[@]}";;
    summary) "$PY" -m dsincubate summary "${CLI[@]}";;
  esac
done
