"""The same weights give the same outputs under JAX, TensorFlow and PyTorch:
AIM's outputs, one AIM pre-training step, and AIMv2's (fixed, native, LiT)
outputs. One fresh interpreter per backend computes all three parts (a
backend's start-up is most of the cost); each test compares one part."""

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

# Each part writes its arrays to OUT. AIM: the reference weights on the
# reference images and on a second, larger input.
AIM_OUTPUTS = r"""
import numpy as np, keras_aim
from tests.conftest import fixture_path, make_tiny_classifier, to_numpy
classifier = make_tiny_classifier(image_shape=(None, None, 3))
keras_aim.load_official_weights(classifier, fixture_path("model.safetensors"))
images = np.load(fixture_path("images_nhwc.npy"))
larger = np.random.RandomState(0).randn(2, 48, 40, 3).astype("float32")
backbone = classifier.backbone
np.savez(
    OUT,
    logits=to_numpy(classifier(images)),
    tokens=to_numpy(backbone(images)),
    blocks=np.stack([to_numpy(b) for b in backbone.block_outputs(images)]),
    larger_tokens=to_numpy(backbone(larger)),
    larger_logits=to_numpy(classifier(larger)),
)
"""

# One pre-training step from identical weights, images and prefix lengths.
AIM_STEP = r"""
import numpy as np, keras, keras_aim
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
np.savez(OUT, loss=np.array(history.history["loss"][0]), **weights)
"""

# AIMv2: the fixed-resolution and native trunks and the LiT model.
AIMV2_OUTPUTS = r"""
import numpy as np
from tests import aimv2_tiny
from tests.conftest import to_numpy
fixed, native, lit = aimv2_tiny.fixed_backbone(), aimv2_tiny.native_backbone(), aimv2_tiny.lit_model()
f, n, l = (aimv2_tiny.outputs(k) for k in ("fixed", "native", "lit"))
ids = l["input_ids"].astype("int32")
np.savez(
    OUT,
    fixed=to_numpy(fixed(f["images_nhwc"])),
    fixed_blocks=np.stack([to_numpy(b) for b in fixed.block_outputs(f["images_nhwc"])]),
    native_a=to_numpy(native(n["images_a_nhwc"])),
    native_b=to_numpy(native(n["images_b_nhwc"])),
    image_embeds=to_numpy(lit.encode_image(l["images_nhwc"])),
    text_embeds=to_numpy(lit.encode_text(ids)),
    logits=to_numpy(lit.similarity(l["images_nhwc"], ids)[0]),
)
"""

PARTS = {"aim_outputs": AIM_OUTPUTS, "aim_step": AIM_STEP, "aimv2_outputs": AIMV2_OUTPUTS}

# Runs every part in its own namespace; a failing part is reported and the
# others still run.
DRIVER = r"""
import json, sys, traceback
parts, out_dir = json.load(open(sys.argv[1])), sys.argv[2]
failed = False
for name, code in parts.items():
    try:
        exec(compile(code, name, "exec"), {"__name__": name, "OUT": f"{out_dir}/{name}.npz"})
    except Exception:
        failed = True
        print(f"part {name} failed:", file=sys.stderr)
        traceback.print_exc()
sys.exit(1 if failed else 0)
"""


def run_everywhere(parts: dict[str, str], tmp_path: Path) -> dict[str, dict]:
    """Runs the `parts` in one fresh interpreter per backend; returns
    {part: {backend: {array name: array}}} (a part that failed on a
    backend has no arrays there)."""
    (tmp_path / "parts.json").write_text(json.dumps(parts))
    results = {name: {} for name in parts}
    errors = {}
    for backend in BACKENDS:
        out = tmp_path / backend
        out.mkdir()
        env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "2"}
        run = subprocess.run(
            [sys.executable, "-c", DRIVER, str(tmp_path / "parts.json"), str(out)],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
        )
        if run.returncode:
            errors[backend] = run.stderr[-3000:]
        for name in parts:
            if (out / f"{name}.npz").exists():
                results[name][backend] = dict(np.load(out / f"{name}.npz"))
    return {"results": results, "errors": errors}


@pytest.fixture(scope="module")
def everywhere(tmp_path_factory):
    return run_everywhere(PARTS, tmp_path_factory.mktemp("cross_backend"))


def worst_differences(everywhere, part: str) -> dict[str, float]:
    """Max |JAX - other| per saved array of `part` and other backend."""
    results = everywhere["results"][part]
    missing = [b for b in BACKENDS if b not in results]
    assert not missing, f"{part} failed on {missing}:\n" + "\n".join(
        everywhere["errors"].get(b, "") for b in missing)
    worst = {}
    for name in results["jax"]:
        for other in BACKENDS[1:]:
            assert name in results[other], f"{other} lacks {name}"
            diff = np.abs(results["jax"][name] - results[other][name]).max()
            worst[f"{name} jax-{other}"] = float(diff)
    return worst


@pytest.mark.slow
@once_in_jax_pass
def test_outputs_agree_across_backends(everywhere):
    worst = worst_differences(everywhere, "aim_outputs")
    assert max(worst.values()) <= 1e-5, json.dumps(worst, indent=1)


@pytest.mark.slow
@once_in_jax_pass
def test_one_pretraining_step_agrees_across_backends(everywhere):
    worst = worst_differences(everywhere, "aim_step")
    assert len(worst) > 2 * 40  # loss + every trainable variable, two backends
    assert max(worst.values()) <= 1e-4, json.dumps(
        dict(sorted(worst.items(), key=lambda kv: -kv[1])[:10]), indent=1
    )


@pytest.mark.slow
@once_in_jax_pass
def test_aimv2_outputs_agree_across_backends(everywhere):
    worst = worst_differences(everywhere, "aimv2_outputs")
    assert max(worst.values()) <= 1e-5, json.dumps(worst, indent=1)
