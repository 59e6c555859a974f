"""Max absolute difference of keras_aim's AIMv2 models to Apple's outputs.

Loads the tiny reference models of `tests/fixtures/aimv2_tiny` (Apple's
code on tiny configs, with their exact state dicts) on the active Keras
backend and prints, per reference folder, the largest |keras_aim - Apple|
over each group of saved outputs.

    KERAS_BACKEND=jax python benchmarks/aimv2_parity.py
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "aimv2_tiny"


def _outputs(folder: str) -> dict:
    return {p.stem: np.load(p) for p in (FIXTURES / folder).glob("*.npy")}


def measure() -> list[tuple[str, str, float]]:
    import keras
    from keras import ops

    import keras_aim

    def diff(got, want) -> float:
        if isinstance(got, (list, tuple)):
            got = np.stack([ops.convert_to_numpy(g) for g in got])
        return float(np.abs(ops.convert_to_numpy(got) - want).max())

    vision = dict(patch_size=7, hidden_dim=48, num_heads=4, intermediate_dim=128)
    rows = []
    fixed = keras_aim.AIMv2Backbone(image_shape=(28, 28, 3), num_layers=3, **vision)
    keras_aim.load_aimv2_weights(fixed, str(FIXTURES / "fixed" / "model.safetensors"))
    ref = _outputs("fixed")
    rows += [("fixed", "final tokens", diff(fixed(ref["images_nhwc"]), ref["final_tokens"])),
             ("fixed", "every block output",
              diff(fixed.block_outputs(ref["images_nhwc"]), ref["block_outputs"]))]
    native = keras_aim.AIMv2Backbone(
        image_shape=(None, None, 3), num_layers=3, position_embedding="sincos", **vision
    )
    keras_aim.load_aimv2_weights(native, str(FIXTURES / "native" / "model.safetensors"))
    ref = _outputs("native")
    for size in "ab":
        images = ref[f"images_{size}_nhwc"]
        shape = "x".join(str(s) for s in images.shape[1:3])
        rows += [(f"native {shape}", "final tokens", diff(native(images), ref[f"final_tokens_{size}"])),
                 (f"native {shape}", "every block output",
                  diff(native.block_outputs(images), ref[f"block_outputs_{size}"]))]
    lit = keras_aim.AIMv2LiT(
        keras_aim.AIMv2Backbone(image_shape=(28, 28, 3), num_layers=2, **vision),
        keras_aim.AIMv2TextEncoder(vocabulary_size=64, sequence_length=12, hidden_dim=32,
                                   num_layers=2, num_heads=2, intermediate_dim=96,
                                   end_token_id=63),
        projection_dim=32,
    )
    keras_aim.load_aimv2_weights(lit, str(FIXTURES / "lit" / "model.safetensors"))
    ref = _outputs("lit")
    images, ids = ref["images_nhwc"], ref["input_ids"].astype("int32")
    rows += [
        ("lit", "image embeddings", diff(lit.encode_image(images), ref["image_embeds"])),
        ("lit", "text embeddings", diff(lit.encode_text(ids), ref["text_embeds"])),
        ("lit", "logits per image", diff(lit.similarity(images, ids)[0], ref["logits_per_image"])),
    ]
    return [(keras.config.backend(), *row) for row in rows]


def main() -> int:
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    print(f"{'backend':<12}{'reference':<16}{'outputs':<22}{'max |diff|':>11}")
    for backend, folder, what, value in measure():
        print(f"{backend:<12}{folder:<16}{what:<22}{value:>11.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
