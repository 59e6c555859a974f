"""Peak memory of the streamed attentive probe against the number of images.

Writes image folders of 1,000 and 4,000 JPEGs (64x64, smooth random
content, 10 classes) and a tiny trunk preset, then runs

    python -m recipes.attentive_probe --backbone TRUNK --data folder:DIR \
        --stream --epochs 1

once per folder, each in a fresh process, and reads that process's own peak
resident memory (VmHWM; `ru_maxrss` of a child can carry its parent's peak
across fork + exec). With `--cached` the feature-keeping probe runs too,
for contrast: its features grow with the data. Prints a Markdown table with
the CPU model and the versions.

Target: the streamed run on 4,000 images peaks at no more than 1.1x the
streamed run on 1,000.

    python benchmarks/streaming_probe_memory.py [--counts 1000 4000]
        [--backend jax] [--cached] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = 1.1
IMAGE_SIZE = 64
CLASSES = 10

# Runs a module as `python -m` would, then reports this process's peak RSS.
CHILD = r"""
import json, runpy, sys
module, argv = sys.argv[1], sys.argv[2:]
sys.argv = [module] + argv
code = 0
try:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
except SystemExit as exit:
    code = exit.code or 0
with open("/proc/self/status") as status:
    fields = dict(line.split(":", 1) for line in status)
peak = int(fields["VmHWM"].split()[0]) * 1024
print("PEAK " + json.dumps({"peak": peak, "code": code}), flush=True)
"""

TRUNK = r"""
import sys
import keras_aim
keras_aim.AIMBackbone(image_shape=(64, 64, 3), patch_size=8, hidden_dim=256, num_layers=2,
                      num_heads=4).save_to_preset(sys.argv[1])
"""


def write_folder(root: str, count: int, seed: int = 0) -> str:
    """`root/class_<k>/<i>.jpg`: `count` 64x64 JPEGs, each a random 4x4 color
    grid upsampled (smooth content that compresses like photos do)."""
    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(seed)
    for label in range(CLASSES):
        os.makedirs(os.path.join(root, f"class_{label}"), exist_ok=True)
    for i in range(count):
        grid = rng.randint(0, 256, (4, 4, 3), dtype=np.uint8)
        image = Image.fromarray(grid).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)
        image.save(os.path.join(root, f"class_{i % CLASSES}", f"{i}.jpg"), quality=90)
    return root


def run_probe(env: dict, trunk: str, folder: str, stream: bool) -> dict:
    argv = ["recipes.attentive_probe", "--backbone", trunk, "--data", f"folder:{folder}",
            "--epochs", "1", "--batch-size", "32", "--probe-layers", "0,1", "--verbose", "0"]
    if stream:
        argv.append("--stream")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD, *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    lines = done.stdout.splitlines()
    report = [line for line in lines if line.startswith("PEAK ")]
    if done.returncode != 0 or not report or json.loads(report[-1][5:])["code"] != 0:
        raise SystemExit(f"the probe run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    result = [line for line in lines if "top-1" in line]
    return {"peak": json.loads(report[-1][5:])["peak"], "seconds": seconds,
            "result": result[-1] if result else ""}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions(env: dict) -> str:
    code = ("import keras, numpy, tensorflow as tf, importlib\n"
            "b = keras.config.backend()\n"
            "m = {'jax': 'jax', 'tensorflow': 'tensorflow', 'torch': 'torch'}[b]\n"
            "print(f'Keras {keras.__version__}, {b} '"
            " f'{importlib.import_module(m).__version__}, TensorFlow (tf.data) '"
            " f'{tf.__version__}, NumPy {numpy.__version__}')")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, check=True)
    return done.stdout.strip().splitlines()[-1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[1000, 4000])
    parser.add_argument("--backend", default=os.environ.get("KERAS_BACKEND", "jax"))
    parser.add_argument("--cached", action="store_true",
                        help="also run the probe that keeps the features, for contrast")
    parser.add_argument("--workdir", default=None, help="where the folders go (default: a "
                        "temporary folder, removed afterwards)")
    args = parser.parse_args(argv)
    env = {**os.environ, "KERAS_BACKEND": args.backend, "TF_CPP_MIN_LOG_LEVEL": "3",
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with tempfile.TemporaryDirectory(prefix="streaming_probe_memory") as scratch:
        workdir = args.workdir or scratch
        trunk = os.path.join(workdir, "trunk")
        if not os.path.isdir(trunk):
            subprocess.run([sys.executable, "-c", TRUNK, trunk], env=env, check=True,
                           capture_output=True)
        rows = []
        for count in args.counts:
            folder = os.path.join(workdir, f"images_{count}")
            if not os.path.isdir(folder):
                write_folder(folder, count)
            for stream in (True, False) if args.cached else (True,):
                measured = run_probe(env, trunk, folder, stream)
                rows.append((count, "--stream" if stream else "features in memory", measured))
                print(f"{count} images, {rows[-1][1]}: peak {measured['peak'] / 2**20:.0f} MiB "
                      f"in {measured['seconds']:.0f} s; {measured['result']}",
                      file=sys.stderr, flush=True)
    first = {mode: measured["peak"] for count, mode, measured in rows if count == args.counts[0]}
    print(f"CPU: {cpu_model()} ({os.cpu_count()} cores); Python {platform.python_version()}; "
          f"{versions(env)}")
    print("Trunk: AIM 64x64 px, patch 8 (64 tokens), width 256, 2 blocks (features: 64 KB "
          "an image in float32); 1 epoch of batch 32; 20% of each class held out for "
          "validation.\n")
    print(f"| images | probe | peak RSS (MiB) | vs {args.counts[0]:,} | time (s) |")
    print("|---:|---|---:|---:|---:|")
    for count, mode, measured in rows:
        ratio = measured["peak"] / first[mode]
        print(f"| {count:,} | {mode} | {measured['peak'] / 2**20:,.0f} | {ratio:.2f}x | "
              f"{measured['seconds']:.0f} |")
    streamed = [measured["peak"] for _, mode, measured in rows if mode == "--stream"]
    ratio = streamed[-1] / streamed[0]
    verdict = "met" if ratio <= TARGET else "NOT met"
    print(f"\nTarget (streamed peak at {args.counts[-1]:,} images <= {TARGET}x the peak at "
          f"{args.counts[0]:,}): {ratio:.3f}x, {verdict}.")
    return 0 if ratio <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
