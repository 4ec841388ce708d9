#!/usr/bin/env bash
# What a lent GPU should run, in parts that each fit one 10-minute device call. Results land in $OUT (the device
# tool brings them back; copy them into benchmarks/results/) or, without $OUT, in benchmarks/results/.
#
#   here, once:  bash benchmarks/gpu_wheels.sh                   # DeepSpeed, WebDataset, ... wheels into .whl/
#   device:      run(command="bash benchmarks/gpu_session.sh kernels", carry=[".whl"])   # issue 4: tests + kernels
#                run(command="bash benchmarks/gpu_session.sh steps",   carry=[".whl"])   # issue 5: step cost B/L/H
#                run(command="bash benchmarks/gpu_session.sh mfu",     carry=[".whl"])   # issue 5: throughput / MFU
#                run(command="bash benchmarks/gpu_session.sh loop",    carry=[".whl"])   # issue 5: loop overhead
#   locally:     DRY_RUN=1 bash benchmarks/gpu_session.sh all       # print the commands only
set -uo pipefail
cd "$(dirname "$0")/.."
part=${1:-kernels}
res=${OUT:-benchmarks/results}
mkdir -p "$res"
run() {  # echo, then run unless DRY_RUN; keep going after a failure so later measurements still happen
    echo "+ $*"
    [ -n "${DRY_RUN:-}" ] && return 0
    "$@" 2>&1 | tee -a "$res/gpu_session_${part}.log"
    return "${PIPESTATUS[0]}"
}
if [ -z "${DRY_RUN:-}" ]; then
    if [ -d .whl ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl || exit 1
        export PYTHONPATH=/tmp/site:$PWD
    else
        export PYTHONPATH=$PWD
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$res/gpu_session_${part}.log"
fi
export PYTHONUNBUFFERED=1 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} MAX_JOBS=${MAX_JOBS:-16}
tag=$(python3 -c "
import re, torch
n = torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu'
m = re.search(r'\b[A-Z]\d{2,3}\b', n)
print((m.group(0) if m else n.split()[-1]).lower())" 2>/dev/null || echo gpu)
tag=${tag}_$(date -u +%F)  # device and date in every result name: a later session does not overwrite this one
status=0
case $part in
    kernels|all)
        run python3 -m pytest -q -m gpu tests/ops -p no:cacheprovider || status=1
        run python3 benchmarks/kernels.py --out "$res/kernels_$tag.json" || status=1 ;;&
    steps|all)
        run python3 benchmarks/step_cost.py --preset vit_b16,vit_l16,vit_h14 --batch 64,32,16 --steps 10 --warmup 3 \
            --out "$res/step_cost_$tag.json" || status=1 ;;&
    mfu|all)
        run python3 benchmarks/throughput.py --presets vit_b16,vit_l16,vit_h14 --batch 128,64,32 \
            --ds-configs zero2_bf16,zero3_bf16 --ckpt off,on --backends torch,auto --steps 5 --warmup 2 --skip-loop \
            --out "$res/throughput_$tag.json" || status=1 ;;&
    loop|all)
        run python3 benchmarks/throughput.py --skip-grid --loop-recipe vit_b16 --loop-batch 128 --loop-epochs 2 \
            --loop-set data.samples_per_epoch=12800 --loop-set data.recipe=none --out "$res/throughput_loop_$tag.json" || status=1 ;;
    kernels|steps|mfu) ;;
    *) echo "unknown part '$part' (kernels, steps, mfu, loop, all)"; exit 2 ;;
esac
exit $status
