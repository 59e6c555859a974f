"""Time and size of exporting a full-size AIM as a TF Serving SavedModel.

Builds `aim_600m` (classifier: trunk + 1000-class attentive probe on the
best blocks, the evaluation preprocessing) with random weights, no
download, then in a fresh process per backend measures:

  build:   constructing the Keras model (random initialization)
  export:  keras_aim.export.export_saved_model (PyTorch: saving a .keras
           file + the TensorFlow-backend subprocess)
  size:    bytes of the written version folder
  serve:   tf.saved_model.load + the first serving_default request
           (one 300x400 uint8 image, includes TF/XLA compilation)
  peak:    peak resident memory of the exporting process (VmHWM; the
           PyTorch export's TF subprocess is not counted)

    python benchmarks/export_aim_600m.py [--backends jax tensorflow torch]
        [--preset aim_600m] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import json, os, sys, time
preset, out = sys.argv[1:3]
import numpy as np
import keras_aim
from keras_aim.export import export_saved_model
start = time.perf_counter()
model = keras_aim.AIMImageClassifier.from_preset(preset, load_weights=False)
build = time.perf_counter() - start
start = time.perf_counter()
path = export_saved_model(model, out)
export = time.perf_counter() - start
del model
size = sum(
    os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files
)
import tensorflow as tf
start = time.perf_counter()
served = tf.saved_model.load(path)
image = np.random.RandomState(0).randint(0, 256, (1, 300, 400, 3)).astype("uint8")
top = served.signatures["serving_default"](images=tf.constant(image))["top_k_indices"]
serve = time.perf_counter() - start
with open("/proc/self/status") as f:
    peak = int(next(l for l in f if l.startswith("VmHWM:")).split()[1]) * 1024
print(json.dumps({"build": build, "export": export, "size": size, "serve": serve,
                  "peak": peak, "top_k_shape": list(top.shape)}))
"""


def measure(backend: str, preset: str, workdir: str) -> dict:
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "2"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    out = os.path.join(workdir, f"{preset}-{backend}")
    result = subprocess.run(
        [sys.executable, "-c", CHILD, preset, out],
        env=env, capture_output=True, text=True,
    )
    if result.returncode != 0:
        raise RuntimeError(f"{backend}: {result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", nargs="+", default=["jax", "tensorflow", "torch"])
    parser.add_argument("--preset", default="aim_600m")
    parser.add_argument("--workdir", default=None, help="where the exports go (deleted)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
        for backend in args.backends:
            r = measure(backend, args.preset, workdir)
            rows.append((
                backend, f"{r['build']:.1f} s", f"{r['export']:.1f} s",
                f"{r['size'] / 1e9:.2f} GB", f"{r['serve']:.1f} s", f"{r['peak'] / 1e9:.2f} GB",
            ))
            print(json.dumps({"backend": backend, **r}), flush=True)
    header = ("backend", "build", "export", "SavedModel size", "load + 1st request", "peak RSS")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
