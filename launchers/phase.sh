#!/usr/bin/env bash
# One phase under the `deepspeed` launcher: launchers/phase.sh PHASE [launcher options] [-- dsincubate options]
#
#   launchers/phase.sh meta --num_gpus 8 -- --recipe vit_b16 --output runs/vitb
#   launchers/phase.sh incubate --hostfile hosts --include node3 -- --module 2 --recipe vit_b16 --output /shared/vitb
#   launchers/phase.sh finetune --num_accelerators 2 -- --recipe debug --output runs/debug     # 2 CPU ranks
#
# PHASE is a training phase of dsincubate/registry.py (`python -m dsincubate.registry phases`: meta, incubate,
# finetune, e2e, e2e_tune, m2mkd, m2mkd_finetune, ...). Launcher options are
# the deepspeed launcher's own (--hostfile, --include, --exclude, --num_gpus, --num_nodes, --master_port,
# --num_accelerators, ...), and --env NAME[,NAME] (repeatable; also DSI_FORWARD_ENV="A,B"): variables of this host
# to set on every host of a hostfile launch.
#
# One node with GPUs and no --include/--exclude/--num_nodes: the GPUs are the physical ids of CUDA_VISIBLE_DEVICES
# (else SLURM_STEP_GPUS / SLURM_JOB_GPUS, else all), or the first --num_gpus N of them; DeepSpeed itself would read
# --num_gpus N as GPUs 0..N-1 whatever CUDA_VISIBLE_DEVICES says (dsincubate/launch_env.py).
# A hostfile launch over pdsh: what the ranks on the other hosts need (CUDA_HOME, TORCH_EXTENSIONS_DIR,
# TORCH_CUDA_ARCH_LIST, OMP_NUM_THREADS, DSI_*, NCCL_*, the --env names, your .deepspeed_env's
# lines) is written to DIR/logs/deepspeed_env_PHASE (DIR: the --output after --; else $TMPDIR/dsincubate_env.PID)
# for DeepSpeed's runner (DS_ENV_FILE).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
PHASE="${1:-}"
PHASES=$("$PY" -m dsincubate.registry phases) || exit 2
if [ -n "$PHASE" ] && grep -qxF -- "$PHASE" <<<"$PHASES"; then shift; else
  echo "phase.sh: error: first argument must be a training phase: $(echo $PHASES | sed 's/ /, /g') (got '${PHASE}')" >&2
  exit 2
fi
LARGS=() FWD=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
  if [ "$1" = --env ]; then
    [ $# -ge 2 ] || { echo "phase.sh: error: --env needs a value" >&2; exit 2; }
    FWD+=(--env "$2"); shift 2; continue
  fi
  LARGS+=("$1"); shift
done
[ "${1:-}" = "--" ] && shift
has() { case " ${LARGS[*]-} " in *" $1 "*) return 0;; *) return 1;; esac; }
# With a hostfile and the pdsh runner, always go through pdsh (--force_multi): a job left with one host after
# --include/--exclude would otherwise be started on this machine while MASTER_ADDR names that host (it hangs).
case " ${LARGS[*]-} " in
  *" --hostfile "*) case " ${LARGS[*]} " in
                      *" --force_multi "*|*" --no_ssh "*) ;;
                      *" --launcher pdsh "*) LARGS+=(--force_multi);;
                      *" --launcher "*) ;;  # srun/mpirun place ranks themselves
                      *) LARGS+=(--force_multi);;
                    esac;;
esac
PDSH=0
if has --hostfile && ! has --no_ssh && { ! has --launcher || has "--launcher pdsh"; }; then PDSH=1; fi
if [ "$PDSH" = 1 ]; then
  OUT=""; prev=""
  for a in "$@"; do [ "$prev" = --output ] && OUT="$a"; prev="$a"; done
  if [ -n "$OUT" ]; then mkdir -p "$OUT/logs"; ENV_FILE="$(cd "$OUT/logs" && pwd)/deepspeed_env_$PHASE"
  else ENV_FILE="${TMPDIR:-/tmp}/dsincubate_env.$$"; fi  # $$ stays the runner's pid (exec), unique while it runs
  "$PY" -m dsincubate.launch_env env-file --out "$ENV_FILE" "${FWD[@]+"${FWD[@]}"}" || exit 2
  export DS_ENV_FILE="$ENV_FILE"
fi
DS_RUN=("$DS")
if ! has --hostfile && ! has --include && ! has --exclude && ! has --num_nodes && ! has --num_accelerators; then
  # --num_gpus N becomes --include localhost:<the first N usable ids>; nothing when this host has no GPU
  N=""; L2=()
  for ((i = 0; i < ${#LARGS[@]}; i++)); do
    if [ "${LARGS[$i]}" = --num_gpus ]; then N="${LARGS[$((i + 1))]:-}"; i=$((i + 1)); else L2+=("${LARGS[$i]}"); fi
  done
  IDS=$("$PY" -m dsincubate.launch_env gpus ${N:+--num-gpus "$N"} | head -n 1) || exit 2
  if [ -n "$IDS" ]; then  # started without CUDA_VISIBLE_DEVICES, DeepSpeed's slot check sees every device
    LARGS=("${L2[@]+"${L2[@]}"}" --include "localhost:$IDS"); DS_RUN=(env -u CUDA_VISIBLE_DEVICES "$DS")
  fi
fi
# exec: this script's pid becomes the runner's, so SIGTERM to it is SIGTERM to the runner (whose ranks stop: see
# dsincubate/dist.py, watch_launcher, and DeepSpeed's own pdsh handler)
exec "${DS_RUN[@]}" "${LARGS[@]+"${LARGS[@]}"}" --module dsincubate "$PHASE" "$@"
