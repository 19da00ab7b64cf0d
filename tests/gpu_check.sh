#!/usr/bin/env bash
# The GPU check: what a GPU owner runs to see these scripts on their card, in one go, each part under its own time
# limit (SIGINT at the limit, so a training run saves), output on the terminal and in out/gpu_check/*.log:
#   1. the device, torch and CUDA versions;
#   2. the GPU-only tests (tests/test_gpu.py) and the samplers' closed-form checks on CUDA;
#   3. the speed benchmark: bare step of our U-Net and of diffusers' (when installed), eager and compiled, and
#      ddpm_cifar.py's own loop per logging window, at batch 128 in bf16, with the GPU's clocks logged beside it;
#   4. 100-step runs of every image script in its GPU configuration (ddpm_cifar.py: the default 35.75M U-Net on
#      generated shapes at 32 pixels, so no download is needed; the others on MNIST from DATA_DIR);
#   5. with --full, the whole suite (CPU tests pinned to --device cpu, GPU tests on the GPU).
# Usage: bash tests/gpu_check.sh [DATA_DIR] [--full]      DATA_DIR holds MNIST/raw (default ./data)
# Environment: STEPS (default 100) for part 4; DEVICE (default cuda) runs parts 3-4 elsewhere, as a dry run.
set -uo pipefail
cd "$(dirname "$0")/.."
data=./data full=0
for a in "$@"; do if [ "$a" = --full ]; then full=1; else data=$a; fi; done
steps=${STEPS:-100} device=${DEVICE:-cuda}
out=out/gpu_check
mkdir -p "$out"
export MPLBACKEND=Agg
py=$(command -v python3 || command -v python)  # some GPU images have only python3

part() {  # part NAME LIMIT_SECONDS COMMAND...: run it, log it, say how it ended
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout --signal=INT --kill-after=30 "$limit" "$@" 2>&1 | tee "$out/$name.log"
  echo "$name: exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s" | tee -a "$out/summary.txt"
}
rm -rf "$out/summary.txt" "$out/cifar" "$out/mnist" "$out/score_sde" "$out/gan"  # fresh runs, not resumes

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "(no nvidia-smi)"
"$py" -c 'import torch; print("torch", torch.__version__, "| CUDA", torch.version.cuda, "|",
           torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU visible")'
par=(); "$py" -c 'import xdist' 2>/dev/null && par=(-n 6)  # pytest-xdist: the GPU tests side by side (2 min on an H100)
if [ "$device" = cuda ]; then
  part gpu_tests 600 "$py" -m pytest -q -p no:cacheprovider "${par[@]}" -k 'cuda or test_gpu' tests/test_gpu.py \
    tests/test_ddpm_cifar.py tests/test_ddpm_mnist.py tests/test_score_sde.py
  # the SM clock and throttle reasons every 0.5 s beside the benchmark: one H100 ran the same step 39 to 64 ms
  nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active \
    --format=csv -lms 500 > "$out/clocks.csv" 2>/dev/null & smi=$!
  part bench 420 "$py" tests/bench_cifar_unet.py --batch-size 128 --loop-steps 300 --log-every 50
  kill $smi 2>/dev/null
else  # a dry run of the command lines: the small network, eager only
  part bench 420 "$py" tests/bench_cifar_unet.py --device "$device" --preset tiny --batch-size 32 --compile false \
    --rounds 2 --steps 2 --loop-steps 20 --log-every 5
fi
every=$((steps / 4 > 0 ? steps / 4 : 1))
run=(--device "$device" --max-steps "$steps" --log-every "$every" --n-samples 10)
small=(); [ "$device" = cuda ] || small=(--preset tiny)  # the dry run's ddpm_cifar: the small network
part cifar 240 "$py" ddpm_cifar.py "${run[@]}" "${small[@]}" --dataset shapes --image-size 32 --train-images 10000 \
  --out-dir "$out/cifar" --sample-steps 20
part mnist 180 "$py" ddpm_mnist.py "${run[@]}" --preset gpu --data-dir "$data" --out-dir "$out/mnist"
part score_sde 180 "$py" score_sde.py "${run[@]}" --preset gpu --data-dir "$data" --out-dir "$out/score_sde" --steps 50
part gan 180 "$py" gan_baseline.py "${run[@]}" --dtype bfloat16 --data-dir "$data" --out-dir "$out/gan" \
  --eval-samples 500 --fid-every 0
if [ "$full" = 1 ]; then
  part suite 900 "$py" -m pytest -q -p no:cacheprovider "${par[@]}" tests/
fi
echo "logs: $out/"; cat "$out/summary.txt"
