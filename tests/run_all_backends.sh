#!/usr/bin/env bash
# Sets up keras_aim with its test dependencies, then runs the test suite once
# per Keras backend (JAX, TensorFlow, PyTorch) and the multi-device tests
# (JAX on 8 virtual CPU devices). This is the README's test command and what
# .ci/run calls. Extra arguments go to every pytest run (e.g. -x, -k NAME).
set -uo pipefail
cd "$(dirname "$0")/.."

# torch is pinned: an unpinned torch pulls a multi-GB CUDA build.
python3 -m pip install --quiet --disable-pip-version-check \
  -e ".[jax,test]" "torch==2.13.0" || exit 1

export TF_CPP_MIN_LOG_LEVEL=2
failed=()
for backend in jax tensorflow torch; do
  echo "=== KERAS_BACKEND=$backend"
  KERAS_BACKEND=$backend python3 -m pytest -q -m "not multi_device" "$@" \
    || failed+=("$backend")
done
echo "=== multi-device: KERAS_BACKEND=jax, 8 virtual CPU devices"
KERAS_BACKEND=jax XLA_FLAGS=--xla_force_host_platform_device_count=8 \
  python3 -m pytest -q -m multi_device "$@" || failed+=("multi-device")

if ((${#failed[@]})); then
  echo "FAILED: ${failed[*]}"
  exit 1
fi
echo "All test runs passed."
