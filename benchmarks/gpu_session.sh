#!/usr/bin/env bash
# One command for a lent GPU (H100/H200; any CUDA device works, MFU needs one in benchmarks/common.py's peak table):
# the GPU test tier, one training step per ViT preset with parameter count, images/s and MFU, the data loader's
# images/s, and the kernels against PyTorch, in under 10 minutes. Each part has its own timeout, so one failure or
# hang does not eat the session; the parts that follow still run. Results are written like every benchmark's
# (<name>_<device>_<date>.json + .txt, with the commit) into $OUT if set (the device tool brings it back: copy the
# files into benchmarks/results/), else into benchmarks/results/; next to them gpu_session_<device>_<date>.json
# (device, commit, date, each part's command, exit status, seconds, timeout) and one .log per part.
#
#   here, once:  bash benchmarks/gpu_wheels.sh        # the wheels the GPU image lacks (DeepSpeed, ...) into .whl/
#   device:      run(command="bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=600)
#   some parts:  bash benchmarks/gpu_session.sh tests kernels   # parts: tests kernels mfu loader; extra: stepcost loop
#   here (CPU):  DRY_RUN=1 bash benchmarks/gpu_session.sh       # print every command (runs nothing, no Python)
#                DRY_RUN=check bash benchmarks/gpu_session.sh   # also: each script's --help has every option given
#
# Python: $PYTHON, else python3 when it imports DeepSpeed, WebDataset and pydantic; else the wheels in .whl/
# (installed into /tmp/site, no network needed), else .venv/bin/python, else `make install` (a networked machine).
# The parts (budget ~9 minutes with the timeouts below; a warm H100 needs about half):
#   tests    pytest -m gpu tests (JIT-builds both ops first; the kernels' GPU evidence is recorded)      210 s
#   kernels  benchmarks/kernels.py --quick: LayerNorm GB/s, attention TFLOP/s vs SDPA, ViT-H step           90 s
#   mfu      benchmarks/throughput.py: one fine-tune step (the whole target under AdamW, as the recipe's
#            ds_config=auto and checkpointing set it: bf16 + ZeRO) of vit_b16, vit_l16, vit_h14 at the recipes'
#            micro-batches 128/64/32; params, img/s, MFU vs the datasheet peak, % of measured matmul       190 s
#   loader   benchmarks/dataloader.py images/s on 500x375 JPEGs (and DALI's, into GPU memory, where
#            dataloader.py has --backend)                                                               45+45 s
# A part never runs past SESSION_LIMIT (570 s from the script's start): its timeout shrinks to what is left, and a part
# with under 20 s left is recorded as skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
parts=("$@")
[ ${#parts[@]} -eq 0 ] || [ "${parts[0]}" = all ] && parts=(tests kernels mfu loader)
for p in "${parts[@]}"; do
    case $p in tests|kernels|mfu|loader|stepcost|loop) ;;
        *) echo "error: unknown part '$p' (tests, kernels, mfu, loader, stepcost, loop, all)" >&2; exit 2 ;;
    esac
done
dry=${DRY_RUN:-}
res=${OUT:-benchmarks/results}
[ -n "$dry" ] && [ -z "${OUT:-}" ] && res=$(mktemp -d /tmp/gpu_session_dry.XXXXXX)  # a dry run writes no result
mkdir -p "$res"
SESSION_LIMIT=${SESSION_LIMIT:-570}  # seconds for all parts together: the session stays under 10 minutes
export PYTHONUNBUFFERED=1 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} MAX_JOBS=${MAX_JOBS:-16}

