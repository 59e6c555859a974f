#!/usr/bin/env bash
# The README's main job, set-up included: installs keras_aim (JAX backend by
# default), then pre-trains a tiny AIM on the embedded digits dataset and
# compares attentive probes of the pre-trained and a random trunk.
# Arguments go to recipes/demo.py (e.g. --seed 1, --steps 300).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check -e ".[jax]"
export KERAS_BACKEND="${KERAS_BACKEND:-jax}" TF_CPP_MIN_LOG_LEVEL=2
exec python3 recipes/demo.py --summary runs/demo/summary.json "$@"
