#!/usr/bin/env bash
# Submit the whole pipeline to SLURM with dependencies: meta -> K-task incubation array -> assemble + finetune (+ e2e).
#
#   launchers/slurm_pipeline.sh --nodes 2 --gpus 8 --k 4 -- --recipe vit_h14 --output /shared/vith
set -euo pipefail
NODES=1 GPUS=8 K=4
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
  case "$1" in
    --nodes) NODES="$2"; shift 2;; --gpus) GPUS="$2"; shift 2;; --k) K="$2"; shift 2;;
    *) echo "slurm_pipeline.sh: error: unknown option $1" >&2; exit 2;;
  esac
done
[ "${1:-}" = "--" ] && shift
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
full() {  # a job on the full allocation running one phase
  echo "#!/usr/bin/env bash
set -euo pipefail; cd $(dirname "$HERE")
scontrol show hostnames \"\$SLURM_JOB_NODELIST\" | awk '{print \$1\" slots=$GPUS\"}' > hosts.\$SLURM_JOB_ID
$*"
}
ARGS="$*"
META=$(sbatch --parsable --nodes "$NODES" --gpus-per-node "$GPUS" --job-name dsi-meta \
  --wrap "$(full launchers/phase.sh meta --hostfile hosts.\$SLURM_JOB_ID --launcher slurm -- $ARGS)")
ARRAY=$(sbatch --parsable --dependency "afterok:$META" --array "0-$((K - 1))" --nodes "$NODES" \
  --gpus-per-node "$GPUS" "$HERE/slurm_incubate.sbatch" "$@")
FT=$(sbatch --parsable --dependency "afterok:$ARRAY" --nodes "$NODES" --gpus-per-node "$GPUS" --job-name dsi-finetune \
  --wrap "$(full "python -m dsincubate assemble $ARGS && launchers/phase.sh finetune --hostfile hosts.\$SLURM_JOB_ID --launcher slurm -- $ARGS && python -m dsincubate export $ARGS")")
echo "submitted: meta $META, incubation array $ARRAY, assemble+finetune $FT"