# ------------------------------------------------------------------ python with DeepSpeed
PY=${PYTHON:-python3}
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
if [ -z "$dry" ] && ! "$PY" -c "import deepspeed, webdataset, pydantic" 2>/dev/null; then
    if [ -d .whl ]; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl || { echo "error: installing .whl/ failed" >&2; exit 1; }
        export PYTHONPATH=/tmp/site:$PYTHONPATH
    elif [ -x .venv/bin/python ]; then
        PY=.venv/bin/python
    else
        timeout 900 make install || { echo "error: no DeepSpeed here, no .whl/ (bash benchmarks/gpu_wheels.sh" \
            "where there is a network, then carry .whl) and make install failed" >&2; exit 1; }
        PY=.venv/bin/python
    fi
fi
[ "$dry" = check ] && [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python

# ------------------------------------------------------------------ names: device kind and date, as common.py's
# (DeepSpeed may print to stdout on import: the tag is the last line)
tagger="from benchmarks import common; print(common.device_kind() + '_' + common.now()[:10])"
[ -n "$dry" ] && tag="dry_$(date -u +%F)" || tag=$("$PY" -c "$tagger" 2>/dev/null | tail -n 1)
[[ $tag =~ ^[a-z0-9_]+_[0-9]{4}-[0-9]{2}-[0-9]{2}$ ]] || tag="gpu_$(date -u +%F)"
kind=${tag%_*}
outfile() {  # $res/<name>_<tag>.json, with _2, _3, ... where it exists: a rerun never overwrites a result
    local f="$res/$1_$tag.json" n=2
    while [ -e "$f" ] || [ -e "${f%.json}.txt" ]; do f="$res/$1_${tag}_$n.json"; n=$((n + 1)); done
    echo "$f"
}
summary=$(outfile gpu_session)
records=()
session_status=0

check_options() {  # DRY_RUN: every --option given to a benchmark script must be one it has
    local script=$1; shift
    local help
    help=$("$PY" "$script" --help 2>&1) || { echo "  ! $script --help failed"; session_status=1; return; }
    for a in "$@"; do
        case $a in --*)
            grep -q -- "${a%%=*}\b" <<<"$help" || { echo "  ! $script has no option ${a%%=*}"; session_status=1; } ;;
        esac
    done
}

