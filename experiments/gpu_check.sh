#!/usr/bin/env bash
# Every accelerator check in one call, within a fixed time budget on a GPU machine:
#   1. environment (devices, versions, whether float32 matmuls run as TF32);
#   2. the numerical test files on the accelerator;
#   3. the benchmarks (local training, reconstruction, a whole detection round; paper CNN and
#      the authors' ConvNet);
#   4. paper-size experiments (ConvNet FedAvg, 100 clients / 28 malicious: no attack, Scaling,
#      DBA, run side by side) until BUDGET_S seconds after the start; they stop cleanly on
#      SIGTERM after the current round, so the rounds done are kept.
# Each step is capped by what is left of BUDGET_S, so the script always reaches the end and
# packs its results: $OUT/log.txt, $OUT/bench_*.json, $OUT/runs.tgz.
#
#   DATA=path/to/fashion_mnist BUDGET_S=500 bash experiments/gpu_check.sh
# (pytest-xdist is needed for step 2; the GPU image has it.)
# A CPU dry run at toy size: SMALL=1 DATA=../shared/data/fashion_mnist bash experiments/gpu_check.sh
set -u
OUT=${OUT:-gpu_out}
DATA=${DATA:-../shared/data/fashion_mnist}
BUDGET_S=${BUDGET_S:-500}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
LOG=$OUT/log.txt
RUNS=runs/gpu_check
rm -rf "$RUNS"; mkdir -p "$RUNS"

if [[ -n ${SMALL:-} ]]; then   # toy sizes for a functional dry run on a CPU
  P=10; Q=3; SUBSET="--train_subset=1000"; DET=10; REC=2; LAYOUTS=loop,vmap; TESTS=tests/test_models.py
  EXP_ROUNDS=3
else
  P=100; Q=28; SUBSET=""; DET=100; REC=16; LAYOUTS=loop,vmap,map,chunked:16
  TESTS="tests/test_models.py tests/test_training.py tests/test_redefense.py tests/test_simulation.py tests/test_model_poisoning.py"
  EXP_ROUNDS=500
fi

left() { echo $((BUDGET_S - SECONDS)); }
step() {  # step NAME CAP_S COMMAND...: run COMMAND for at most CAP_S (and what is left)
  local name=$1 cap=$2; shift 2
  local l; l=$(left); (( cap > l - 15 )) && cap=$((l - 15))
  if (( cap < 10 )); then echo "== $name: skipped, budget spent" | tee -a "$LOG"; return; fi
  echo "== $name (cap ${cap} s, t=${SECONDS} s): $*" | tee -a "$LOG"
  local t0=$SECONDS
  timeout --kill-after=20 "$cap" "$@" >>"$LOG" 2>&1
  echo "== $name: rc $? after $((SECONDS - t0)) s" | tee -a "$LOG"
}

step environment 60 bash -c "nvidia-smi; $PY - <<'EOF'
import importlib.metadata as md, jax, jax.numpy as jnp, numpy as np
print('jax', jax.__version__, 'backend', jax.default_backend(), jax.devices())
for p in ('flax', 'optax', 'orbax-checkpoint', 'numpy', 'scikit-learn', 'absl-py'):
    try: print(p, md.version(p))
    except Exception as e: print(p, 'missing', e)
a = np.random.default_rng(0).standard_normal((1024, 1024)).astype(np.float32)
ref = a.astype(np.float64) @ a.astype(np.float64)
for prec in ('default', 'highest'):
    out = np.asarray(jnp.matmul(a, a, precision=None if prec == 'default' else 'highest'), np.float64)
    print(f'float32 matmul precision={prec}: relative error {np.linalg.norm(out - ref) / np.linalg.norm(ref):.2e}')
EOF"

# The numerical tests, on the accelerator (conftest keeps the CPU unless told otherwise).
step tests 90 env FEDREDEFENSE_TEST_PLATFORM= XLA_PYTHON_CLIENT_PREALLOCATE=false \
  $PY -m pytest -q -p no:cacheprovider -n 6 $TESTS

B="$PY experiments/benchmark.py --data_dir=$DATA"
step bench_cnn 110 $B --parts=training,redefense --num_clients=$P --layouts=$LAYOUTS --repeats=3 \
  --redefense_clients=$REC --redefense_iters=8 --redefense_layouts=loop,map,vmap --output=$OUT/bench_cnn.json
step bench_cnn_matmul 40 $B --parts=training --num_clients=$P --layouts=loop,vmap --conv_impl=matmul \
  --repeats=3 --output=$OUT/bench_cnn_matmul.json
step bench_detection 130 $B --parts=detection --detection_clients=$DET --redefense_layouts=loop,vmap \
  --detection_repeats=1 --output=$OUT/bench_detection.json
step bench_convnet 80 $B --parts=training,redefense --model=convnet --num_clients=$P --layouts=loop,vmap \
  --repeats=2 --redefense_clients=$REC --redefense_iters=4 --redefense_layouts=loop,map,vmap \
  --output=$OUT/bench_convnet.json

# Paper-size ConvNet FedAvg runs, side by side on the one GPU, until the budget is spent.
run_cell() {  # run_cell ATTACK CAP_S
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.25 timeout --kill-after=30 "$2" $PY experiments/run.py \
    --data_dir="$DATA" --model=convnet --num_clients=$P --num_malicious=$Q --beta=0.1 $SUBSET \
    --rounds=$EXP_ROUNDS --eval_every=10 --checkpoint_every=10 --attack="$1" \
    --output_dir="$RUNS/convnet${P}/fedavg__$1" >"$OUT/exp_$1.log" 2>&1
  echo "== experiment $1: rc $? at t=${SECONDS} s" >>"$LOG"
}
cap=$(( $(left) - 45 ))
if (( cap >= 30 )); then
  echo "== experiments (cap ${cap} s each, t=${SECONDS} s)" | tee -a "$LOG"
  for a in none scaling dba; do run_cell "$a" "$cap" & done
  wait
else
  echo "== experiments: skipped, budget spent" | tee -a "$LOG"
fi
for a in none scaling dba; do tail -n 3 "$OUT/exp_$a.log" >>"$LOG" 2>/dev/null; done
tar czf "$OUT/runs.tgz" --exclude='checkpoints' "$RUNS" 2>>"$LOG"
echo "== done at t=${SECONDS} s" | tee -a "$LOG"
grep -E "^== |s/round|client-iteration|speed-up|relative error|jax |passed|failed" "$LOG" | tail -n 80
