#!/usr/bin/env bash
# The README's main job, set-up included: installs keras_aim (JAX backend by
# default; into .venv/ when no virtual environment is active), then
# pre-trains a tiny AIM on the embedded digits dataset, compares attentive
# probes of the pre-trained and a random trunk, and fine-tunes with LoRA.
# Arguments go to `python -m recipes.demo` (e.g. --seed 1, --steps 300).
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/python_env.sh
install_keras_aim ".[jax]"
export KERAS_BACKEND="${KERAS_BACKEND:-jax}"
exec "$PYTHON" -m recipes.demo --summary runs/demo/summary.json "$@"
