#!/usr/bin/env bash
# The GPU run of issue 4 (CUDA target): returns on cpu and cuda, the GPU tests, the latency table.
# Runs on the GPU machine from the repository root, with this project's code copied to .gpu/ (code,
# benchmarks, tests, prebuilt bundles in .gpu/bundles) and ONNX Runtime GPU installed by gpu_env.sh.
#   bash .gpu/benchmarks/gpu_device.sh [returns] [tests] [latency] [breakdown]   (default: all four)
# Writes to $OUT: returns-<bundle>.json, pytest.txt, latency.json, latency.txt, breakdown.txt.
set -uo pipefail
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
ROOT=$PWD
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
source "$ROOT/.gpu/benchmarks/gpu_env.sh" || exit 1
export PYTHONPATH=$ROOT/.gpu:$PYTHONPATH
cd "$ROOT/.gpu"   # so that `python -m` finds this copy of edgeq first, not the checkout's
for d in calibration export; do [ -e "$d" ] || ln -s "$ROOT/$d" "$d"; done   # recipes and profiles
stages=${*:-returns tests latency breakdown}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c 'import onnxruntime as o, torch, gymnasium; print("onnxruntime", o.__version__, o.get_available_providers(), "torch", torch.__version__, "gymnasium", gymnasium.__version__)'
for stage in $stages; do
  case $stage in
  returns)
    for b in bundles/*/; do
      b=${b%/}; name=$(basename "$b")
      [ "$name" = elu512 ] && continue   # random weights: latency only
      echo "== edgeq validate $b --targets cpu,cuda --episodes 20"
      python3 -m edgeq.cli validate "$b" --targets cpu,cuda --episodes 20 --json > "$OUT/returns-$name.json" ||
        echo "validate $name failed"
      python3 - "$OUT/returns-$name.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
for t, v in r["targets"].items():
    f, q = v["float"]["mean"], v["int8"]["mean"]
    print(f"{r['env_id']:16s} {t:5s} {v.get('runtime', '?'):17s} float {f:9.2f}  int8 {q:9.2f}  "
          f"diff {100 * (q - f) / abs(f):+6.2f}%  graph={v.get('cuda_graph')}  "
          f"placement int8={v.get('placement', {}).get('int8', {}).get('by_provider')}")
PY
    done ;;
  tests)
    ln -sfn "$ROOT/tests/fixtures" tests/fixtures   # the trained fixtures travel with the checkout
    python3 -m pytest tests/test_cuda_target.py -q -p no:cacheprovider 2>&1 | tee "$OUT/pytest.txt" | tail -15 ;;
  latency)
    python3 benchmarks/gpu_latency.py run bundles/halfcheetah="SAC HalfCheetah-v5 [256,256] ReLU (trained)" \
      bundles/elu512="random-weight [512,256,128] ELU (latency only)" --batches 1 4096 \
      --json "$OUT/latency.json" 2>&1 | tee "$OUT/latency.txt" | grep -v '^\[' ;;
  breakdown)
    for b in halfcheetah elu512; do python3 benchmarks/gpu_ort_breakdown.py bundles/$b/policy.int8.cuda.onnx; done \
      2>&1 | grep -v "plugin EP" | tee "$OUT/breakdown.txt" ;;
  esac
done
