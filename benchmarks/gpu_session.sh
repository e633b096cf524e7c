#!/usr/bin/env bash
# A GPU session's checks, for a machine lent for a short time. Run from the repository root on
# a machine with a CUDA GPU and torch, torchvision and triton installed (the checkout is put on
# PYTHONPATH; nothing is installed but the carried wheels):
#
#   bash benchmarks/gpu_session.sh all OUT_DIR            # THE command: every stage below, in order,
#                                                         # each under its own time limit; <= 8 min on
#                                                         # one H200 (16 cores); at most 8 files in OUT_DIR
#   bash benchmarks/gpu_session.sh all OUT_DIR --dry-run  # the same stages and files on the CPU: the
#                                                         # interpreter, quick sizes (CI runs this)
#   bash benchmarks/gpu_session.sh wheels                 # beforehand, on a machine with pip access: the
#                                                         # GPU machine's missing packages into .whl/
#   bash benchmarks/gpu_session.sh bench OUT_DIR [OP...]  # the benchmarks alone (or some), no time limit
#
# Stages of `all`: env (versions, GPU name), kernels (the CUDA case of every kernel test: each
# kernel variant the model launches, compiled, workers spread over the cores), model (the
# model-level parity on CUDA: triton backend against torch backend, same weights), bench (every
# benchmark at the full sizes, each with a time budget; the JSON is rewritten after each),
# cubins (registers and spills of every kernel variant the run compiled). A stage that fails
# or runs out of time does not stop the next. The last line printed (and of OUT/session.txt)
# is the summary: tests passed and failed, benchmarks finished.
#
# Files written by `all` (the lease returns at most 8): session.txt (versions, GPU, each stage's
# exit status and seconds, the kernels' registers, the summary), kernels.txt / kernels.xml and model.txt / model.xml
# (pytest's log and JUnit XML), bench.txt (the runner's log), bench.json and bench.md (results).
#
# The GPU machine has no network and lacks pycocotools, which the training and data modules
# (and their tests) import: `wheels` fetches it for that machine's Python (3.12), the GPU call
# carries `.whl`, and the other stages install it from there.
set -uo pipefail
usage="usage: gpu_session.sh all OUT_DIR [--dry-run] | wheels | bench OUT_DIR [OP...]"
stage=${1:?$usage}
if [ "$stage" = wheels ]; then
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl pycocotools==2.0.11
  exit $?
fi
out=${2:?$usage}
shift 2
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# The Python that has torch, triton and torchvision: $PYTHON if set (the tests set it), else python3.
py=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

# pytest options that exist only with their plugin installed: workers across the cores
# (pytest-xdist) and a per-test time limit (pytest-timeout), so that one hung test cannot use
# up its stage's limit.
pytest_extras() {  # WORKERS PER_TEST_S
  "$py" -c "import xdist" 2>/dev/null && [ "$1" -gt 1 ] && printf '%s\n' -n "$1"
  "$py" -c "import pytest_timeout" 2>/dev/null && printf '%s\n' "--timeout=$2"
}

versions() {  # fails if torch, triton or torchvision cannot be imported
  local rc
  "$py" - <<'PY'
import platform, torch, triton, torchvision
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA GPU"
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"triton {triton.__version__}, torchvision {torchvision.__version__}; {gpu}")
PY
  rc=$?
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null
  return $rc
}

case "$stage" in
  all) ;;
  bench)
    versions > "$out/versions.txt" 2>&1
    only=()
    for op in "$@"; do only+=(--only "$op"); done
    "$py" -m benchmarks.run --device cuda --out "$out" ${only[@]+"${only[@]}"} 2>&1 | tee "$out/bench.txt"
    exit "${PIPESTATUS[0]}"
    ;;
  *)
    echo "unknown stage $stage; $usage" >&2
    exit 2
    ;;
esac

