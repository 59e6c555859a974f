"""Runs exported SavedModels with TensorFlow alone, as TF Serving does
(tests/test_export.py). This process never imports keras, keras_hub,
keras_aim or tf_keras itself; `import tensorflow` (2.21) loads keras on its
own, so the check is that loading and serving import no further module of
those packages.

    python tests/serve_without_keras.py INPUTS.npz OUTPUTS.npz DIR...

INPUTS.npz holds uint8 batches `(B, H, W, 3)`. For every model DIR and
batch i it writes `m{index}/{signature}/{i}/{output}`: `serving_default` on
the batch, `predict_images` on the same images PNG-encoded. It then sends a
corrupt image to `predict_images`, records the error class and checks the
next request still works.
"""

import sys

import numpy as np
import tensorflow as tf

KERAS_PACKAGES = ("keras", "keras_hub", "keras_aim", "tf_keras")


def keras_modules() -> set:
    return {name for name in sys.modules if name.split(".")[0] in KERAS_PACKAGES}


LOADED_BY_TENSORFLOW = keras_modules()


def main(inputs_file: str, outputs_file: str, *model_dirs: str) -> None:
    batches = [array for _, array in sorted(np.load(inputs_file).items())]
    results = {}
    for m, model_dir in enumerate(model_dirs):
        model = tf.saved_model.load(model_dir)
        serve = model.signatures["serving_default"]
        predict_images = model.signatures["predict_images"]
        for i, batch in enumerate(batches):
            encoded = tf.stack([tf.io.encode_png(image) for image in batch])
            for name, outputs in (
                ("serving_default", serve(images=tf.constant(batch))),
                ("predict_images", predict_images(image_bytes=encoded)),
            ):
                for key, value in outputs.items():
                    results[f"m{m}/{name}/{i}/{key}"] = value.numpy()
        good = tf.io.encode_png(batches[0][0])
        try:
            predict_images(image_bytes=tf.stack([good, tf.constant(b"\x89PNG broken")]))
            results[f"m{m}/corrupt_error"] = np.array("none")
        except tf.errors.OpError as error:
            results[f"m{m}/corrupt_error"] = np.array(type(error).__name__)
        after = predict_images(image_bytes=tf.stack([good]))
        results[f"m{m}/after_corrupt"] = next(iter(after.values())).numpy()
    imported = keras_modules() - LOADED_BY_TENSORFLOW
    imported |= {name for name in KERAS_PACKAGES[1:] if name in sys.modules}
    results["imported"] = np.array(",".join(sorted(imported)))
    np.savez(outputs_file, **results)


if __name__ == "__main__":
    main(*sys.argv[1:])
