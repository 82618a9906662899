#!/usr/bin/env bash
# Every GPU check the open kernel issues ask for, as one device call of at most 9 minutes on
# one H100 / H200 (results under $OUT; each step has its own timeout, together 540 s; a
# failure does not stop the next; attention_gpu keeps the rows it finished). From the
# repository root, through the device tool:
#   run(command="bash experiments/benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=600)
# .whl: wheels the device image lacks (gin-config, grain and its needs, tensorboardX), made
# here by `bash experiments/benchmarks/gpu_wheels.sh` (4.5 MB); only steps 4-5 need them.
set -u
OUT=${OUT:-/tmp/gpu_session}
mkdir -p "$OUT"
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=".:${PYTHONPATH:-}"
step() { local name=$1 limit=$2; shift 2; echo "== $name (limit ${limit}s) $(date +%T)";
         timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; echo "== $name rc=$?"; tail -n 5 "$OUT/$name.log"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt"
python3 -c "import jax; print(jax.__version__, jax.devices())" >> "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
# 1. the Mosaic GPU kernels compiled, against cuDNN / attention_mgpu / xla, errors vs xla
step attention_gpu 300 python3 -m experiments.benchmarks.attention_gpu --out="$OUT/attention_gpu.json"
# 2. the SSD chunk-scan kernel (never run on a GPU) against the chunked XLA form
step ssd 45 python3 -m experiments.benchmarks.ssd_cpu --impls=pallas,chunked --repeats=3 \
  --seq_lens=4096,16384 --out="$OUT/ssd.json"
# 3. precision of the compiled pallas_gpu backend against the reference, per normalizer
#    (LSSAR with split QK^T and, for comparison, with bf16 QK^T)
step precision 90 python3 -m experiments.benchmarks.gpu_precision --seq_len=2048 \
  --head_dim=128 --out="$OUT/gpu_precision.json"
# 4. the GPU kernels' tests with this machine's jax (interpreter + lowering; the backend
#    tests with interpret=None compile on the GPU: pallas_gpu's and pallas_triton's kernels)
step tests_pallas_gpu 60 python3 -m pytest -q -n 8 -p no:cacheprovider \
  tests/test_pallas_gpu.py tests/test_pallas_gpu_bwd.py tests/test_pallas_triton.py
# 5. a training run on the GPU through the pallas_gpu backend (bf16 compute)
step train_gpu 45 python3 -m experiments.train --gin_file=configs/base.gin \
  --gin_file=configs/models/tiny.gin --gin_file=configs/attention/softmax_rope.gin \
  --gin.build_model.backend="'pallas_gpu'" --gin.build_model.compute_dtype="'bfloat16'" \
  --gin.build_model.head_dim=64 --gin.train.num_steps=50 --workdir="$OUT/train_gpu"
echo "== done $(date +%T)"
