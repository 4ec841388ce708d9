#!/usr/bin/env bash
# Submit the whole pipeline to SLURM as a dependency chain: meta -> K-task incubation array -> assemble + fine-tune +
# export -> report. With --method m2mkd the array distils a trained teacher's modules (m2mKD) instead, and the chain
# assembles and fine-tunes the students (m2mkd/assemble, m2mkd/finetune, export/m2mkd_finetune).
#
#   launchers/slurm_pipeline.sh --nodes 2 --gpus 8 --k 4 -- --recipe vit_h14 --output /shared/vith
#   launchers/slurm_pipeline.sh --gpus 0 --ranks-per-node 4 -- --recipe debug --output /shared/dbg   # CPU ranks
#   launchers/slurm_pipeline.sh --method m2mkd --k 4 -- --recipe demo --output /shared/kd --set m2mkd.teacher=T
#
# Options: --nodes N (per job), --gpus G (per node; 0 = no GPUs, CPU ranks), --ranks-per-node R (ranks per node;
# default G), --array-nodes N (nodes per incubation task; default --nodes), --k K (array size; must equal the run's
# model.num_stages), --master_port P, --partition P, --sbatch "OPTS" (more sbatch options for every job),
# --method incubate|m2mkd (default incubate; m2mkd needs the teacher, m2mkd.teacher, to exist before submission: a
# model file, or e2e/finetune finished in DIR). After `--`: the dsincubate options; --output must name a directory
# every node sees. On CPUs the array tasks share the job's ranks: each runs max(1, R*N / (K*array nodes)) ranks.
# Resources per rank (a rank = a GPU): --cpus-per-rank C (default 8 with GPUs, 2 for CPU ranks) and --mem-per-rank M
# (SLURM size, default 64G with GPUs, 4G for CPU ranks; 0 = no memory request, the partition's default). Every job
# asks for one task per node with --cpus-per-task R*C and --mem R*M: its ranks share those cores (SLURM binds the
# task to them; the ranks inherit the binding and the data loader sizes its workers from the cores per rank).
#
# Each phase runs as one task per node (srun --ntasks-per-node 1) of `python -m dsincubate.ranks`, which starts
# DeepSpeed's per-node launcher with the node's rank in the step and the GPUs SLURM bound to the job (two jobs that
# share a node never share a GPU): all nodes train one model (see dsincubate/ranks.py for why this and not one
# SLURM task per rank).
#
# A failed job stops the chain: the jobs after it are cancelled by SLURM (--kill-on-invalid-dep=yes), and the
# report job, which runs whatever happened, prints which phase or module is missing and where its log is, writes
# DIR/logs/slurm/report.txt and exits non-zero. Job scripts and logs go to DIR/logs/slurm/. Re-submitting the same
# command resumes (complete phases and modules are skipped). Tested on a one-machine SLURM (slurmctld, slurmd,
# munge) in tests/cluster/test_slurm.py on 2 nodes (slurmd in 2 network-namespace hosts): meta and fine-tune at
# world size 4 across both, the array's tasks on both, a failing array task, the m2mKD chain.
set -euo pipefail
NODES=1 GPUS=8 K=4 RANKS="" PORT=29500 PARTITION="" SBATCH_OPTS="" METHOD=incubate ANODES="" CPR="" MPR=""
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
  case "$1" in
    --nodes) NODES="$2"; shift 2;; --gpus) GPUS="$2"; shift 2;; --k) K="$2"; shift 2;;
    --ranks-per-node) RANKS="$2"; shift 2;; --master_port) PORT="$2"; shift 2;;
    --partition) PARTITION="$2"; shift 2;; --sbatch) SBATCH_OPTS="$2"; shift 2;; --method) METHOD="$2"; shift 2;;
    --array-nodes) ANODES="$2"; shift 2;; --cpus-per-rank) CPR="$2"; shift 2;; --mem-per-rank) MPR="$2"; shift 2;;
    -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0;;
    *) echo "slurm_pipeline.sh: error: unknown option $1 (see --help)" >&2; exit 2;;
  esac
done
[ "${1:-}" = "--" ] && shift
case "$METHOD" in  # the pipeline method (dsincubate/registry.py) whose plan the chain runs
  incubate) METHODS=di;;
  m2mkd) METHODS=m2mkd;;
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
# the launcher's own options first (one line, exit 2)
whole() {
  [[ "$2" =~ ^[0-9]+$ ]] || { echo "slurm_pipeline.sh: error: $1 must be a whole number (got '$2')" >&2; exit 2; }
}
whole --nodes "$NODES"; whole --gpus "$GPUS"; whole --k "$K"; whole --master_port "$PORT"
SLOTS="${RANKS:-$GPUS}"
whole --ranks-per-node "$SLOTS"
[ "$SLOTS" -ge 1 ] || { echo "slurm_pipeline.sh: error: --gpus 0 needs --ranks-per-node R >= 1" >&2; exit 2; }
[ "$GPUS" -gt 0 ] && [ "$SLOTS" -gt "$GPUS" ] && {
  echo "slurm_pipeline.sh: error: --ranks-per-node $SLOTS is more than --gpus $GPUS (one rank per GPU)" >&2; exit 2; }
