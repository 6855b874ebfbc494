#!/usr/bin/env bash
# One call's worth of GPU work: the CUDA tests (tests/test_gpu.py), then issue 5's throughput
# benchmarks on 1024x768 photo JPEGs. Run from the repository root on a machine with one CUDA
# GPU, ray and segpipe importable; JSON results and logs go to $OUT (default bench-out/).
# BENCHMARKS picks which run (default "deeplab lraspp maskrcnn", in segpipe's default layout: one
# actor of four threads per GPU; also deeplab_8_actors, deeplab_compiled, deeplab_compiled_threads,
# deeplab_cudagraphs, deeplab_profile, lraspp_compiled_threads, lraspp_profile, NAME_threads (four
# threads named, with neither the baseline nor the variants) and NAME_actors (four actors of one
# thread, as the default was until 2026-11-28), for each of the three); each has its own time limit
# (*_SECONDS; TEST_SECONDS=0 skips the tests, TEST_SELECT runs only those that pytest's -k selects)
# and image count (*_COUNT), so that one that overruns leaves the others their figures, and each
# benchmark phase logs its figures as it ends. The defaults fill one 10-minute call. Counts are
# large so that start-up (10-25 s) does not decide the end-to-end figure; corpora beyond 4096
# images repeat them as hard links.
# NAME_long (lraspp_long, deeplab_long) is the run that reaches the model's end-to-end target, its
# image count sized by benchmarks.long_run from the figures of NAME_threads earlier in the same
# call to fit in the seconds CALL_SECONDS leaves; it runs only where the steady rate clears the
# target and the run fits. No benchmark runs past CALL_SECONDS (default 570: the call's limit,
# less what ran before this script); one with less than 30 s left is skipped.
# EXTRA passes more flags to every benchmark (EXTRA="--actors 8", say). A dry run of the script
# on a CPU, where only lraspp finishes within its limit: DEVICE=cpu TEST_SECONDS=0 BENCHMARKS=lraspp LRASPP_COUNT=4.
set -u
# A run stopped at its time limit leaves its local Ray (and any stuck actors) behind, which
# would hold the GPU and CPUs of the next one: after each, every Ray process on the machine is
# killed, so run the script on a machine of its own. The patterns match a command line's start
# only: a shell whose command merely names these processes (the one that started this script)
# would match a pattern anywhere in it, and be killed too.
stop_ray() {
  pkill -9 -x 'raylet|gcs_server' >/dev/null 2>&1
  pkill -9 -f '^ray[-:]|^[^ ]*python[^ ]* .*(/ray/|multiprocessing\.forkserver)' >/dev/null 2>&1  # ray may live outside site-packages
  sleep 1
}
out=${OUT:-bench-out}
corpora=$(mktemp -d); trap 'rm -rf "$corpora"' EXIT
mkdir -p "$out"
export PYTHONUNBUFFERED=1
# A fresh process took 14 to 17 s to import pipeline.infer on the H100 (3.3 s on the 2-core CPU
# machine), in the actors too, as if the image's Python compiled torch's modules anew each time:
# bytecode goes to a cache that this call can write, as a normal installation's would.
unset PYTHONDONTWRITEBYTECODE
export PYTHONPYCACHEPREFIX=${PYTHONPYCACHEPREFIX:-/tmp/segpipe-pycache}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python3 -c 'import torch, torchvision, torchcodec, ray, pyarrow; print(torch.__version__, torchvision.__version__, torchcodec.__version__, ray.__version__, pyarrow.__version__)' | tee -a "$out/gpu.txt"
python3 -c 'import pipeline.infer' # the first import fills the cache; the next, timed, is what an actor pays
python3 -c 'import time; started = time.time(); import pipeline.infer; print(f"import pipeline.infer: {time.time() - started:.1f} s")' | tee -a "$out/gpu.txt"
if [ "${TEST_SECONDS:-120}" -gt 0 ]; then
  # SIGINT at the limit: pytest still reports the failures it has seen
  timeout -s INT "${TEST_SECONDS:-120}" python3 -m pytest -q -x --tb=short -p no:cacheprovider tests/test_gpu.py \
    ${TEST_SELECT:+-k "$TEST_SELECT"} >"$out/test_gpu.log" 2>&1
  echo "test_gpu exit $?"; grep -E "^E |Error|passed|failed" "$out/test_gpu.log" | tail -n 20
  stop_ray
