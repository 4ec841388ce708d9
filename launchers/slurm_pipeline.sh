#!/usr/bin/env bash
# Submit the whole pipeline to SLURM as a dependency chain: meta -> K-task incubation array -> assemble + fine-tune +
# export -> report. With --method m2mkd the array distils a trained teacher's modules (m2mKD) instead, and the chain
# assembles and fine-tunes the students (m2mkd/assemble, m2mkd/finetune, export/m2mkd_finetune).
#
#   launchers/slurm_pipeline.sh --nodes 2 --gpus 8 --k 4 -- --recipe vit_h14 --output /shared/vith
#   launchers/slurm_pipeline.sh --gpus 0 --ranks-per-node 4 -- --recipe debug --output /shared/dbg   # CPU ranks
#   launchers/slurm_pipeline.sh --method m2mkd --k 4 -- --recipe demo --output /shared/kd --set m2mkd.teacher=T
#
# Options: --nodes N (per job), --gpus G (per node; 0 = no GPUs, CPU ranks), --ranks-per-node R (DeepSpeed slots per
# node; default G), --k K (array size; must equal the run's model.num_stages), --master_port P, --partition P,
# --sbatch "OPTS" (more sbatch options for every job), --method incubate|m2mkd (default incubate; m2mkd needs the
# teacher, m2mkd.teacher, to exist before submission: a model file, or e2e/finetune finished in DIR). After `--`: the dsincubate options; --output must name a
# directory every node sees. On CPUs with R >= K each array task runs R/K ranks (as launchers/incubate.sh does).
#
# A failed job stops the chain: the jobs after it are cancelled by SLURM (--kill-on-invalid-dep=yes), and the
# report job, which runs whatever happened, prints which phase or module is missing and where its log is, writes
# DIR/logs/slurm/report.txt and exits non-zero. Job scripts and logs go to DIR/logs/slurm/. Re-submitting the same
# command resumes (complete phases and modules are skipped). Tested on a one-machine SLURM (slurmctld, slurmd,
# munge) in tests/cluster/test_slurm.py: the chain, the array and a failing array task; multi-node srun is not.
set -euo pipefail
NODES=1 GPUS=8 K=4 RANKS="" PORT=29500 PARTITION="" SBATCH_OPTS="" METHOD=incubate
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
  case "$1" in
    --nodes) NODES="$2"; shift 2;; --gpus) GPUS="$2"; shift 2;; --k) K="$2"; shift 2;;
    --ranks-per-node) RANKS="$2"; shift 2;; --master_port) PORT="$2"; shift 2;;
    --partition) PARTITION="$2"; shift 2;; --sbatch) SBATCH_OPTS="$2"; shift 2;; --method) METHOD="$2"; shift 2;;
    -h|--help) sed -n '2,24p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0;;
    *) echo "slurm_pipeline.sh: error: unknown option $1 (see --help)" >&2; exit 2;;
  esac
done
[ "${1:-}" = "--" ] && shift
case "$METHOD" in
  incubate) CHECK=() MOD_DIR=incubate FT_PHASE=finetune FT_DIR=finetune;;
  m2mkd) CHECK=(--methods m2mkd) MOD_DIR=m2mkd FT_PHASE=m2mkd_finetune FT_DIR=m2mkd/finetune;;
  *) echo "slurm_pipeline.sh: error: --method must be incubate or m2mkd (got '$METHOD')" >&2; exit 2;;
esac
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
source "$HERE/_env.sh"

