#!/usr/bin/env bash
# The GPU measurements of docs/performance.md, in one go on a GPU machine (16 cores):
#   bash benchmarks/run_gpu.sh OUT_DIR
# 1. GPU checks (benchmarks/gpu_checks.py); 2. in the background, pinned to 2 CPU cores, scvae-torch vs
# scVI on the CPU of a quiet machine; 3. scvae-torch vs scVI on the GPU; 4. the paper-sized model on the
# GPU: float32, bfloat16, torch.compile, and the GMVAE. Every result also goes to OUT_DIR.
# scVI is measured where `import scvi` works: on a machine without it (and without network), install
# wheels downloaded elsewhere (scvi-tools 1.4.2 and its missing dependencies) with
#   pip install --no-index --no-deps --target /tmp/site WHEELS/*.whl && export PYTHONPATH=/tmp/site
set -uo pipefail
OUT=${1:?usage: run_gpu.sh OUT_DIR}
mkdir -p "$OUT" /tmp/bt
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/machine.txt"
python3 -c "import torch, os; print('torch', torch.__version__, 'CPUs', os.cpu_count())" | tee -a "$OUT/machine.txt"
python3 benchmarks/gpu_checks.py --out "$OUT" ${CPU_CHECKPOINT:+--cpu-checkpoint "$CPU_CHECKPOINT"} \
    2>&1 | tee "$OUT/gpu_checks.txt"
B="python3 benchmarks/bench_train.py"
(timeout 470 taskset -c 14,15 $B --workdir /tmp/bt_cpu --device cpu --threads 2 --epochs 1 \
    > "$OUT/bench_cpu_2cores.txt" 2>&1) &
timeout 300 taskset -c 0-13 $B --workdir /tmp/bt --device cuda --epochs 2 2>&1 | tee "$OUT/bench_gpu.txt"
P="--workdir /tmp/bt --likelihoods nb --encoder 250,100 --decoder 100,250 --latent 50 --batch-size 100 \
   --train-cells 16200 --no-scvi --device cuda"
taskset -c 0-13 $B $P --epochs 3 2>&1 | tee "$OUT/paper_gpu.txt"
taskset -c 0-13 $B $P --epochs 3 --precision bfloat16 2>&1 | tee -a "$OUT/paper_gpu.txt"
taskset -c 0-13 $B $P --epochs 2 --model gmvae --components 10 2>&1 | tee -a "$OUT/paper_gpu.txt"
timeout 150 taskset -c 0-13 $B $P --epochs 3 --compile 2>&1 | tee -a "$OUT/paper_gpu.txt"
wait
cat "$OUT/bench_cpu_2cores.txt"
