#!/usr/bin/env bash
# One phase under the `deepspeed` launcher: launchers/phase.sh PHASE [launcher options] [-- dsincubate options]
#
#   launchers/phase.sh meta --num_gpus 8 -- --recipe vit_b16 --output runs/vitb
#   launchers/phase.sh incubate --hostfile hosts --include node3 -- --module 2 --recipe vit_b16 --output /shared/vitb
#   launchers/phase.sh finetune --num_accelerators 2 -- --recipe debug --output runs/debug     # 2 CPU ranks
#
# PHASE is a training phase: meta, incubate, finetune, e2e, e2e_tune, m2mkd or m2mkd_finetune. Launcher options are
# the deepspeed launcher's own (--hostfile, --include, --exclude, --num_gpus, --num_nodes, --master_port,
# --num_accelerators, ...).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
PHASE="${1:-}"
case "$PHASE" in
  meta|incubate|finetune|e2e|e2e_tune|m2mkd|m2mkd_finetune) shift;;
  *) echo "phase.sh: error: first argument must be a training phase: meta, incubate, finetune, e2e, e2e_tune, m2mkd" \
       "or m2mkd_finetune (got '${PHASE}')" >&2; exit 2;;
esac
LARGS=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do LARGS+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
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
# exec: this script's pid becomes the runner's, so SIGTERM to it is SIGTERM to the runner (whose ranks stop: see
# dsincubate/dist.py, watch_launcher, and DeepSpeed's own pdsh handler)
exec "$DS" "${LARGS[@]+"${LARGS[@]}"}" --module dsincubate "$PHASE" "$@"
