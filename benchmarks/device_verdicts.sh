#!/usr/bin/env bash
# Large fixed-N verdicts on the GPU host's CPUs (issue 12): the default bundles of the fixtures whose
# verdict 200 sequential episodes could not decide (falls, flips), validated on fresh seeds in chunks
# of explicit seeds (`edgeq validate --seeds A-B`, one look per chunk, nothing decided per chunk);
# benchmarks/merge_verdicts.py joins the chunks and gives the one fixed-N verdict (Student-t, one look at
# the pre-registered N) for each file. Runs from the repository root of the device copy, with the
# bundles in .devb/NAME and gymnasium/MuJoCo/onnxruntime wheels installed into /tmp/site (.whl1, .whl2).
#   bash benchmarks/device_verdicts.sh DEADLINE_S NAME:FIRST_SEED:LAST_SEED:CHUNK ...
# Writes $OUT/chunks.tgz (one validation.json per chunk) and $OUT/log.txt.
set -uo pipefail
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 PYTHONPATH=/tmp/site:$PWD
OUT=${OUT:-/tmp/dev-out}; mkdir -p "$OUT" /tmp/chunks
deadline=$1; shift
t0=$(date +%s); workers=$(nproc)
{ lscpu | grep -E "Model name|^CPU\(s\)"; echo "int8 dot-product flags: $(grep -o -w -E "avx512_vnni|avx_vnni|amx_int8|avx2" /proc/cpuinfo | sort -u | tr "\n" " ")"; python3 -c 'import sys, numpy, onnxruntime as o, gymnasium, mujoco; print(sys.version.split()[0], "numpy", numpy.__version__, "onnxruntime", o.__version__, "gymnasium", gymnasium.__version__, "mujoco", mujoco.__version__)'; } 2>&1 | tee "$OUT/log.txt"
for spec in "$@"; do
  IFS=: read -r name first last chunk <<< "$spec"
  for ((a = first; a <= last; a += chunk)); do
    b=$((a + chunk - 1)); ((b > last)) && b=$last
    left=$((deadline - ($(date +%s) - t0)))
    if ((left < 30)); then echo "deadline: stopped before $name $a-$b" | tee -a "$OUT/log.txt"; break 2; fi
    s=$(date +%s)
    timeout "$left" python3 -m edgeq.cli validate ".devb/$name" --targets cpu --seeds "$a-$b" --workers "$workers" \
      --floor-draws 0 --no-sensitivity --no-per-layer --latency-calls 0 --no-report --out "/tmp/chunks/$name-$a-$b" -q \
      > "/tmp/chunks/$name-$a-$b.log" 2>&1
    echo "$name $a-$b rc=$? $(( $(date +%s) - s )) s: $(tail -1 /tmp/chunks/$name-$a-$b.log)" | tee -a "$OUT/log.txt"
  done
done
(cd /tmp/chunks && tar czf "$OUT/chunks.tgz" .)