# ---- all --------------------------------------------------------------------------------
dry=0
if [ "${1:-}" = --dry-run ]; then dry=1; shift; fi
[ $# -eq 0 ] || { echo "unexpected arguments: $*; $usage" >&2; exit 2; }
# Kernel tests: on the GPU the CUDA case of every test (the `cuda` marker or a cuda device
# parameter); in the dry run the interpreter's CPU cases of the kernel files' parity tests.
kernel_files=(tests/test_roi_align.py tests/test_nms.py tests/test_boxes.py tests/test_masks.py
              tests/test_proposals.py tests/test_model_postprocess.py tests/test_anchors.py)
if [ $dry = 1 ]; then
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
  mode="dry run (CPU, Triton's interpreter, quick sizes)"
  # The parity tests only: the suite itself runs every interpreter case; this proves the stage.
  kernels_sel=("${kernel_files[@]}" -k "cpu and not torch and matches" -m "not model")
  model_sel=(tests/test_model_backends.py -m model -k cpu)
  # Generous limits: the quick sizes take ~45 s in all on two free cores, and CI's may be busy.
  bench_args=(--device cpu --quick --budget 90 --budget model=180)
  workers=2
  limit_env=60 limit_kernels=180 limit_model=120 limit_bench=360 limit_cubins=30
else
  mode="GPU"
  kernels_sel=(tests -k cuda -m "not model")
  model_sel=(tests -m "model and cuda")
  # Per-benchmark budgets (seconds) within the stage's limit. The first H200 run took 42 s
  # (roi_align), 24 (nms), 3 (proposals), 6 (mask_paste); model was cut at 85 s and then lost
  # its slowest cases (the torch backend, now timed once).
  bench_args=(--device cuda --budget roi_align=50 --budget nms=35 --budget proposals=15 --budget mask_paste=15
              --budget model=115)
  workers=16
  # 30 + 120 + 75 + 220 + 20 = 465 s: the whole command stays under 8 minutes (run 4 took
  # 11, 48, 20 and 127 s for the first four; the model stage has since gained the static
  # path's CUDA tests, a sync check and two CUDA graph captures, hence 75 s, not 60).
  limit_env=30 limit_kernels=120 limit_model=75 limit_bench=220 limit_cubins=20
fi
# A cache of its own: every kernel is compiled in this run (its time counts in the stages),
# and the cubins stage reports exactly the variants this run compiled.
TRITON_CACHE_DIR=$(mktemp -d -t fastmask-triton-XXXXXX)
export TRITON_CACHE_DIR
session="$out/session.txt"
: > "$session"
t_all=$(date +%s)
say() { echo "$*" | tee -a "$session"; }

# run_stage NAME LIMIT_S LOG CMD...: CMD under a wall-clock limit, its output to LOG and the
# console; LOG "-" appends the output to session.txt after the stage's closing line instead
# (the lease returns at most 8 files). At the limit CMD gets SIGINT (pytest then still writes
# its XML and summary), and SIGKILL 15 s later.
run_stage() {
  local name=$1 limit=$2 log=$3 t0 rc note=""
  shift 3
  [ "$log" = - ] && log="$out/.$name.log"
  t0=$(date +%s)
  say "== $name (limit ${limit} s, started $(date -u +%H:%M:%S))"
  timeout -s INT -k 15 "$limit" "$@" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  case $rc in 124|137) note=", OUT OF TIME";; esac
  say "   $name: exit $rc, $(( $(date +%s) - t0 )) s$note"
  if [ "$log" = "$out/.$name.log" ]; then
    cat "$log" >> "$session"
    rm -f "$log"
  fi
}

# The commit, for the record: FASTMASK_COMMIT where the checkout was copied without its history.
FASTMASK_COMMIT=${FASTMASK_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
export FASTMASK_COMMIT
say "# gpu_session.sh all: $mode; $(date -u +%Y-%m-%dT%H:%M:%SZ); commit $FASTMASK_COMMIT"
run_stage env "$limit_env" - env py="$py" bash -c "$(declare -f versions); versions"

mapfile -t extra < <(pytest_extras "$workers" 120)
run_stage kernels "$limit_kernels" "$out/kernels.txt" \
  "$py" -m pytest "${kernels_sel[@]}" -v -p no:cacheprovider --continue-on-collection-errors \
  ${extra[@]+"${extra[@]}"} --junitxml="$out/kernels.xml"

mapfile -t extra < <(pytest_extras 1 "$limit_model")
run_stage model "$limit_model" "$out/model.txt" \
  "$py" -m pytest "${model_sel[@]}" -v -p no:cacheprovider ${extra[@]+"${extra[@]}"} --junitxml="$out/model.xml"

run_stage bench "$limit_bench" "$out/bench.txt" \
  "$py" -m benchmarks.run "${bench_args[@]}" --out "$out" --name bench --no-chart

run_stage cubins "$limit_cubins" - "$py" -m benchmarks.kernel_resources "$TRITON_CACHE_DIR"

"$py" -m benchmarks.session_summary "$out" --seconds "$(( $(date +%s) - t_all ))" | tee -a "$session"
exit "${PIPESTATUS[0]}"
