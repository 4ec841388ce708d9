#!/usr/bin/env bash
# The whole Deep Incubation pipeline through the `deepspeed` launcher.
#
#   launchers/incubate.sh                                     # no GPU: the demo on the CPU (runs/demo)
#   launchers/incubate.sh --hostfile hosts --recipe vit_h14 --output /shared/runs/vith -- --train ... --val ...
#   launchers/incubate.sh --num_gpus 8 --recipe vit_b16 --output runs/vitb
#
# Options (passed to every `deepspeed` call): --hostfile F, --include S, --exclude S, --num_gpus N, --num_nodes N,
# --master_port P (base port; concurrent jobs use P+1..P+K). Pipeline options: --recipe R | --config C,
# --output DIR, --ds-config D, --methods di,e2e, --cpu-ranks N (ranks per CPU job, default 1). Anything after `--`
# goes to every `dsincubate` call (e.g. --set incubate.epochs=50, --train/--val).
#
# Phases: meta pretrain on the full allocation; then the K incubation jobs, which need no communication:
#   * a hostfile with >= K hosts: job i runs on hosts i, i+K, ... concurrently, each with its own master port;
#   * one node with G >= K GPUs: job i runs on GPUs [i*G/K, (i+1)*G/K) concurrently (--include localhost:...);
#   * otherwise one after another on the full allocation.
# It waits for all, names any that failed (logs in DIR/logs/), and stops; else assembles, fine-tunes on the full
# allocation, exports, runs the E2E baseline and prints the summary. The output directory must be on a file
# system every host sees. Re-running the same command resumes: finished phases are skipped, unfinished resume.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"

HOSTFILE="" INCLUDE="" EXCLUDE="" NUM_GPUS="" NUM_NODES="" PORT=29500
RECIPE="" CONFIG="" OUTPUT="" DSCFG="" METHODS="di,e2e" CPU_RANKS=1
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
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
    --) shift; EXTRA=("$@"); break;;
    -h|--help) sed -n '2,24p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0;;
    *) echo "incubate.sh: error: unknown option $1 (see --help)" >&2; exit 2;;
  esac
done

HAS_GPU=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)
if [ -z "$RECIPE$CONFIG" ] && [ "$HAS_GPU" = 0 ] && [ -z "$HOSTFILE" ]; then RECIPE=demo; fi
OUTPUT="${OUTPUT:-runs/${RECIPE:-run}}"
[ -n "$HOSTFILE" ] && [ ! -f "$HOSTFILE" ] && { echo "incubate.sh: error: hostfile $HOSTFILE not found" >&2; exit 2; }

CLI=(--output "$OUTPUT")
[ -n "$RECIPE" ] && CLI+=(--recipe "$RECIPE")
[ -n "$CONFIG" ] && CLI+=(--config "$CONFIG")
[ -n "$DSCFG" ] && CLI+=(--ds-config "$DSCFG")
CLI+=("${EXTRA[@]+"${EXTRA[@]}"}")

# Launcher arguments for the full allocation.
FULL=()
[ -n "$HOSTFILE" ] && FULL+=(--hostfile "$HOSTFILE")
[ -n "$INCLUDE" ] && FULL+=(--include "$INCLUDE")
[ -n "$EXCLUDE" ] && FULL+=(--exclude "$EXCLUDE")
[ -n "$NUM_GPUS" ] && FULL+=(--num_gpus "$NUM_GPUS")
[ -n "$NUM_NODES" ] && FULL+=(--num_nodes "$NUM_NODES")
[ "$HAS_GPU" = 0 ] && [ -z "$HOSTFILE" ] && FULL+=(--num_accelerators "$CPU_RANKS")

launch() {  # launch <port> <launcher args...> -- <dsincubate args...>
  local port="$1"; shift
  local largs=() ; while [ "$1" != "--" ]; do largs+=("$1"); shift; done; shift
  "$DS" "${largs[@]+"${largs[@]}"}" --master_port "$port" --module dsincubate "$@"
}

# Fail fast on bad input (one line, exit 2) before starting any job.
"$PY" -m dsincubate config "${CLI[@]}" >/dev/null
K=$("$PY" -m dsincubate config "${CLI[@]}" | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["model"]["num_stages"])')
mkdir -p "$OUTPUT/logs"

if [[ ",$METHODS," == *",di,"* ]]; then
  echo "== meta pretrain"
  launch "$PORT" "${FULL[@]+"${FULL[@]}"}" -- meta "${CLI[@]}"

  # Decide how the K independent incubation jobs share the allocation.
  JOB_ARGS=()
  if [ -n "$HOSTFILE" ]; then
    mapfile -t HOSTS < <(grep -v '^\s*#' "$HOSTFILE" | awk 'NF {print $1}')
    if [ "${#HOSTS[@]}" -ge "$K" ]; then
      for ((i = 0; i < K; i++)); do
        sel=""; for ((h = i; h < ${#HOSTS[@]}; h += K)); do sel="${sel:+$sel@}${HOSTS[$h]}"; done
        JOB_ARGS+=("--hostfile $HOSTFILE --include $sel")
      done
    fi
  elif [ "$HAS_GPU" = 1 ] && [ -z "$INCLUDE$EXCLUDE$NUM_NODES" ]; then
    G=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
    [ -n "$NUM_GPUS" ] && G="$NUM_GPUS"
    if [ "$G" -ge "$K" ]; then
      per=$((G / K))
      for ((i = 0; i < K; i++)); do
        ids=$(seq -s, $((i * per)) $(((i + 1) * per - 1)))
        JOB_ARGS+=("--include localhost:$ids")
      done
    fi
  fi

  if [ "${#JOB_ARGS[@]}" -eq "$K" ]; then
    echo "== incubating $K modules concurrently"
    PIDS=()
    for ((i = 0; i < K; i++)); do
      read -r -a JA <<<"${JOB_ARGS[$i]}"
      echo "   module $i on: ${JOB_ARGS[$i]} (log: $OUTPUT/logs/incubate_$i.log)"
      launch $((PORT + 1 + i)) "${JA[@]}" -- incubate --module "$i" "${CLI[@]}" >"$OUTPUT/logs/incubate_$i.log" 2>&1 &
      PIDS+=($!)
    done
    FAILED=()
    for ((i = 0; i < K; i++)); do wait "${PIDS[$i]}" || FAILED+=("$i"); done
    if [ "${#FAILED[@]}" -gt 0 ]; then
      for i in "${FAILED[@]}"; do
        echo "incubate.sh: error: incubation of module $i failed; see $OUTPUT/logs/incubate_$i.log" >&2
        tail -n 5 "$OUTPUT/logs/incubate_$i.log" >&2 || true
      done
      exit 1
    fi
  else
    echo "== incubating $K modules one after another (fewer than K hosts/GPUs)"
    for ((i = 0; i < K; i++)); do
      launch "$PORT" "${FULL[@]+"${FULL[@]}"}" -- incubate --module "$i" "${CLI[@]}"
    done
  fi

  echo "== assemble"
  "$PY" -m dsincubate assemble "${CLI[@]}"
  echo "== fine-tune"
  launch "$PORT" "${FULL[@]+"${FULL[@]}"}" -- finetune "${CLI[@]}"
  "$PY" -m dsincubate export --source finetune "${CLI[@]}"
fi

if [[ ",$METHODS," == *",e2e,"* ]]; then
  echo "== E2E baseline"
  launch "$PORT" "${FULL[@]+"${FULL[@]}"}" -- e2e "${CLI[@]}"
  "$PY" -m dsincubate export --source e2e "${CLI[@]}"
fi
"$PY" -m dsincubate summary "${CLI[@]}"
