#!/usr/bin/env bash
# One accelerator session's measurements, as one command (a lent GPU's minutes are few and each start costs some):
#   1. the one-step forward per method at SD-2.1-base size: bf16 at 512 px (batch 1 and 8) and 1024 px, the
#      float32 reference at 512 px (bf16 parity), diffusers PyTorch (fp16 / f32) on the same GPU;
#   2. every method's full-size train step at 512 px in bf16 (step time, images/s, FLOPs, MFU, memory).
# The two benchmark processes run side by side: their compiles (host CPU) overlap, their timed runs take turns
# ($JSR_BENCH_LOCK). Each writes its JSON after every row, so a run cut short keeps what it measured.
#
#   OUT=/some/dir bash benchmarks/device_session.sh          # from the repository root
# Python packages missing on the machine travel as wheels in .whl/ (see BENCHMARKS.md, "GPU session").
set -u
OUT=${OUT:-benchmarks/results/device}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export XLA_PYTHON_CLIENT_PREALLOCATE=false JSR_BENCH_LOCK=/tmp/jsr-bench.lock PYTHONUNBUFFERED=1
(nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv; nproc; free -g) > "$OUT/machine.txt" 2>&1
python3 -c "import jax, flax, torch; print('jax', jax.__version__, 'flax', flax.__version__, 'torch', torch.__version__, jax.devices())" \
  >> "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"
# Pre-flight: cuDNN fused attention forward and backward at a UNet shape; if it fails here, both benchmarks take
# XLA's attention instead of failing every program.
if ! python3 - > "$OUT/preflight.log" 2>&1 <<'PY'
import jax, jax.numpy as jnp
from jsr.models.attention import dot_product_attention
q = jax.random.normal(jax.random.key(0), (2, 4096, 5, 64), jnp.bfloat16)
f = lambda q: dot_product_attention(q, q, q, impl="cudnn").astype(jnp.float32).sum()
print("cudnn attention ok", float(jax.jit(f)(q)), float(jax.jit(jax.grad(f))(q).astype(jnp.float32).sum()))
PY
then
  echo "cuDNN attention failed (see preflight.log): using --attention xla"; tail -3 "$OUT/preflight.log"
  ATTN="--attention xla"
fi

FWD_CASES=${FWD_CASES:-osediff:512:1:bfloat16,osediff:512:1:float32,osediff:512:8:bfloat16,osediff:1024:1:bfloat16,fidesr:512:1:bfloat16,rcod:512:1:bfloat16}
TRAIN_METHODS=${TRAIN_METHODS:-osediff,pisa-sem,ctsr1,fidesr,ctsr2,pisa-pix,fidelity}
cd benchmarks
timeout -k 20 -s INT "${FWD_TIMEOUT:-480}" python3 one_step_forward.py --cases "$FWD_CASES" --repeats "${FWD_REPEATS:-20}" \
  --compile-workers 3 ${ATTN:-} ${FWD_ARGS:-} --out "$OUT/one_step_forward.json" > "$OUT/one_step_forward.log" 2>&1 &
fwd=$!
timeout -k 20 -s INT "${TRAIN_TIMEOUT:-530}" python3 train_step.py --batch "${TRAIN_BATCH:-4}" --steps 5 \
  --methods "$TRAIN_METHODS" --compile-workers 4 ${ATTN:-} ${TRAIN_ARGS:-} --out "$OUT/train_step.json" > "$OUT/train_step.log" 2>&1 &
train=$!
( while kill -0 $fwd 2>/dev/null || kill -0 $train 2>/dev/null; do
    nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader >> "$OUT/gpu_usage.csv" 2>&1
    sleep 5
  done ) &
wait $fwd; echo "one_step_forward exit $?"
wait $train; echo "train_step exit $?"
grep -hE "^(osediff|fidesr|rcod|pisa|ctsr|fidelity|compiled|random|models|peak)|FAILED|Error" \
  "$OUT/one_step_forward.log" "$OUT/train_step.log" | head -80
