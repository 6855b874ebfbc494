#!/usr/bin/env bash
# One call's worth of GPU work: the CUDA tests (tests/test_gpu.py), then issue 5's three
# throughput benchmarks on 1024x768 photo JPEGs. Run from the repository root on a machine with
# one CUDA GPU, ray and segpipe importable; JSON results and logs go to $OUT (default bench-out/).
# Each step has its own time limit (SECONDS variables; TEST_SECONDS=0 skips the tests), so that one
# that overruns leaves the others their figures, and each benchmark phase logs its figures as it ends.
# The defaults fill one 10-minute call.
set -u
out=${OUT:-bench-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python3 -c 'import torch, torchvision, ray, pyarrow; print(torch.__version__, torchvision.__version__, ray.__version__, pyarrow.__version__)' | tee -a "$out/gpu.txt"
if [ "${TEST_SECONDS:-150}" -gt 0 ]; then
  timeout "${TEST_SECONDS:-150}" python3 -m pytest -q -x -p no:cacheprovider tests/test_gpu.py >"$out/test_gpu.log" 2>&1
  echo "test_gpu exit $?"; tail -n 15 "$out/test_gpu.log"
fi
bench() {  # bench SECONDS MODEL COUNT BATCH FILES_PER_SHARD
  local work; work=$(mktemp -d)
  timeout "$1" python3 -m benchmarks.throughput --model "$2" --count "$3" --batch-size "$4" --files-per-shard "$5" \
    --size 1024x768 --device cuda --workdir "$work" --json >"$out/$2.json" 2>"$out/$2.log"
  echo "$2 exit $?"; grep -E "^benchmark |Error|error:" "$out/$2.log" | tail -n 8; tail -n 1 "$out/$2.json"
}
# Shards of 64 (32 for Mask R-CNN) give each of the four actors several: a steady state to measure.
bench "${DEEPLAB_SECONDS:-180}" deeplabv3_resnet50 "${DEEPLAB_COUNT:-2000}" 32 64
bench "${LRASPP_SECONDS:-150}" lraspp_mobilenet_v3_large "${LRASPP_COUNT:-4000}" 32 64
bench "${MASKRCNN_SECONDS:-100}" maskrcnn_resnet50_fpn "${MASKRCNN_COUNT:-640}" 8 32