ANODES="${ANODES:-$NODES}"
whole --array-nodes "$ANODES"
if [ "$GPUS" -gt 0 ]; then CPR="${CPR:-8}" MPR="${MPR:-64G}"; else CPR="${CPR:-2}" MPR="${MPR:-4G}"; fi
whole --cpus-per-rank "$CPR"
[ "$NODES" -ge 1 ] && [ "$ANODES" -ge 1 ] && [ "$CPR" -ge 1 ] && [ "$K" -ge 1 ] || {
  echo "slurm_pipeline.sh: error: --nodes, --array-nodes, --cpus-per-rank and --k must be >= 1" >&2; exit 2; }
# --mem-per-rank as SLURM writes sizes (K, M, G, T; no unit = M) -> MB, so that a job's --mem is R x M
MPR_MB=$(echo "$MPR" | awk '/^[0-9]+[KkMmGgTt]?$/ { n = $0 + 0; u = toupper(substr($0, length($0)));
  print int(u == "K" ? n / 1024 : u == "G" ? n * 1024 : u == "T" ? n * 1048576 : n); next } { print "bad" }')
[ "$MPR_MB" != bad ] || {
  echo "slurm_pipeline.sh: error: --mem-per-rank $MPR is not a SLURM size (e.g. 64G)" >&2; exit 2; }
TASK_SLOTS="$SLOTS"  # on GPUs every array task gets its nodes' GPUs; on CPUs the tasks share the job's cores
if [ "$GPUS" = 0 ]; then
  TASK_SLOTS=$((SLOTS * NODES / (K * ANODES)))
  [ "$TASK_SLOTS" -ge 1 ] || TASK_SLOTS=1
fi
# fail fast (one line, exit 2) on bad input before anything is queued (with --method m2mkd also that the teacher
# exists and fits the run); the plan's steps (KIND NAME COUNT DIR a line, dsincubate/plan.py) become the chain: the
# phases before the per-module one are the first job, its K jobs the array, the steps after it one job. The plan's
# eval and summary steps are left out (the report job says what is complete).
PLAN=$("$PY" -m dsincubate config --plan --methods "$METHODS" "${ARGS[@]}") || exit 2
PRE=() POST=() MOD_PHASE="" MOD_DIR="" NUM_STAGES=""
while read -r kind name count dir; do
  if [ "$kind" = train ] && [[ "$dir" == *"{i}"* ]]; then MOD_PHASE="$name" MOD_DIR="$dir" NUM_STAGES="$count"
  elif [ "$kind" = train ] && [ -z "$MOD_PHASE" ]; then PRE+=("$name $dir")
  elif [ "$kind" = train ] || [ "$kind" = assemble ] || [ "$kind" = export ]; then POST+=("$kind $name $dir")
  fi
done <<<"$PLAN"
[ "$NUM_STAGES" = "$K" ] || { echo "slurm_pipeline.sh: error: --k $K but the run has model.num_stages=$NUM_STAGES" >&2; exit 2; }

resources() {  # resources RANKS_PER_NODE: one task per node holding its ranks' cores and memory
  echo --ntasks-per-node 1 --cpus-per-task $(($1 * CPR))
  [ "$MPR_MB" -gt 0 ] && echo --mem "$(($1 * MPR_MB))M"
  return 0
}
SB=(--parsable --kill-on-invalid-dep=yes)
[ "$GPUS" -gt 0 ] && SB+=(--gpus-per-node "$GPUS")
[ -n "$PARTITION" ] && SB+=(--partition "$PARTITION")
read -r -a EXTRA_SB <<<"$SBATCH_OPTS"
SB+=("${EXTRA_SB[@]+"${EXTRA_SB[@]}"}")
read -r -a JOB_RES <<<"--nodes $NODES $(resources "$SLOTS" | tr '\n' ' ')"
read -r -a TASK_RES <<<"--nodes $ANODES $(resources "$TASK_SLOTS" | tr '\n' ' ')"
JOBS="$OUTPUT/logs/slurm"
mkdir -p "$JOBS"
Q_ARGS=$(printf '%q ' "${ARGS[@]}")

