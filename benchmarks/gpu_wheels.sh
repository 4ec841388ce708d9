#!/usr/bin/env bash
# Fetch, on this (networked) machine, the wheels a lent GPU machine lacks, into .whl/ (git-ignored), so that
# benchmarks/gpu_session.sh can install them there without a network. The GPU image (Python 3.12, torch 2.11,
# timm, numpy, psutil, ninja, tqdm, safetensors, ...) lacks DeepSpeed, WebDataset, tensorboardX and pydantic.
#
#   bash benchmarks/gpu_wheels.sh            # then: device run with carry [".whl"] (see gpu_session.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-.venv/bin/pip}
excl=$(git rev-parse --git-path info/exclude); mkdir -p "$(dirname "$excl")"
grep -qxF '/.whl/' "$excl" 2>/dev/null || echo '/.whl/' >> "$excl"
rm -rf .whl && mkdir -p .whl
plat=()
for n in 2_17 2_24 2_27 2_28 2_31 2_34; do plat+=(--platform "manylinux_${n}_x86_64"); done
plat+=(--platform manylinux2014_x86_64)
# the versions this checkout's venv runs with (pure Python except pydantic-core, fetched for cp312)
"$PIP" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" -d .whl \
    webdataset==1.0.2 braceexpand==0.1.7 tensorboardX==2.6.5 hjson==3.1.0 pydantic==2.14.3 pydantic-core==2.50.4 \
    annotated-types==0.8.0 typing-inspection==0.4.5
# DeepSpeed is published as a source distribution; its wheel is pure Python (ops are JIT-built where they run).
# Build it against the venv's torch rather than in an isolated env that would download torch again.
"$PIP" wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
ls -l .whl
du -sh .whl
