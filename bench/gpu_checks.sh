#!/usr/bin/env bash
# The checks that need a GPU machine (issues 18 and 19), in one run of about 7 minutes (7 min 30 s at most), so
# that the first machine with an H100/H200 runs all of them at once. NOT YET RUN ON A GPU (none so far).
#
#   bench/gpu_checks.sh [OUT_DIR]          # default OUT_DIR: gpu_checks/ ; PYTHON=... picks the interpreter
#
# It needs torch with CUDA, numpy, safetensors, rich, matplotlib, tqdm and pytest, imports this checkout as it is
# (PYTHONPATH), and downloads nothing. Each part's whole output goes to OUT_DIR/NAME.log; the summary (device, exit
# codes, times, the logs' last lines) to the terminal and OUT_DIR/summary.txt; scratch files to a temporary folder.
#   cuda_tests  the CUDA FP8 GEMM against the emulation, the FP8 attention output (flash on CUDA, O from E5M6)
#               against the CPU's, the trainer on CUDA against the CPU's, FP8 training on CUDA against the emulation
#               (tests/kernels/test_fp8.py, tests/kernels/test_fp8_attention.py, tests/train/test_cuda_training.py)
#   fp8_speed   tokens/s, MFU and peak memory of FP8 against BF16 on one GPU, the `small` preset (issue 19)
#   torchrun    the trainer launched by torchrun on one GPU (NCCL initialised, checkpoints written), 20 steps of
#               the tiny preset on random tokens; a pipeline over NCCL needs 2 GPUs and is not among these checks
#   pipeline_cpu  issue 18's bench at P 2 and P 4 on the machine's CPU cores, one core per rank (the development box
#               has 2, so P 4 shared them), on the model whose chunks are equal (16 MoE layers, no MTP, vocabulary
#               256: where Table 2's formulas apply; bench/RESULTS_pipeline.md), figures in pipeline_cpu.json. It
#               runs beside the GPU parts on cores of its own (the upper half), which are pinned to the lower half.
set -u
cd "$(dirname "$0")/.."
out=${1:-gpu_checks}
py=${PYTHON:-python3}
mkdir -p "$out"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
cores=$(nproc)
gpu_cores="0-$((cores / 2 - 1))" cpu_cores="$((cores / 2))-$((cores - 1))"

run() {  # run NAME LIMIT_S CORES COMMAND...
    local name=$1 limit=$2 cores=$3 start=$SECONDS rc
    shift 3
    echo "== $name (limit ${limit} s, cores $cores): $*"
    timeout "$limit" taskset -c "$cores" "$@" >"$out/$name.log" 2>&1
    rc=$?
    echo "   $name: exit $rc after $((SECONDS - start)) s$([ $rc = 124 ] && echo ', stopped at its limit'); its last lines:"
    tail -n 20 "$out/$name.log" | sed 's/^/   /'
}

{
    date -u
    git log -1 --format='commit %h %s' 2>/dev/null
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$py" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, torch.cuda.get_device_name(),
              "capability", torch.cuda.get_device_capability())'
    echo "$cores cores: GPU parts on $gpu_cores, the pipeline bench on $cpu_cores"
    run pipeline_cpu 400 "$cpu_cores" "$py" bench/pipeline.py --max-pp 4 --layers 16 --hidden 256 --seq 256 \
        --vocab 256 --steps 6 --warm 2 --set model.num_nextn_predict_layers=0 --set model.first_k_dense_replace=0 \
        --json "$out/pipeline_cpu.json" &
    run cuda_tests 150 "$gpu_cores" "$py" -m pytest -q -rs -p no:cacheprovider tests/kernels/test_fp8.py \
        tests/kernels/test_fp8_attention.py tests/train/test_cuda_training.py
    run fp8_speed 180 "$gpu_cores" "$py" bench/fp8_loss.py speed --device cuda --steps 20 --warmup 5 --rounds 1
    tokens=$("$py" -c "from pathlib import Path; from sourcelm.plan.measure import write_token_shard
print(write_token_shard(Path('$scratch/tokens'), 8192))")
    run torchrun 90 "$gpu_cores" "$py" -m torch.distributed.run --standalone --nproc-per-node 1 -m sourcelm.train \
        tiny train.device=cuda "data.train=['$tokens']" schedule.steps=20 logging.valid_every=0 \
        logging.tensorboard=false logging.progress=false checkpoint.every=10 --run-dir "$scratch/torchrun_run"
    wait
} 2>&1 | tee "$out/summary.txt"
