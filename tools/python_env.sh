# Sourced by the README's two set-up commands (recipes/run_demo.sh,
# tests/run_all_backends.sh): chooses the Python to install keras_aim into.
#
# An active virtual environment (or a non-base conda environment) is used
# as it is. Otherwise keras_aim never installs into the system Python (which
# may be externally managed, PEP 668): it creates .venv/ in the repository
# once and uses it, and says so.

if [[ -n "${VIRTUAL_ENV:-}" ]] || [[ -n "${CONDA_PREFIX:-}" && "${CONDA_DEFAULT_ENV:-base}" != "base" ]]; then
  PYTHON=python3
else
  if [[ ! -x .venv/bin/python ]]; then
    echo "keras_aim: no virtual environment is active; creating one in .venv/" >&2
    if ! python3 -m venv .venv; then
      echo "error: could not create .venv/ (on Debian/Ubuntu: apt install python3-venv)," \
           "or activate a virtual environment of your own and run this again" >&2
      exit 1
    fi
  fi
  echo "keras_aim: using the virtual environment .venv/ (source .venv/bin/activate to use it yourself)" >&2
  PYTHON="$PWD/.venv/bin/python"
fi
export PYTHON

# install_keras_aim SPEC...: pip-installs keras_aim in editable mode with the
# given extras (e.g. ".[jax]"), quietly. torch is pinned: an unpinned torch
# pulls a multi-GB CUDA build.
install_keras_aim() {
  "$PYTHON" -m pip install --quiet --disable-pip-version-check -e "$@" || exit 1
}
