"""The same weights give the same outputs under JAX, TensorFlow and PyTorch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import once_in_jax_pass

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ("jax", "tensorflow", "torch")

# Runs in a fresh interpreter per backend: loads the reference weights,
# computes outputs on the reference images and on a second, larger input.
SCRIPT = r"""
import sys, numpy as np, keras, keras_aim
from tests.conftest import fixture_path, make_tiny_classifier, to_numpy
classifier = make_tiny_classifier(image_shape=(None, None, 3))
keras_aim.load_official_weights(classifier, fixture_path("model.safetensors"))
images = np.load(fixture_path("images_nhwc.npy"))
larger = np.random.RandomState(0).randn(2, 48, 40, 3).astype("float32")
backbone = classifier.backbone
np.savez(
    sys.argv[1],
    logits=to_numpy(classifier(images)),
    tokens=to_numpy(backbone(images)),
    blocks=np.stack([to_numpy(b) for b in backbone.block_outputs(images)]),
    larger_tokens=to_numpy(backbone(larger)),
    larger_logits=to_numpy(classifier(larger)),
)
"""


@pytest.mark.slow
@once_in_jax_pass
def test_outputs_agree_across_backends(tmp_path):
    results = run_everywhere(SCRIPT, tmp_path)
    worst = worst_differences(results)
    assert max(worst.values()) <= 1e-5, json.dumps(worst, indent=1)


# One pre-training step from identical weights, images and prefix lengths.
STEP_SCRIPT = r"""
import sys, numpy as np, keras, keras_aim
from tests.conftest import fixture_path, make_tiny_backbone, to_numpy
backbone = make_tiny_backbone()
keras_aim.load_official_weights(backbone, fixture_path("backbone.pth"))
pretrainer = keras_aim.AIMPretrainer(backbone, pixel_head_width=32, pixel_head_depth=2)
rng = np.random.RandomState(0)
pretrainer.pixel_head.set_weights(
    [rng.randn(*w.shape).astype("float32") * 0.1 for w in pretrainer.pixel_head.weights]
)
prefix = np.load(fixture_path("loss_prefix_lengths.npy")).astype("int32")
pretrainer.prefix_sampler.call = lambda images, training=None: keras.ops.convert_to_tensor(prefix)
pretrainer.compile()
images = np.load(fixture_path("loss_images_nhwc.npy"))
history = pretrainer.fit(images, batch_size=3, epochs=1, shuffle=False, verbose=0)
weights = {v.path: to_numpy(v) for v in pretrainer.trainable_variables}
np.savez(sys.argv[1], loss=np.array(history.history["loss"][0]), **weights)
"""


def worst_differences(results) -> dict[str, float]:
    """Max |JAX - other| per saved array and other backend."""
    worst = {}
    for name in results["jax"]:
        for other in BACKENDS[1:]:
            assert name in results[other], f"{other} lacks {name}"
            diff = np.abs(results["jax"][name] - results[other][name]).max()
            worst[f"{name} jax-{other}"] = float(diff)
    return worst


def run_everywhere(script, tmp_path):
    results = {}
    for backend in BACKENDS:
        out = tmp_path / f"{backend}.npz"
        env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "2"}
        run = subprocess.run(
            [sys.executable, "-c", script, str(out)],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
        )
        assert run.returncode == 0, f"{backend}:\n{run.stderr[-3000:]}"
        results[backend] = dict(np.load(out))
    return results


@pytest.mark.slow
@once_in_jax_pass
def test_one_pretraining_step_agrees_across_backends(tmp_path):
    results = run_everywhere(STEP_SCRIPT, tmp_path)
    assert len(results["jax"]) > 40  # loss + every trainable variable
    worst = worst_differences(results)
    assert max(worst.values()) <= 1e-4, json.dumps(
        dict(sorted(worst.items(), key=lambda kv: -kv[1])[:10]), indent=1
    )