fi
bench() {  # bench NAME SECONDS MODEL COUNT BATCH FILES_PER_SHARD [more throughput flags]
  local name=$1 seconds=$2 model=$3 count=$4 batch=$5 shard=$6 left=$(( ${CALL_SECONDS:-570} - SECONDS - 5 )) work; shift 6
  if [ "$left" -lt "$seconds" ]; then seconds=$left; fi  # what the call has left
  if [ "$seconds" -lt 30 ]; then echo "$name skipped: ${left} s left of CALL_SECONDS"; return; fi
  work=$(mktemp -d)
  # every benchmark reads the same JPEGs, made by the first of them (a folder holds exactly the count asked for)
  ln -s "$corpora" "$work/images"
  timeout "$seconds" python3 -m benchmarks.throughput --model "$model" --count "$count" --batch-size "$batch" \
    --files-per-shard "$shard" --size 1024x768 --device "${DEVICE:-cuda}" --workdir "$work" --json ${EXTRA:-} "$@" >"$out/$name.json" 2>"$out/$name.log"
  echo "$name exit $?"; grep -E "^benchmark |Error|error:" "$out/$name.log" | tail -n 8
  rm -rf "$work"; stop_ray
}
long_bench() {  # long_bench NAME SHORT MODEL BATCH FILES_PER_SHARD TARGET_FLAG VALUE: sized from SHORT's figures
  local name=$1 short=$2 model=$3 batch=$4 shard=$5 left count; shift 5
  left=$(( ${CALL_SECONDS:-570} - SECONDS ))
  count=$(python3 -m benchmarks.long_run "$out/$short.json" "$@" --seconds-left "$left" 2>"$out/$name.sizing.log") || count=0
  echo "$name: $(tail -n 1 "$out/$name.sizing.log")"
  if [ "${count:-0}" -gt 0 ]; then
    bench "$name" "$((left - 5))" "$model" "$count" "$batch" "$shard" --skip-baseline --skip-variants --threads-per-actor 4
  fi
}
for name in ${BENCHMARKS:-deeplab lraspp maskrcnn}; do
  case $name in
    # the baseline takes most of deeplab's time: it runs near 100 img/s
    deeplab) bench "$name" "${DEEPLAB_SECONDS:-240}" deeplabv3_resnet50 "${DEEPLAB_COUNT:-8000}" 32 64 ;;
    # eight actors of one thread on the GPU, no baseline
    deeplab_8_actors) bench "$name" "${DEEPLAB_SECONDS:-240}" deeplabv3_resnet50 "${DEEPLAB_COUNT:-8000}" 32 64 --skip-baseline --actors 8 --threads-per-actor 1 ;;
    # four actors of one thread, the default layout until 2026-11-28
    deeplab_actors) bench "$name" "${DEEPLAB_SECONDS:-240}" deeplabv3_resnet50 "${DEEPLAB_COUNT:-8000}" 32 64 --skip-baseline --threads-per-actor 1 ;;
    lraspp_actors) bench "$name" "${LRASPP_SECONDS:-120}" lraspp_mobilenet_v3_large "${LRASPP_COUNT:-30000}" 32 64 --skip-baseline --threads-per-actor 1 ;;
    maskrcnn_actors) bench "$name" "${MASKRCNN_SECONDS:-100}" maskrcnn_resnet50_fpn "${MASKRCNN_COUNT:-2400}" 8 32 --threads-per-actor 1 ;;
    # lraspp has no baseline target (75.7 img/s on 2026-11-26); leaving it out buys a long run
    lraspp) bench "$name" "${LRASPP_SECONDS:-120}" lraspp_mobilenet_v3_large "${LRASPP_COUNT:-30000}" 32 64 --skip-baseline ;;
    # torch.compile: compiled model-only and segpipe run --compile in four actors (each compiles
    # once); cudagraphs: the same in mode reduce-overhead (CUDA graphs)
    deeplab_compiled) bench "$name" "${DEEPLAB_SECONDS:-240}" deeplabv3_resnet50 "${DEEPLAB_COUNT:-8000}" 32 64 --skip-baseline --compile default --threads-per-actor 1 ;;
    deeplab_cudagraphs) bench "$name" "${DEEPLAB_SECONDS:-240}" deeplabv3_resnet50 "${DEEPLAB_COUNT:-8000}" 32 64 --skip-baseline --compile reduce-overhead --threads-per-actor 1 ;;
    # compiled, in one actor of four threads: the layout that ran fastest eager once running
    deeplab_compiled_threads) bench "$name" "${DEEPLAB_SECONDS:-240}" deeplabv3_resnet50 "${DEEPLAB_COUNT:-8000}" 32 64 --skip-baseline --compile default --threads-per-actor 4 ;;
    # lraspp's network alone (0.57 ms per image eager on the H100) leaves 0.1 ms per image for the rest at 1500 img/s
    lraspp_compiled_threads) bench "$name" "${LRASPP_SECONDS:-160}" lraspp_mobilenet_v3_large "${LRASPP_COUNT:-30000}" 32 64 --skip-baseline --compile default --threads-per-actor 4 ;;
    maskrcnn) bench "$name" "${MASKRCNN_SECONDS:-100}" maskrcnn_resnet50_fpn "${MASKRCNN_COUNT:-2400}" 8 32 ;;
    # one actor working on four shards at once, in threads on CUDA streams of their own (named; the default since 2026-11-28)
    deeplab_threads) bench "$name" "${DEEPLAB_SECONDS:-240}" deeplabv3_resnet50 "${DEEPLAB_COUNT:-8000}" 32 64 --skip-baseline --threads-per-actor 4 ;;
    # with the model variants and the actor alone, 30,000 images took more than 140 s on the H100
    lraspp_threads) bench "$name" "${LRASPP_SECONDS:-160}" lraspp_mobilenet_v3_large "${LRASPP_COUNT:-30000}" 32 64 --skip-baseline --threads-per-actor 4 ;;
    # the actor alone on 2048 images (no Ray Data around it) and PyTorch's profile of it, in the log,
    # on one thread (the profiler runs on the thread that calls it)
    deeplab_profile) bench "$name" "${DEEPLAB_SECONDS:-240}" deeplabv3_resnet50 2048 32 64 --skip-baseline --skip-variants --profile --threads-per-actor 1 ;;
    lraspp_profile) bench "$name" "${LRASPP_SECONDS:-120}" lraspp_mobilenet_v3_large 4096 32 64 --skip-baseline --skip-variants --profile --threads-per-actor 1 ;;
    # the runs that reach the targets end to end, where this call's *_threads figures say they can
    lraspp_long) long_bench "$name" lraspp_threads lraspp_mobilenet_v3_large 32 64 --target-ips 1500 ;;
    deeplab_long) long_bench "$name" deeplab_threads deeplabv3_resnet50 32 64 --target-model-ratio 0.9 ;;
    maskrcnn_threads) bench "$name" "${MASKRCNN_SECONDS:-100}" maskrcnn_resnet50_fpn "${MASKRCNN_COUNT:-2400}" 8 32 --threads-per-actor 4 ;;
    *) echo "unknown benchmark $name (deeplab, deeplab_8_actors, deeplab_actors, deeplab_compiled, deeplab_compiled_threads, deeplab_cudagraphs, deeplab_long, deeplab_profile, deeplab_threads, lraspp, lraspp_actors, lraspp_compiled_threads, lraspp_long, lraspp_profile, lraspp_threads, maskrcnn, maskrcnn_actors, maskrcnn_threads)" ;;
  esac
done
