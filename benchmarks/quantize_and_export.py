"""What quantization and each export format cost and give.

Three measurements, each backend (or format) in a fresh process:

  deviation  the tiny reference model (tests/fixtures/aim_v1_tiny, with
             Apple's weights for it), float32 against `quantize(mode)`: the
             largest and mean logit difference and the top-1 agreement, on
             the 3 reference images and on `--images` random normal images.
  speed      an `aim_600m` trunk (random weights): the bytes of its weights
             and CPU inference images/s (`predict_on_batch`, 224 px, after a
             warm-up call that compiles), float32 and each quantized mode.
  sizes      an `aim_600m` classifier and backbone (random weights) exported
             in each format (keras_aim.export.export_model) from a backend that
             writes it: the bytes on disk (main file and companions) and the
             export time, or the error.

    python benchmarks/quantize_and_export.py deviation [--backends ...] [--images 256]
    python benchmarks/quantize_and_export.py speed [--backends ...] [--modes float32 int8 int4]
        [--batch-size 2] [--runs 3]
    python benchmarks/quantize_and_export.py sizes [--formats onnx openvino litert torch
        saved_model] [--kinds classifier backbone] [--backend B] [--workdir DIR]

Each prints a markdown table (and one JSON line per process).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKENDS = ("jax", "tensorflow", "torch")
MODES = ("int8", "int4", "float8")
# The backend each format is written from in `sizes` (PyTorch where several
# can: it writes ONNX with external weights past 2 GB).
FORMAT_BACKEND = {
    "onnx": "torch",
    "openvino": "torch",
    "litert": "tensorflow",
    "torch": "torch",
    "saved_model": "tensorflow",
}


def run_worker(backend: str, args: list[str]) -> dict:
    """Runs this script's worker for `args` in a fresh `backend` process."""
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "2"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    result = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "worker", *args],
        env=env, capture_output=True, text=True,
    )
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1][:300]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def peak_rss() -> int:
    with open("/proc/self/status") as status:
        return int(next(l for l in status if l.startswith("VmHWM:")).split()[1]) * 1024


def weight_bytes(model) -> int:
    import numpy as np
    from keras import backend

    return sum(
        int(np.prod(w.shape)) * np.dtype(backend.standardize_dtype(w.dtype)).itemsize
        for w in model.weights
    )


# --- Workers (run inside the fresh process) ---------------------------------


def worker_deviation(count: int) -> dict:
    import warnings

    import keras
    import numpy as np

    import keras_aim
    from tests.conftest import fixture_path, make_tiny_classifier

    warnings.filterwarnings("ignore")
    reference = np.load(fixture_path("images_nhwc.npy"))
    random = np.random.RandomState(0).normal(size=(count, 32, 32, 3)).astype("float32")

    def classifier():
        model = make_tiny_classifier()
        keras_aim.load_official_weights(
            model, backbone_file=fixture_path("backbone.pth"), head_file=fixture_path("head.pth")
        )
        return model

    float_model = classifier()
    expected = {k: keras.ops.convert_to_numpy(float_model.predict(x, verbose=0))
                for k, x in (("reference", reference), ("random", random))}
    result = {}
    for mode in MODES:
        model = classifier()
        model.quantize(mode)
        for key, images in (("reference", reference), ("random", random)):
            got = keras.ops.convert_to_numpy(model.predict(images, verbose=0))
            difference = np.abs(got - expected[key])
            result[f"{mode}/{key}"] = {
                "max": float(difference.max()),
                "mean": float(difference.mean()),
                "top1": float((got.argmax(-1) == expected[key].argmax(-1)).mean()),
                "images": len(images),
                "logit_range": float(np.abs(expected[key]).max()),
            }
    return result


