#!/usr/bin/env bash
# Every GPU check the open kernel issues ask for, as one device call of ~8 minutes on one
# H100 / H200 (results under $OUT; each step has its own timeout, a failure does not stop
# the next). From the repository root, through the device tool:
#   run(command="bash experiments/benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=600)
# .whl: wheels the device image lacks (gin-config, grain and its needs, tensorboardX), made
# here with the device README's `pip download` recipe; only steps 4-5 need them.
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
step attention_gpu 330 python3 -m experiments.benchmarks.attention_gpu --out="$OUT/attention_gpu.json"
# 2. the SSD chunk-scan kernel (never run on a GPU) against the chunked XLA form
step ssd 60 python3 -m experiments.benchmarks.ssd_cpu --impls=pallas,chunked --repeats=3 \
  --seq_lens=4096,16384 --out="$OUT/ssd.json"
# 3. ALiBi and LSSAR through backend="pallas_gpu" compiled, against the reference backend
step backend_gpu 60 python3 -c "
import jax, jax.numpy as jnp, numpy as np, lcattn
from lcattn import masks as M, normalizers as N, positions as P
rng = np.random.default_rng(0)
q, k, v = (jnp.asarray(rng.normal(size=(1, 2048, h, 128)), jnp.float32) for h in (8, 2, 2))
for spec in (lcattn.AttentionSpec(M.Causal()), lcattn.AttentionSpec(M.Lambda(512, 16), position=P.ALiBi()),
             lcattn.AttentionSpec(M.Causal(), N.Reweighted()), lcattn.AttentionSpec(M.Causal(), N.Softplus())):
    f = lambda b: jax.value_and_grad(lambda q, k, v: jnp.sum(lcattn.attend(q, k, v, spec, backend=b) ** 2), (0, 1, 2))(q, k, v)
    (lo, go), (lr, gr) = f('pallas_gpu'), f('reference')
    print(spec, 'loss', float(lo), float(lr), 'max grad err / max grad', [float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) for a, b in zip(go, gr)])
"
# 4. the GPU kernels' CPU tests with this machine's jax (interpreter + lowering)
step tests_pallas_gpu 120 python3 -m pytest -q -x -n 8 -p no:cacheprovider \
  tests/test_pallas_gpu.py tests/test_pallas_gpu_bwd.py
# 5. a training run on the GPU through the pallas_gpu backend (bf16 compute)
step train_gpu 60 python3 -m experiments.train --gin_file=configs/base.gin \
  --gin_file=configs/models/tiny.gin --gin_file=configs/attention/softmax_rope.gin \
  --gin.build_model.backend="'pallas_gpu'" --gin.build_model.compute_dtype="'bfloat16'" \
  --gin.build_model.head_dim=64 --gin.train.num_steps=50 --workdir="$OUT/train_gpu"
echo "== done $(date +%T)"
