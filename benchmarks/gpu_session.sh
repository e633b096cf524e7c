#!/usr/bin/env bash
# One GPU session's checks, in the order that matters: the CUDA tests of every kernel, then
# the benchmarks. Run from the repository root on a machine with a CUDA GPU, with torch,
# torchvision and triton already installed (the checkout is put on PYTHONPATH):
#
#   bash benchmarks/gpu_session.sh wheels                 # beforehand, on a machine with pip access:
#                                                         # the missing packages' wheels into .whl/
#   bash benchmarks/gpu_session.sh tests OUT_DIR          # CUDA-marked tests -> OUT_DIR/cuda-tests.{xml,txt}
#   bash benchmarks/gpu_session.sh matrix OUT_DIR         # the CPU suite's kernel matrix on CUDA (test ids
#                                                         # with a cuda device) -> OUT_DIR/matrix-tests.*
#   bash benchmarks/gpu_session.sh bench OUT_DIR [OP...]  # python -m benchmarks.run [--only OP] --out OUT_DIR
#
# The GPU machine has no network and lacks pycocotools, which the training and data modules
# (and their tests) import: `wheels` fetches it for that machine's Python (3.12), the GPU call
# carries `.whl`, and the other stages install it from there. Each of those stages fits in a
# ten-minute window; results land under OUT_DIR and are then committed under
# benchmarks/results/.
set -uo pipefail
stage=${1:?usage: gpu_session.sh wheels | tests|matrix|bench OUT_DIR [OP...]}
if [ "$stage" = wheels ]; then
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl pycocotools==2.0.11
  exit $?
fi
out=${2:?usage: gpu_session.sh tests|matrix|bench OUT_DIR [OP...]}
shift 2
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv > "$out/gpu.csv" 2>&1 || true
python3 - > "$out/versions.txt" 2>&1 <<'PY'
import torch, triton, torchvision
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__,
      "torchvision", torchvision.__version__, "device", torch.cuda.get_device_name())
PY
case "$stage" in
  tests)
    # A module that cannot be imported there must not stop the CUDA tests of the others.
    python3 -m pytest -m cuda tests -q -rfEs --continue-on-collection-errors --junitxml="$out/cuda-tests.xml" \
      2>&1 | tee "$out/cuda-tests.txt"
    exit "${PIPESTATUS[0]}"
    ;;
  matrix)
    # Every test parametrized over TRITON_DEVICES runs its CUDA case here (the CPU cases need
    # the interpreter, which is off): the full dtype / layout / edge-case matrix, compiled.
    # Compiling its many kernel variants is the slow part, so it is spread over processes.
    workers=()
    python3 -c "import xdist" 2>/dev/null && workers=(-n 8)
    python3 -m pytest tests -m "not cuda" -k cuda -q -rfEs --continue-on-collection-errors ${workers[@]+"${workers[@]}"} \
      --junitxml="$out/matrix-tests.xml" 2>&1 | tee "$out/matrix-tests.txt"
    exit "${PIPESTATUS[0]}"
    ;;
  bench)
    only=()
    for op in "$@"; do only+=(--only "$op"); done
    python3 -m benchmarks.run --device cuda --out "$out" ${only[@]+"${only[@]}"} 2>&1 | tee "$out/bench.txt"
    exit "${PIPESTATUS[0]}"
    ;;
  *)
    echo "unknown stage $stage (wheels, tests, matrix or bench)" >&2
    exit 2
    ;;
esac