part() {  # part NAME TIMEOUT_S CMD...: run with its own timeout, log, and record the outcome in the summary
    local name=$1 limit=$2; shift 2
    local log="${summary%.json}_$name.log"
    echo "+ [$name, timeout ${limit}s] $*"
    if [ -n "$dry" ]; then
        [ "$dry" = check ] && [[ $2 == benchmarks/*.py ]] && check_options "${@:2}"
        records+=("$name"$'\t'"$limit"$'\t'"dry-run"$'\t'0$'\t'"$*")
        return 0
    fi
    local left=$((SESSION_LIMIT - (SECONDS - session_t0))) t0=$SECONDS rc
    if [ "$left" -lt 20 ]; then
        echo "[$name] skipped: ${left}s left of SESSION_LIMIT=${SESSION_LIMIT}s"
        records+=("$name"$'\t'"$limit"$'\t'"skipped"$'\t'0$'\t'"$*")
        write_summary
        session_status=1
        return 0
    fi
    [ "$left" -lt "$limit" ] && limit=$left
    timeout -k 10 "$limit" "$@" > >(tee "$log") 2>&1
    rc=$?
    [ "$rc" -eq 124 ] && echo "[$name] timed out after ${limit}s" | tee -a "$log"
    [ "$rc" -ne 0 ] && session_status=1
    records+=("$name"$'\t'"$limit"$'\t'"$rc"$'\t'"$((SECONDS - t0))"$'\t'"$*")
    write_summary
}

write_summary() {  # after every part: a session cut short still leaves what it measured
    printf '%s\n' "${records[@]}" | GS_SUMMARY=$summary GS_DRY=$dry "$PY" -c "
import os, sys
from pathlib import Path
from benchmarks import common
summary = os.environ['GS_SUMMARY']
parts = []
for line in sys.stdin.read().splitlines():
    name, limit, rc, sec, cmd = line.split('\t', 4)
    parts.append({'part': name, 'timeout_s': int(limit), 'exit_status': rc if rc in ('dry-run', 'skipped') else int(rc),
                  'timed_out': rc == '124', 'seconds': int(sec), 'command': cmd,
                  'log': Path(summary).stem + '_' + name + '.log'})
rec = common.header('gpu_session')
rec['parts'] = parts
rec['dry_run'] = bool(os.environ['GS_DRY'])
text = common.table(['part', 'exit', 'seconds', 'timeout'], [[p['part'], p['exit_status'], p['seconds'],
                    p['timeout_s']] for p in parts])
common.write_result('gpu_session', rec, text, summary)
" >/dev/null || echo "warning: could not write $summary"
}

if [ -z "$dry" ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "${summary%.json}_nvidia_smi.log"
    "$PY" -c "import torch, deepspeed; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'deepspeed',
deepspeed.__version__, 'gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)" \
        2>&1 | tee -a "${summary%.json}_nvidia_smi.log"
fi
echo "results: $res (tag $tag)"
session_t0=0  # SESSION_LIMIT counts from the script's start (bash's SECONDS), set-up included

for p in "${parts[@]}"; do
    case $p in
    tests)
        part tests 210 "$PY" -m pytest -q -m gpu tests -p no:cacheprovider -rs ;;
    kernels)
        part kernels 90 "$PY" benchmarks/kernels.py --quick --vit-batch 16 --out "$(outfile kernels)" ;;
    mfu)
        # finetune: the whole target trained under AdamW (E2E's step costs the same FLOPs; the L/H E2E baselines
        # use LAMB, which runs without ZeRO); ds_config and checkpointing as each preset's recipe sets them.
        part mfu 190 "$PY" benchmarks/throughput.py --presets vit_b16,vit_l16,vit_h14 --batch 128,64,32 \
            --phase finetune --ds-configs recipe --ckpt recipe --backends torch --steps 4 --warmup 2 \
            --matmul-seconds 2 --timeout 60 --skip-loop --out "$(outfile throughput)" ;;
    loader)
        cores=$(nproc 2>/dev/null || echo 4)
        workers=$(( cores > 10 ? 8 : (cores > 2 ? cores - 2 : 1) ))
        # ImageNet-sized JPEGs (500x375), the same for both rows; the DALI rows (the mixed pipeline into GPU
        # memory) where this checkout's dataloader.py has --backend
        loader_args=(--images 1000 --jpeg-size 500x375 --workers "$workers" --host-kind "$kind")
        if grep -q 'add_argument("--backend"' benchmarks/dataloader.py; then
            part loader 45 "$PY" benchmarks/dataloader.py --backend torch "${loader_args[@]}" \
                --out "$(outfile dataloader)"
            part loader_dali 45 "$PY" benchmarks/dataloader.py --backend dali "${loader_args[@]}" \
                --out "$(outfile dataloader_dali)"
        else
            part loader 45 "$PY" benchmarks/dataloader.py "${loader_args[@]}" --out "$(outfile dataloader)"
        fi ;;
    stepcost)  # extra, not in the default set: E2E / meta / incubation / fine-tune steps of ViT-B/16 (bf16 engine)
        part stepcost 240 "$PY" benchmarks/step_cost.py --preset vit_b16 --batch 64 --steps 5 --warmup 2 \
            --no-interleave --out "$(outfile step_cost)" ;;
    loop)  # extra: our training loop against a minimal DeepSpeed loop (built-in data, ViT-B/16)
        part loop 420 "$PY" benchmarks/throughput.py --skip-grid --loop-recipe vit_b16 --loop-batch 128 \
            --loop-epochs 2 --loop-set data.samples_per_epoch=6400 --loop-set data.recipe=none \
            --out "$(outfile throughput_loop)" ;;
    esac
done
if [ -n "$dry" ] && [ -z "${OUT:-}" ]; then rmdir "$res" 2>/dev/null; echo "dry run: nothing written"
else echo "summary: $summary (exit $session_status)"; fi
exit $session_status
