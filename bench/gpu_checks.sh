#!/usr/bin/env bash
# The checks that need a CUDA GPU (issues 18 and 19), in one run, each part under its own time limit, so that the
# first machine with an H100/H200 runs all of them at once (at most 690 s). NOT YET RUN ON A GPU (none so far).
#
#   bench/gpu_checks.sh [OUT_DIR]          # default OUT_DIR: gpu_checks/ ; PYTHON=... picks the interpreter
#
# It needs torch with CUDA, numpy, safetensors, tqdm and pytest, imports this checkout as it is (PYTHONPATH), and
# downloads nothing. Each part's whole output goes to OUT_DIR/NAME.log; the summary (device, exit codes, times, the
# logs' last lines) to the terminal and OUT_DIR/summary.txt.
#   cuda_tests  the CUDA FP8 GEMM against the emulation, the FP8 attention output (flash on CUDA, O from E5M6)
#               against the CPU's, the trainer on CUDA against the CPU's, FP8 training on CUDA against the emulation
#               (tests/kernels/test_fp8.py, tests/kernels/test_fp8_attention.py, tests/train/test_cuda_training.py)
#   fp8_speed   tokens/s, MFU and peak memory of FP8 against BF16 on one GPU, the `small` preset (issue 19)
#   torchrun    the trainer launched by torchrun on one GPU (NCCL initialised, checkpoints written), 20 steps of
#               the tiny preset on random tokens; a pipeline over NCCL needs 2 GPUs and is not among these checks
set -u
cd "$(dirname "$0")/.."
out=${1:-gpu_checks}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

run() {  # run NAME LIMIT_S COMMAND...
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    echo "== $name (limit ${limit} s): $*"
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    rc=$?
    echo "   exit $rc after $((SECONDS - start)) s$([ $rc = 124 ] && echo ', stopped at its limit'); its last lines:"
    tail -n 20 "$out/$name.log" | sed 's/^/   /'
}

{
    date -u
    git log -1 --format='commit %h %s' 2>/dev/null
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$py" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, torch.cuda.get_device_name(),
              "capability", torch.cuda.get_device_capability())'
    run cuda_tests 240 "$py" -m pytest -q -rs -p no:cacheprovider tests/kernels/test_fp8.py \
        tests/kernels/test_fp8_attention.py tests/train/test_cuda_training.py
    run fp8_speed 300 "$py" bench/fp8_loss.py speed --device cuda --steps 20 --warmup 5 --rounds 1
    tokens=$("$py" -c "from pathlib import Path; from sourcelm.plan.measure import write_token_shard
print(write_token_shard(Path('$out/tokens'), 8192))")
    run torchrun 150 "$py" -m torch.distributed.run --standalone --nproc-per-node 1 -m sourcelm.train tiny \
        train.device=cuda "data.train=['$tokens']" schedule.steps=20 logging.valid_every=0 logging.tensorboard=false \
        logging.progress=false checkpoint.every=10 --run-dir "$out/torchrun_run"
} 2>&1 | tee "$out/summary.txt"
