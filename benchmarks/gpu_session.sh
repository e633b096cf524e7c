#!/usr/bin/env bash
# One GPU session's checks, in the order that matters: the CUDA tests of every kernel, then
# the benchmarks. Run from the repository root on a machine with a CUDA GPU, with torch,
# torchvision and triton already installed (the checkout is put on PYTHONPATH):
#
#   bash benchmarks/gpu_session.sh tests OUT_DIR          # CUDA-marked tests -> OUT_DIR/cuda-tests.{xml,txt}
#   bash benchmarks/gpu_session.sh bench OUT_DIR [OP...]  # python -m benchmarks.run [--only OP] --out OUT_DIR
#
# Each stage fits in a ten-minute window; results land under OUT_DIR and are then committed
# under benchmarks/results/.
set -uo pipefail
stage=${1:?usage: gpu_session.sh tests|bench OUT_DIR [OP...]}
out=${2:?usage: gpu_session.sh tests|bench OUT_DIR [OP...]}
shift 2
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv > "$out/gpu.csv" 2>&1 || true
python - > "$out/versions.txt" 2>&1 <<'PY'
import torch, triton, torchvision
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__,
      "torchvision", torchvision.__version__, "device", torch.cuda.get_device_name())
PY
case "$stage" in
  tests)
    python -m pytest -m cuda tests -q -rfEs --junitxml="$out/cuda-tests.xml" 2>&1 | tee "$out/cuda-tests.txt"
    exit "${PIPESTATUS[0]}"
    ;;
  bench)
    only=()
    for op in "$@"; do only+=(--only "$op"); done
    python -m benchmarks.run --device cuda --out "$out" ${only[@]+"${only[@]}"} 2>&1 | tee "$out/bench.txt"
    exit "${PIPESTATUS[0]}"
    ;;
  *)
    echo "unknown stage $stage (tests or bench)" >&2
    exit 2
    ;;
esac
