"""Loading skips the random initial values it overwrites, and only then."""

from __future__ import annotations

import numpy as np

import keras_aim
from keras_aim.loading.lean_loading import variables_to_be_overwritten
from tests.conftest import TINY_CONFIG, make_tiny_backbone, to_numpy


def _values(model) -> dict:
    return {v.path: to_numpy(v) for v in model.weights}


def test_models_built_for_loading_start_from_zeros_and_others_do_not():
    with variables_to_be_overwritten():
        loading = make_tiny_backbone()
    zero_kernels = [v for v in loading.weights if "kernel" in v.path and not np.any(to_numpy(v))]
    # Every dense kernel is zero (the patch convolution sets its own).
    assert len(zero_kernels) == 4 * TINY_CONFIG["num_layers"]

    after = make_tiny_backbone()  # outside: random again (initializers restored)
    for variable in after.weights:
        if "kernel" in variable.path:
            assert np.std(to_numpy(variable)) > 0, variable.path


def test_from_preset_loads_every_saved_value(tmp_path):
    saved = make_tiny_backbone()
    saved.save_to_preset(str(tmp_path / "preset"))
    loaded = keras_aim.AIMBackbone.from_preset(str(tmp_path / "preset"))
    expected, got = _values(saved), _values(loaded)
    assert expected.keys() == got.keys()
    for path, value in expected.items():
        np.testing.assert_array_equal(got[path], value, err_msg=path)
    # Without weights, from_preset still gives a randomly initialized trunk.
    fresh = keras_aim.AIMBackbone.from_preset(str(tmp_path / "preset"), load_weights=False)
    assert np.std(to_numpy(fresh.blocks[0].mlp.fc1.kernel)) > 0
