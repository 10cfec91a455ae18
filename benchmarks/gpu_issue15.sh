#!/usr/bin/env bash
# The GPU run of issue 15 (fused INT8 backend, pinned ORT copies, torch-free TensorRT runner).
# Runs on the GPU machine from a copy of the repository (the command `cd`s there first), with bundles
# made here in ./bundles (halfcheetah, elu512). Writes to $OUT: env.txt, pytest-*.txt, bench.json/.txt.
#   bash benchmarks/gpu_issue15.sh [tests] [ort-tests] [returns] [validate] [bench] [history] [jitter] [rnn] [rnn-bench]  (default: tests bench)
# rnn / rnn-bench: the fused recurrent backend (tests/test_fused_rnn.py; benchmarks/gpu_recurrent.py) on bundles/rppo
# (recurrentppo-pendulum.zip) and bundles/tslstm (torchscript-lstm-invertedpendulum.pt), made here with
#   edgeq quantize tests/fixtures/policies/recurrentppo-pendulum.zip --env Pendulum-v1 --out bundles/rppo --episodes 4 --calib-episodes 6
#   edgeq quantize tests/fixtures/policies/torchscript-lstm-invertedpendulum.pt --env InvertedPendulum-v5 --out bundles/tslstm --episodes 4 --calib-episodes 6
# history: benchmarks/gpu_history.py on bundles/{fs-hc,eb-hc,tf-hc} (issue 16's HalfCheetah history fixtures);
# jitter: benchmarks/gpu_jitter.py, batch 1, the default configuration and torch's graph, JITTER_REPEATS runs.
# ONNX Runtime GPU, gymnasium and MuJoCo come from ../shared/tools/ort-gpu-wheels.sh's parts, installed
# by benchmarks/gpu_env.sh when /tmp/ortparts is there (the stages that need them say so and skip otherwise).
set -uo pipefail
# gymnasium/MuJoCo alone (no onnxruntime-gpu): wheels copied to /tmp/extra
if [ -d /tmp/extra ] && [ ! -d /tmp/site/gymnasium ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site /tmp/extra/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
elif [ -d /tmp/site/gymnasium ]; then export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}; fi
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
if [ -d /tmp/ortparts ] && [ -f /tmp/ortextra/SHA256 ]; then
  source benchmarks/gpu_env.sh || echo "gpu_env.sh failed: no onnxruntime-gpu"
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} EDGEQ_GPU_REPORT=$OUT/gpu-report.jsonl EDGEQ_GPU_BUNDLE_HC=$PWD/bundles/halfcheetah
[ -e tests/fixtures/policies ] || { [ -d ../tests/fixtures/policies ] && ln -s "$(cd ../tests/fixtures/policies && pwd)" tests/fixtures/policies; }
for d in calibration export; do [ -e "$d" ] || { [ -d "../$d" ] && ln -s "$(cd ../$d && pwd)" "$d"; }; done
stages=${*:-tests bench}
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader
  python3 -c 'import sys, numpy, torch, onnxruntime as o; from importlib.metadata import version as v; print(sys.version.split()[0], "numpy", numpy.__version__, "torch", torch.__version__, "onnxruntime", o.__version__, o.get_available_providers(), "cuda-bindings", v("cuda-bindings"))'
  python3 -c 'from edgeq.deploy import cuda; print(cuda.available(), cuda.device_info())'; } 2>&1 | tee "$OUT/env.txt"
for stage in $stages; do
  case $stage in
  tests)   # the GPU tests that need no onnxruntime-gpu
    python3 -m pytest -q -p no:cacheprovider -rs tests/test_fused_mlp.py tests/test_trt_runner.py \
      tests/test_deploy_fused_hot_path.py tests/test_cli_typer_compat.py 2>&1 | tee "$OUT/pytest-fused.txt" | tail -25 ;;
  returns)   # CPU and CUDA int8 returns on the same file (gymnasium/MuJoCo wheels from /tmp/extra)
    python3 -m pytest -q -p no:cacheprovider -rs tests/test_gpu_returns.py 2>&1 | tee "$OUT/pytest-returns.txt" | tail -12 ;;
  ort-tests)   # with onnxruntime-gpu (and gymnasium/MuJoCo for the returns)
    python3 -m pytest -q -p no:cacheprovider -rs tests/test_ort_cuda_pinned.py tests/test_gpu_returns.py tests/test_cuda_target.py \
      tests/test_deploy_policy.py tests/test_fused_mlp.py tests/test_trt_runner.py tests/test_deploy_fused_hot_path.py \
      tests/test_cli_typer_compat.py 2>&1 | tee "$OUT/pytest-all.txt" | tail -30 ;;
  validate)   # the CLI end to end: cpu and cuda targets, the same verdict code (cuda: fused kernel on policy.int8.onnx)
    timeout 240 python3 -m edgeq.cli validate bundles/halfcheetah --targets cpu,cuda --episodes 10 --json \
      > "$OUT/validate-halfcheetah.json" 2> "$OUT/validate-halfcheetah.err"; echo "validate exit $?"
    python3 - "$OUT/validate-halfcheetah.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
for t, v in r["targets"].items():
    print(t, v.get("runtime"), v.get("int8_runtime"), v.get("int8_model"), "float", round(v["float"]["mean"], 1),
          "int8", round(v["int8"]["mean"], 1), "verdict", v["verdict"]["status"])
PY
    ;;
  history)
    args=(); for b in fs-hc eb-hc tf-hc; do [ -d "bundles/$b" ] && args+=("$b=bundles/$b"); done
    python3 benchmarks/gpu_history.py "${args[@]}" --calls 5000 --json "$OUT/history.json" 2>&1 | tee "$OUT/history.txt" | grep -av "^\[" ;;
  jitter)
    python3 benchmarks/gpu_jitter.py bundles/halfcheetah bundles/elu512 --calls 20000 --repeats "${JITTER_REPEATS:-1}" \
      --configs "native, spin (new default)" --json "$OUT/jitter-${JITTER_TAG:-0}.json" 2>&1 | grep -a "^\[" ;;
  rnn)   # the fused recurrent backend against ONNX Runtime's CPU: synthetic LSTM/GRU, batches 1..4096, full episodes
    EDGEQ_GPU_BUNDLE_RPPO=$PWD/bundles/rppo EDGEQ_GPU_BUNDLE_TSLSTM=$PWD/bundles/tslstm \
      python3 -m pytest -q -rs -s -p no:cacheprovider tests/test_fused_rnn.py 2>&1 | tee "$OUT/pytest-rnn.txt" | tail -25 ;;
  rnn-bench)
    python3 benchmarks/gpu_recurrent.py bundles/rppo="RecurrentPPO Pendulum LSTM 32" \
      bundles/tslstm="rsl_rl TorchScript LSTM 64 + ELU [64,64]" --batches 1 32 4096 \
      --json "$OUT/rnn-bench.json" 2>&1 | tee "$OUT/rnn-bench.txt" | grep -av "^\[" ;;
  bench)
    python3 benchmarks/gpu_backends.py bundles/halfcheetah="SAC HalfCheetah-v5 [256,256] ReLU (trained fixture)" \
      bundles/elu512="ELU [512,256,128] (random weights, torch module)" --batches 1 32 256 4096 \
      --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.txt" | grep -av "^\[" ;;
  esac
done
