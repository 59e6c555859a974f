"""The package as a whole: every module imports on its own, `import
keras_aim` loads no framework and reaches every public name, the command
line starts without a framework, and old module paths still work. (The
import rules are checked by `lint-imports` in the test command.)"""

import json
import os
import pkgutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import keras_aim
from tests.conftest import once_in_jax_pass

ROOT = Path(__file__).resolve().parents[1]
FRAMEWORKS = ("keras", "tensorflow", "jax", "torch", "keras_hub")


def run_python(code: str, *args, env=None) -> subprocess.CompletedProcess:
    environment = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=environment,
                          capture_output=True, text=True, timeout=600)


def all_modules() -> list[str]:
    return sorted(
        info.name for info in pkgutil.walk_packages(keras_aim.__path__, "keras_aim.")
    )


@once_in_jax_pass
def test_every_module_imports_in_a_fresh_process():
    script = (
        "import importlib, json, sys\n"
        "failed = {}\n"
        "for name in json.loads(sys.argv[1]):\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as error:\n"
        "        failed[name] = repr(error)\n"
        "print(json.dumps(failed))\n"
    )
    modules = all_modules()
    assert len(modules) > 30 and "keras_aim.models.aim.aim_backbone" in modules
    run = run_python(script, json.dumps(modules))
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout.splitlines()[-1]) == {}


def test_import_keras_aim_loads_no_framework():
    run = run_python(
        "import sys, json, keras_aim; "
        f"print(json.dumps([m for m in {FRAMEWORKS!r} if m in sys.modules]))"
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout) == []


@pytest.mark.parametrize("argv", [["--help"], ["info"], ["download", "--help"],
                                  ["prepare-data", "--help"]])
def test_cli_starts_without_frameworks_and_prints_no_noise(argv):
    code = (
        "import sys, json\n"
        "from keras_aim import cli\n"
        "try:\n"
        "    cli.main(sys.argv[1:])\n"
        "except SystemExit:\n"
        "    pass\n"
        f"print(json.dumps([m for m in {FRAMEWORKS!r} if m in sys.modules]), file=sys.stderr)\n"
    )
    run = run_python(code, *argv)
    assert run.returncode == 0, run.stderr[-3000:]
    *noise, loaded = run.stderr.strip().splitlines()
    assert json.loads(loaded) == [] and noise == []
    assert "keras-aim" in run.stdout or "aim_600m" in run.stdout


def test_public_names_and_subpackages_are_attributes():
    for name in keras_aim.__all__:
        assert getattr(keras_aim, name) is not None, name
    assert callable(keras_aim.export.export_saved_model)
    assert callable(keras_aim.distribution.layout_map)
    assert callable(keras_aim.losses.next_patch_pixel_loss)
    assert keras_aim.models.aim.AIMBackbone is keras_aim.AIMBackbone
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        keras_aim.nonexistent  # noqa: B018


def test_old_module_paths_still_import_with_a_deprecation_warning():
    for old, new in keras_aim.MOVED_MODULES.items():
        sys.modules.pop(old, None)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            module = __import__(old, fromlist=["_"])
        assert module.__name__ == new
        assert any(issubclass(w.category, DeprecationWarning) for w in caught), old
    from keras_aim.lora import fit_lora  # the README's form of earlier versions

    assert fit_lora is keras_aim.training.lora.fit_lora


@once_in_jax_pass
def test_saved_model_loads_when_keras_comes_after_keras_aim(tmp_path):
    import keras

    model = keras_aim.AIMBackbone(
        image_shape=(16, 16, 3), patch_size=8, hidden_dim=16, num_layers=1, num_heads=2
    )
    path = str(tmp_path / "trunk.keras")
    model.save(path)
    run = run_python(
        "import sys, keras_aim, keras; "
        "print(type(keras.saving.load_model(sys.argv[1])).__name__)",
        path, env={"KERAS_BACKEND": keras.config.backend()},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().splitlines()[-1] == "AIMBackbone"


@once_in_jax_pass
def test_quiet_frameworks_keeps_tensorflows_start_up_lines_off_stderr():
    """TensorFlow writes its C++ start-up lines (oneDNN, CUDA drivers)
    before it reads TF_CPP_MIN_LOG_LEVEL; quiet_frameworks silences the
    descriptor for the import. Without it the same import is not silent
    (the control), and with --verbose nothing is hidden."""
    code = (
        "import sys\n"
        "from keras_aim.utils.quiet import quiet_frameworks\n"
        "if sys.argv[1] == 'quiet': quiet_frameworks()\n"
        "import tensorflow as tf\n"
        "print(float(tf.constant(1.0) + 1))\n"
    )
    # As a user starts it: no log level chosen (the test suite sets one).
    environment = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    quiet = subprocess.run([sys.executable, "-c", code, "quiet"], cwd=ROOT, env=environment,
                           capture_output=True, text=True, timeout=600)
    assert quiet.returncode == 0 and quiet.stdout.strip() == "2.0", quiet.stderr[-3000:]
    assert quiet.stderr == ""
    loud = run_python(code, "loud", env={"TF_CPP_MIN_LOG_LEVEL": "3"})
    assert loud.returncode == 0 and loud.stderr.strip(), "TensorFlow printed nothing at all"


@once_in_jax_pass
@pytest.mark.parametrize("first,second", [("keras_aim", "keras_hub"),
                                          ("keras_aim", "keras"),
                                          ("keras_hub", "keras_aim")])
def test_classes_are_registered_whichever_is_imported_first(first, second):
    run = run_python(
        f"import {first}, {second}, keras\n"
        "names = ['keras_aim>AIMBackbone', 'keras_aim>AIMv2LiT']\n"
        "print(all(keras.saving.get_registered_object(n) for n in names))\n",
        env={"PYTHONWARNINGS": "error::RuntimeWarning", "KERAS_BACKEND": "jax"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().splitlines()[-1] == "True"
