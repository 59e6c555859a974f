#!/usr/bin/env bash
# Sets up keras_aim with its test dependencies (into .venv/ when no virtual
# environment is active), checks the import rules, then runs the test suite
# once per Keras backend (JAX, TensorFlow, PyTorch) and the multi-device
# tests (JAX on 8 virtual CPU devices). This is the README's test command and
# what .ci/run calls. Extra arguments go to every pytest run (e.g. -x, -k NAME).
set -uo pipefail
cd "$(dirname "$0")/.."
source tools/python_env.sh
# torch is pinned: an unpinned torch pulls a multi-GB CUDA build.
install_keras_aim ".[jax,test]" "torch==2.13.0"

echo "=== import rules (lint-imports)"
"$PYTHON" -c "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())" \
  || { echo "FAILED: import rules"; exit 1; }

export TF_CPP_MIN_LOG_LEVEL=2
# JAX's persistent compilation cache, fresh for this run and removed after
# it: many tests and their subprocesses build the same tiny models, and each
# distinct program is then compiled once. A size limit turns on JAX's file
# lock, so parallel workers and processes share it safely.
JAX_COMPILATION_CACHE_DIR=$(mktemp -d -t keras_aim_jax_cache.XXXXXX)
trap 'rm -rf "$JAX_COMPILATION_CACHE_DIR"' EXIT
export JAX_COMPILATION_CACHE_DIR
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
export JAX_COMPILATION_CACHE_MAX_SIZE=$((4 * 1024 * 1024 * 1024))
# glibc writes fatal native errors to the terminal unless told otherwise.
export LIBC_FATAL_STDERR_=1

# One pass of the suite. A native crash (not a test failure) gets one more
# try: a pass killed by a signal (exit code >= 128) runs again; when a test
# worker died (pytest-xdist: "node down"; its test is reported failed and
# the rest of its tests were never run), everything that did not pass or
# skip runs once more (--skip-finished, see tests/finished_tests.py). Test
# failures alone are not retried.
run_pass() {
  local name=$1; shift
  local log
  log=$(mktemp)
  "$@" 2>&1 | tee "$log"
  local code=${PIPESTATUS[0]}
  if ((code >= 128)); then
    echo "WARNING: the $name pass died from signal $((code - 128)) (a native" \
         "crash, not a test failure); running it once more"
    "$@"
    code=$?
  elif ((code != 0)) && grep -q "node down" "$log"; then
    echo "WARNING: a test worker of the $name pass died (a native crash, not" \
         "a test failure: $(grep -o "crashed while running '[^']*'" "$log" | head -3));" \
         "running every test that did not finish once more"
    "$@" --skip-finished
    code=$?
  fi
  rm -f "$log"
  return $code
}

# One pytest worker per CPU core (pytest-xdist), whole files per worker:
# most tests are single-threaded, so this nearly halves the time on 2 cores.
# Files go out in collection order, the longest first (tests/conftest.py;
# pytest-xdist would otherwise start the files with the most tests first,
# and the few long ones ran last, alone). A crashed worker is not replaced:
# pytest-xdist 3.8 can wait forever for the replacement under --dist
# loadfile; run_pass runs the rest instead.
WORKERS=(-n "${KERAS_AIM_TEST_WORKERS:-auto}" --dist loadfile --no-loadscope-reorder
         --max-worker-restart=0)
failed=()
for backend in jax tensorflow torch; do
  echo "=== KERAS_BACKEND=$backend"
  KERAS_BACKEND=$backend run_pass "$backend" \
    "$PYTHON" -m pytest -q -m "not multi_device" "${WORKERS[@]}" --durations=15 "$@" \
    || failed+=("$backend")
done
echo "=== multi-device: KERAS_BACKEND=jax, 8 virtual CPU devices"
KERAS_BACKEND=jax XLA_FLAGS=--xla_force_host_platform_device_count=8 \
  run_pass multi-device "$PYTHON" -m pytest -q -m multi_device "${WORKERS[@]}" --durations=5 "$@" \
  || failed+=("multi-device")

if ((${#failed[@]})); then
  echo "FAILED: ${failed[*]}"
  exit 1
fi
echo "All test runs passed."