def worker_speed(preset: str, mode: str, batch_size: int, runs: int) -> dict:
    import warnings

    import numpy as np

    import keras_aim

    warnings.filterwarnings("ignore")
    start = time.perf_counter()
    backbone = keras_aim.AIMBackbone.from_preset(preset, load_weights=False)
    build = time.perf_counter() - start
    quantize = 0.0
    if mode != "float32":
        start = time.perf_counter()
        backbone.quantize(mode)
        quantize = time.perf_counter() - start
    height, width, channels = backbone.image_shape
    images = np.random.RandomState(0).normal(size=(batch_size, height, width, channels))
    images = images.astype("float32")
    start = time.perf_counter()
    backbone.predict_on_batch(images)  # compiles
    warmup = time.perf_counter() - start
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        backbone.predict_on_batch(images)
        times.append(time.perf_counter() - start)
    return {
        "weight_bytes": weight_bytes(backbone),
        "images_per_s": batch_size / min(times),
        "images_per_s_median": batch_size / sorted(times)[len(times) // 2],
        "build_s": build, "quantize_s": quantize, "warmup_s": warmup,
        "peak_rss": peak_rss(),
    }


def worker_size(preset: str, format: str, kind: str, workdir: str) -> dict:
    import warnings

    import keras_aim
    from keras_aim.export import FORMATS, export_model

    warnings.filterwarnings("ignore")
    cls = keras_aim.AIMImageClassifier if kind == "classifier" else keras_aim.AIMBackbone
    model = cls.from_preset(preset, load_weights=False)
    suffix = FORMATS[format].suffix or ""
    target = os.path.join(workdir, f"{preset}-{kind}-{format}{suffix}")
    start = time.perf_counter()
    path = export_model(model, target, format)
    seconds = time.perf_counter() - start
    if os.path.isdir(path):
        files = [os.path.join(d, f) for d, _, names in os.walk(path) for f in names]
    else:  # the file and its companions (same stem)
        stem = os.path.splitext(os.path.basename(path))[0]
        files = [os.path.join(workdir, f) for f in os.listdir(workdir) if f.startswith(stem)]
    sizes = {os.path.relpath(f, workdir): os.path.getsize(f) for f in files}
    return {"bytes": sum(sizes.values()), "files": sizes, "export_s": seconds,
            "weight_bytes": weight_bytes(model), "peak_rss": peak_rss()}


# --- Tables -------------------------------------------------------------------


def table(header: tuple, rows: list) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")


def deviation(args) -> None:
    rows = []
    for backend in args.backends:
        result = run_worker(backend, ["deviation", str(args.images)])
        print(json.dumps({"backend": backend, **result}), flush=True)
        if "error" in result:
            rows.append((backend, "error", result["error"], "", "", ""))
            continue
        for mode in MODES:
            ref, rnd = result[f"{mode}/reference"], result[f"{mode}/random"]
            rows.append((
                backend, mode, f"{ref['max']:.3g}", f"{ref['top1']:.0%} of {ref['images']}",
                f"{rnd['max']:.3g} (mean {rnd['mean']:.2g}; logits up to {rnd['logit_range']:.2g})",
                f"{rnd['top1']:.1%} of {rnd['images']}",
            ))
    table(("backend", "mode", "max abs logit diff, reference images", "top-1 agreement",
           "max abs logit diff, random images", "top-1 agreement"), rows)


def speed(args) -> None:
    rows = []
    for backend in args.backends:
        base = None
        for mode in args.modes:
            result = run_worker(backend, ["speed", args.preset, mode,
                                          str(args.batch_size), str(args.runs)])
            print(json.dumps({"backend": backend, "mode": mode, **result}), flush=True)
            if "error" in result:
                rows.append((backend, mode, "error", result["error"], "", "", ""))
                continue
            base = base or result
            rows.append((
                backend, mode, f"{result['weight_bytes'] / 1e9:.2f} GB",
                f"{result['weight_bytes'] / base['weight_bytes']:.2f}x",
                f"{result['images_per_s']:.3f} (median {result['images_per_s_median']:.3f})",
                f"{result['images_per_s'] / base['images_per_s']:.2f}x",
                f"{result['peak_rss'] / 1e9:.1f} GB",
            ))
    table(("backend", "weights", "weight bytes", "vs float32", "images/s (best run)",
           "vs float32", "peak RSS"), rows)


def sizes(args) -> None:
    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
        for format in args.formats:
            for kind in args.kinds:
                backend = args.backend or FORMAT_BACKEND[format]
                result = run_worker(backend, ["size", args.preset, format, kind, workdir])
                print(json.dumps({"format": format, "kind": kind, "backend": backend,
                                  **result}), flush=True)
                if "error" in result:
                    rows.append((format, kind, backend, "failed", result["error"], ""))
                else:
                    files = ", ".join(sorted(result["files"]))
                    rows.append((format, kind, backend, f"{result['bytes'] / 1e9:.2f} GB",
                                 files, f"{result['export_s']:.0f} s"))
                for name in os.listdir(workdir):  # keep the disk free between runs
                    path = os.path.join(workdir, name)
                    subprocess.run(["rm", "-rf", path], check=False)
    table(("format", "model", "from backend", "size on disk", "files", "export time"), rows)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "worker":
        kind, rest = sys.argv[2], sys.argv[3:]
        if kind == "deviation":
            result = worker_deviation(int(rest[0]))
        elif kind == "speed":
            result = worker_speed(rest[0], rest[1], int(rest[2]), int(rest[3]))
        else:
            result = worker_size(*rest)
        print(json.dumps(result))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    one = commands.add_parser("deviation")
    one.add_argument("--backends", nargs="+", default=list(BACKENDS))
    one.add_argument("--images", type=int, default=256)
    one.set_defaults(run=deviation)
    two = commands.add_parser("speed")
    two.add_argument("--backends", nargs="+", default=list(BACKENDS))
    two.add_argument("--modes", nargs="+", default=["float32", "int8", "int4"])
    two.add_argument("--preset", default="aim_600m")
    two.add_argument("--batch-size", type=int, default=2)
    two.add_argument("--runs", type=int, default=3)
    two.set_defaults(run=speed)
    three = commands.add_parser("sizes")
    three.add_argument("--formats", nargs="+", default=list(FORMAT_BACKEND))
    three.add_argument("--kinds", nargs="+", default=["classifier"])
    three.add_argument("--backend", default=None,
                       help="write every format from this backend (default: FORMAT_BACKEND)")
    three.add_argument("--preset", default="aim_600m")
    three.add_argument("--workdir", default=None, help="where the exports go (deleted)")
    three.set_defaults(run=sizes)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
