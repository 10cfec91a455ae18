# Sourced on the GPU machine, from the repository root, after every part of the onnxruntime-gpu wheel was
# copied to /tmp/ortparts and the wheels of ../shared/tools/ort-gpu-wheels.sh's extra.d (and its SHA256)
# to /tmp/ortextra (see benchmarks/results/gpu.md for the calls). Installs once into /tmp/site, then sets
# PYTHONPATH and LD_LIBRARY_PATH (the CUDA libraries of the machine's nvidia-* Python packages), as
# extra.d/activate.sh does.
if [ ! -d /tmp/site/onnxruntime ]; then
  name=$(awk '{print $2}' /tmp/ortextra/SHA256)
  cat /tmp/ortparts/part-* > "/tmp/$name" &&
  (cd /tmp && awk '{print $1"  /tmp/"$2}' /tmp/ortextra/SHA256 | sha256sum -c) &&
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    "/tmp/$name" /tmp/ortextra/*.whl || { echo "gpu_env.sh: install failed" >&2; return 1; }
fi
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export LD_LIBRARY_PATH=$(python3 -c '
import os, nvidia
roots = [os.path.join(p, d, "lib") for p in nvidia.__path__ for d in os.listdir(p)]
print(":".join(r for r in roots if os.path.isdir(r)))')${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