# One phase on the job's whole allocation: one task per node (srun), each DeepSpeed's per-node launcher for its
# node's ranks (dsincubate/ranks.py); --kill-on-bad-exit ends the other nodes when one fails. srun is given the
# cores per task explicitly (SLURM 22.05+ no longer passes the job's --cpus-per-task on to srun).
job_script() {  # job_script NAME BODY
  cat >"$JOBS/$1.sh" <<EOF
#!/usr/bin/env bash
set -euo pipefail
cd $(printf '%q' "$REPO")
PHASE() { srun --nodes "\$SLURM_JOB_NUM_NODES" --ntasks-per-node 1 --cpus-per-task $((SLOTS * CPR)) \\
  --kill-on-bad-exit=1 $(printf '%q' "$PY") -m dsincubate.ranks --ranks-per-node $SLOTS --master_port $PORT \\
  -- "\$1" $Q_ARGS; }
$2
EOF
  chmod +x "$JOBS/$1.sh"
}
PRE_BODY="" POST_BODY="" FT_PHASE=""
for step in "${PRE[@]+"${PRE[@]}"}"; do PRE_BODY+="PHASE ${step%% *}"$'\n'; done
for step in "${POST[@]+"${POST[@]}"}"; do
  read -r kind name _dir <<<"$step"
  case "$kind" in
    train) POST_BODY+="PHASE $name"$'\n'; FT_PHASE="$name";;
    assemble) POST_BODY+="$(printf '%q' "$PY") -m dsincubate assemble --method $name $Q_ARGS"$'\n';;
    export) POST_BODY+="$(printf '%q' "$PY") -m dsincubate export --source $name $Q_ARGS"$'\n';;
  esac
done
job_script meta "${PRE_BODY%$'\n'}"
job_script finetune "${POST_BODY%$'\n'}"
META=$(sbatch "${SB[@]}" "${JOB_RES[@]}" --job-name dsi-meta --output "$JOBS/meta-%j.out" "$JOBS/meta.sh")
ARRAY=$(DSI_SLOTS="$TASK_SLOTS" DSI_MASTER_PORT="$PORT" DSI_REPO="$REPO" DSI_PHASE="$MOD_PHASE" DSI_PYTHON="$PY" \
  sbatch "${SB[@]}" "${TASK_RES[@]}" \
  --export=ALL --dependency "afterok:$META" --array "0-$((K - 1))" --job-name "dsi-$MOD_PHASE" \
  --output "$JOBS/$MOD_PHASE-%A_%a.out" \
  "$HERE/slurm_incubate.sbatch" "${ARGS[@]}")
FT=$(sbatch "${SB[@]}" "${JOB_RES[@]}" --dependency "afterok:$ARRAY" --job-name dsi-finetune \
  --output "$JOBS/finetune-%j.out" "$JOBS/finetune.sh")
cat >"$JOBS/report.sh" <<EOF
#!/usr/bin/env bash
# Runs after the chain, whatever happened: what is complete, what is not and where its log is.
cd $(printf '%q' "$REPO")
O=$(printf '%q' "$OUTPUT"); L=$(printf '%q' "$JOBS"); bad=0
{
  ok() { [ -f "\$O/\$1/MANIFEST.json" ]; }
$(for step in "${PRE[@]+"${PRE[@]}"}"; do set -- $step
  echo "  if ok $2; then echo \"$1: complete\"; else echo \"$1: FAILED (log: \$L/meta-$META.out)\"; bad=1; fi"; done)
  for ((i = 0; i < $K; i++)); do
    if ok ${MOD_DIR//\{i\}/\$i}; then echo "$MOD_PHASE module \$i: complete"
    else echo "$MOD_PHASE module \$i: FAILED (log: \$L/$MOD_PHASE-${ARRAY}_\$i.out)"; bad=1; fi
  done
$(for step in "${POST[@]+"${POST[@]}"}"; do set -- $step; [ "$1" = train ] || continue
  echo "  if ok $3; then echo \"$2: complete\""
  echo "  else echo \"$2: not run or FAILED (log: \$L/finetune-$FT.out)\"; bad=1; fi"; done)
  [ \$bad = 0 ] && echo "pipeline: complete" || echo "pipeline: FAILED; fix the cause and submit the same command again (complete parts are skipped)"
} | tee "\$L/report.txt"
exit \$bad
EOF

REPORT=$(sbatch --parsable --nodes 1 --ntasks 1 --cpus-per-task 1 --mem 256M \
  --dependency "afterany:$META:$ARRAY:$FT" --job-name dsi-report \
  --output "$JOBS/report-%j.out" "${EXTRA_SB[@]+"${EXTRA_SB[@]}"}" ${PARTITION:+--partition "$PARTITION"} "$JOBS/report.sh")
echo "submitted: meta $META, $([ "$METHOD" = m2mkd ] && echo m2mkd || echo incubation) array $ARRAY (${K} tasks)," \
  "assemble+finetune $FT, report $REPORT"
echo "logs and report: $JOBS/"
