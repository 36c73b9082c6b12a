#!/usr/bin/env bash
# Every accelerator check in one call, within a fixed time budget, on all local devices:
#   1. environment (devices, versions, whether float32 matmuls run as TF32);
#   2. the numerical test files on the accelerator;
#   3. local training (seconds per round) and a whole FedREDefense detection round of
#      100 Fashion-MNIST clients (first participation and steady state; every program
#      compiled before it is timed), paper CNN then ConvNet: vmap against a per-client loop
#      on one device, then vmap on all devices (the client mesh); the vmap layouts run
#      first, and results are written as they come, so a step cut short by its cap keeps them;
#   4. paper-size experiments (ConvNet FedAvg, 100 clients / 28 malicious: no attack, Scaling,
#      DBA, run side by side) with what is left of BUDGET_S; they stop cleanly on SIGTERM
#      after the current round, so the rounds done are kept;
#   5. the numbers: $OUT/summary.md (also printed last).
# Each step is capped by what is left of BUDGET_S, so the script always reaches the end and
# packs its results: $OUT/log.txt, $OUT/bench_*.json, $OUT/summary.md, $OUT/runs.tgz.
# JAX's persistent compilation cache ($OUT/jax_cache) lets every device of the mesh load a
# program the first one compiled (GPU cache keys ignore the device).
#
#   DATA=path/to/fashion_mnist BUDGET_S=530 bash experiments/gpu_check.sh
# (pytest-xdist is needed for step 2; the GPU image has it.)
# A CPU dry run at toy size, on 2 forced host devices:
#   SMALL=1 DATA=../shared/data/fashion_mnist bash experiments/gpu_check.sh
set -u
OUT=${OUT:-gpu_out}
DATA=${DATA:-../shared/data/fashion_mnist}
BUDGET_S=${BUDGET_S:-530}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$OUT/jax_cache}
LOG=$OUT/log.txt
RUNS=runs/gpu_check
rm -rf "$RUNS"; mkdir -p "$RUNS"

if [[ -n ${SMALL:-} ]]; then   # toy sizes for a functional dry run on a CPU
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=2"
  P=10; Q=3; SUBSET="--train_subset=1000"; DET=4; CAPS="--first_cap=4 --later_cap=4 --train_subset=400"
  TESTS=tests/test_models.py
  EXP_ROUNDS=3; XDIST=""
else
  P=100; Q=28; SUBSET=""; DET=100; CAPS=""; XDIST="-n 6"
  TESTS="tests/test_models.py tests/test_training.py tests/test_redefense.py tests/test_simulation.py tests/test_model_poisoning.py"
  EXP_ROUNDS=500
fi

left() { echo $((BUDGET_S - SECONDS)); }
step() {  # step NAME CAP_S COMMAND...: run COMMAND for at most CAP_S (and what is left)
  local name=$1 cap=$2; shift 2
  local l; l=$(left); (( cap > l - 20 )) && cap=$((l - 20))
  if (( cap < 10 )); then echo "== $name: skipped, budget spent" | tee -a "$LOG"; return; fi
  echo "== $name (cap ${cap} s, t=${SECONDS} s): $*" | tee -a "$LOG"
  local t0=$SECONDS
  timeout --kill-after=10 "$cap" "$@" >>"$LOG" 2>&1
  echo "== $name: rc $? after $((SECONDS - t0)) s" | tee -a "$LOG"
}

step environment 40 bash -c "nvidia-smi 2>/dev/null; $PY - <<'EOF'
import importlib.metadata as md, jax, jax.numpy as jnp, numpy as np
print('jax', jax.__version__, 'backend', jax.default_backend(), 'local devices', len(jax.local_devices()), jax.devices())
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
step tests 80 env FEDREDEFENSE_TEST_PLATFORM= XLA_PYTHON_CLIENT_PREALLOCATE=false \
  $PY -m pytest -q -p no:cacheprovider $XDIST $TESTS

# Local training and detection rounds: one device (vmap, then the per-client loop), then all.
B="$PY experiments/benchmark.py --data_dir=$DATA --num_clients=$DET --detection_clients=$DET $CAPS --detection_compile_first"
step cnn_1_device 150 $B --parts=training,detection --num_devices=1 --layouts=vmap,loop \
  --redefense_layouts=vmap,loop --repeats=2 --detection_repeats=0 --output=$OUT/bench_cnn_1.json
step cnn_all_devices 70 $B --parts=training,detection --layouts=vmap --redefense_layouts=vmap \
  --repeats=2 --detection_repeats=0 --output=$OUT/bench_cnn_all.json
step convnet_1_device 120 $B --model=convnet --parts=training,detection --num_devices=1 --layouts=vmap,loop \
  --redefense_layouts=vmap,loop --repeats=1 --detection_repeats=0 --output=$OUT/bench_convnet_1.json
step convnet_all_devices 70 $B --model=convnet --parts=training,detection --layouts=vmap --redefense_layouts=vmap \
  --repeats=1 --detection_repeats=0 --output=$OUT/bench_convnet_all.json

# Paper-size ConvNet FedAvg runs, side by side, until the budget is spent (45 s kept for the end).
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

# The numbers, from whatever the steps wrote.
timeout 20 $PY - "$OUT" >"$OUT/summary.md" 2>>"$LOG" <<'EOF'
import glob, json, os, re, sys
out = sys.argv[1]
vs = lambda r: f"{r['speedup_vs_loop']:.2f}x" if "speedup_vs_loop" in r else "-"
print("| model | devices | part | phase | layout | s / round | iterations | vs loop |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
for path in sorted(glob.glob(os.path.join(out, "bench_*.json"))):
    try:
        b = json.load(open(path))
    except ValueError:
        continue
    lt = b.get("local_training")
    if lt:
        for lay, r in lt["layouts"].items():
            print(f"| {lt['model']} | {lt.get('devices', 1)} | training | - | {lay} | {r['seconds_per_round']:.3f} | - | "
                  f"{vs(r)} |")
    det = b.get("detection")
    if det:
        for phase, res in det["phases"].items():
            for lay, r in res.items():
                print(f"| {det['model']} | {det.get('devices', 1)} | detection | {phase} | {lay} | {r['seconds']:.3f} | "
                      f"{r['total_iterations']} | {vs(r)} |")
log = open(os.path.join(out, "log.txt")).read()
tests = re.findall(r"^(\d+ (?:passed|failed).*)$", log, re.M)
print(f"\ntests on the accelerator: {tests[-1] if tests else 'no result'}")
steps = re.findall(r"^== (\S+): (rc \d+ after \d+ s|skipped.*)$", log, re.M)
print("steps: " + "; ".join(f"{n} {r}" for n, r in steps))
EOF
echo "== done at t=${SECONDS} s" | tee -a "$LOG"
grep -E "^== |relative error|^jax " "$LOG" | tail -n 40
cat "$OUT/summary.md"