OUTPUT=""
for ((a = 1; a <= $#; a++)); do [ "${!a}" = "--output" ] && { b=$((a + 1)); OUTPUT="${!b}"; }; done
[ -n "$OUTPUT" ] || { echo "slurm_pipeline.sh: error: pass --output DIR (on a shared file system) after --" >&2; exit 2; }
OUTPUT="$(cd "$(dirname "$OUTPUT")" && pwd)/$(basename "$OUTPUT")"
ARGS=("$@")
for ((a = 0; a < ${#ARGS[@]}; a++)); do [ "${ARGS[$a]}" = "--output" ] && ARGS[$((a + 1))]="$OUTPUT"; done
# fail fast (one line, exit 2) on bad input before anything is queued; also checks K against the run's config
# (with --method m2mkd also that the teacher exists and fits the run)
"$PY" -m dsincubate config "${CHECK[@]+"${CHECK[@]}"}" "${ARGS[@]}" >/dev/null || exit 2
NUM_STAGES=$("$PY" -m dsincubate config "${ARGS[@]}" | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["model"]["num_stages"])')
[ "$NUM_STAGES" = "$K" ] || { echo "slurm_pipeline.sh: error: --k $K but the run has model.num_stages=$NUM_STAGES" >&2; exit 2; }

SLOTS="${RANKS:-$GPUS}"
[ "$SLOTS" -ge 1 ] || { echo "slurm_pipeline.sh: error: --gpus 0 needs --ranks-per-node R >= 1" >&2; exit 2; }
TASK_SLOTS="$SLOTS"
[ "$GPUS" = 0 ] && [ "$SLOTS" -ge "$K" ] && TASK_SLOTS=$((SLOTS / K))
SB=(--parsable --nodes "$NODES" --kill-on-invalid-dep=yes)
[ "$GPUS" -gt 0 ] && SB+=(--gpus-per-node "$GPUS")
[ -n "$PARTITION" ] && SB+=(--partition "$PARTITION")
read -r -a EXTRA_SB <<<"$SBATCH_OPTS"
SB+=("${EXTRA_SB[@]+"${EXTRA_SB[@]}"}")
JOBS="$OUTPUT/logs/slurm"
mkdir -p "$JOBS"
Q_ARGS=$(printf '%q ' "${ARGS[@]}")

# One phase on the job's whole allocation: a hostfile from SLURM's node list; DeepSpeed's slurm launcher (srun) when
# there are several nodes, a local launch on one (no ssh needed: --no_ssh_check, --master_addr given).
job_script() {  # job_script NAME BODY
  cat >"$JOBS/$1.sh" <<EOF
#!/usr/bin/env bash
set -euo pipefail
cd $(printf '%q' "$REPO")
HOSTFILE=$(printf '%q' "$JOBS")/hosts.\$SLURM_JOB_ID
scontrol show hostnames "\$SLURM_JOB_NODELIST" | awk '{print \$1" slots=$SLOTS"}' >"\$HOSTFILE"
MASTER=\$(head -n1 "\$HOSTFILE" | awk '{print \$1}')
PHASE() { launchers/phase.sh "\$1" --hostfile "\$HOSTFILE" --launcher slurm --no_ssh_check --master_addr "\$MASTER" \\
  --master_port $PORT -- $Q_ARGS; }
$2
EOF
  chmod +x "$JOBS/$1.sh"
}
job_script meta 'PHASE meta'
job_script finetune "$(printf '%q' "$PY") -m dsincubate assemble --method $METHOD $Q_ARGS
PHASE $FT_PHASE
$(printf '%q' "$PY") -m dsincubate export --source $FT_PHASE $Q_ARGS"
META=$(sbatch "${SB[@]}" --job-name dsi-meta --output "$JOBS/meta-%j.out" "$JOBS/meta.sh")
ARRAY=$(DSI_SLOTS="$TASK_SLOTS" DSI_MASTER_PORT="$PORT" DSI_REPO="$REPO" DSI_PHASE="$METHOD" sbatch "${SB[@]}" \
  --export=ALL --dependency "afterok:$META" --array "0-$((K - 1))" --job-name "dsi-$METHOD" \
  --output "$JOBS/$METHOD-%A_%a.out" \
  "$HERE/slurm_incubate.sbatch" "${ARGS[@]}")
FT=$(sbatch "${SB[@]}" --dependency "afterok:$ARRAY" --job-name dsi-finetune --output "$JOBS/finetune-%j.out" \
  "$JOBS/finetune.sh")
cat >"$JOBS/report.sh" <<EOF
#!/usr/bin/env bash
# Runs after the chain, whatever happened: what is complete, what is not and where its log is.
cd $(printf '%q' "$REPO")
O=$(printf '%q' "$OUTPUT"); L=$(printf '%q' "$JOBS"); bad=0
{
  ok() { [ -f "\$O/\$1/MANIFEST.json" ]; }
  if ok meta; then echo "meta: complete"; else echo "meta: FAILED (log: \$L/meta-$META.out)"; bad=1; fi
  for ((i = 0; i < $K; i++)); do
    if ok $MOD_DIR/module_\$i; then echo "$METHOD module \$i: complete"
    else echo "$METHOD module \$i: FAILED (log: \$L/$METHOD-${ARRAY}_\$i.out)"; bad=1; fi
  done
  if ok $FT_DIR; then echo "$FT_PHASE: complete"
  else echo "$FT_PHASE: not run or FAILED (log: \$L/finetune-$FT.out)"; bad=1; fi
  [ \$bad = 0 ] && echo "pipeline: complete" || echo "pipeline: FAILED; fix the cause and submit the same command again (complete parts are skipped)"
} | tee "\$L/report.txt"
exit \$bad
EOF

REPORT=$(sbatch --parsable --nodes 1 --dependency "afterany:$META:$ARRAY:$FT" --job-name dsi-report \
  --output "$JOBS/report-%j.out" "${EXTRA_SB[@]+"${EXTRA_SB[@]}"}" ${PARTITION:+--partition "$PARTITION"} "$JOBS/report.sh")
echo "submitted: meta $META, $([ "$METHOD" = m2mkd ] && echo m2mkd || echo incubation) array $ARRAY (${K} tasks)," \
  "assemble+finetune $FT, report $REPORT"
echo "logs and report: $JOBS/"
