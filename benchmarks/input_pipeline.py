"""The input pipeline at scale: keras_aim's stream against a plain tf.data one.

    python benchmarks/input_pipeline.py                       # the full table
    python benchmarks/input_pipeline.py --images 200 --batches 6   # a quick look

Writes a folder of random-content JPEGs (200-330 x 200-400 pixels, as a
photo folder), then measures in fresh processes (one at a time, so that each
has the machine to itself):

- images/s of `keras_aim.data.pretraining_dataset` on that folder with the
  paper's augmentation at 224 px and batch 64, against a plain tf.data
  pipeline on the same files with the same augmentation (list files,
  shuffle, read, `decode_and_crop_jpeg` inside
  `sample_distorted_bounding_box`, antialiased bicubic resize, flip, color
  jitter with p=0.8, normalize), per core;
- file bytes read per delivered image (the process's `rchar`, all reads)
  with 1 process and with 4 processes each reading its share
  (`shard=(i, 4)`);
- time to the first batch at step 0 and at step 100,000;
- peak RSS of the stream, and again on a folder of the same images at twice
  the side (4x the pixels): flat means no decoded image is buffered;
- where the time of one image goes: reading, decoding (whole and fused with
  the crop), resizing, color jitter.

Prints the CPU flags and versions with the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def make_folder(directory: str, count: int, scale: float = 1.0, seed: int = 0) -> int:
    """`count` JPEGs of 200-330 x 200-400 pixels (times `scale`) in 10
    class folders; smooth random content (compresses like a photo). Returns
    the bytes written."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    total = 0
    for i in range(count):
        folder = os.path.join(directory, f"class{i % 10}")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{i:06d}.jpg")
        height = int(rng.integers(200, 331) * scale)
        width = int(rng.integers(200, 401) * scale)
        coarse = (rng.random((height // 8 + 1, width // 8 + 1, 3)) * 255).astype(np.uint8)
        image = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
        image.save(path, "JPEG", quality=90)
        total += os.path.getsize(path)
    return total


def _rchar() -> int:
    with open("/proc/self/io") as handle:
        for line in handle:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    return 0


def plain_pipeline(directory: str, batch_size: int, image_size: int, seed: int = 0):
    """The baseline: what one would write with tf.data alone."""
    import tensorflow as tf

    mean = tf.constant([0.485, 0.456, 0.406])
    std = tf.constant([0.229, 0.224, 0.225])
    files = tf.data.Dataset.list_files(os.path.join(directory, "*", "*.jpg"), seed=seed)

    def load(path):
        data = tf.io.read_file(path)
        shape = tf.image.extract_jpeg_shape(data)
        begin, size, _ = tf.image.sample_distorted_bounding_box(
            shape, tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), min_object_covered=0.0,
            aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.4, 1.0), max_attempts=10,
            use_image_if_no_bounding_boxes=True)
        window = tf.stack([begin[0], begin[1], size[0], size[1]])
        image = tf.image.decode_and_crop_jpeg(data, window, channels=3)
        image = tf.image.resize(tf.cast(image, tf.float32), (image_size, image_size),
                                "bicubic", antialias=True)
        image = tf.clip_by_value(image, 0.0, 255.0) / 255.0
        image = tf.image.random_flip_left_right(image)

        def jitter(x):
            x = tf.image.random_brightness(x, 0.4)
            x = tf.image.random_contrast(x, 0.6, 1.4)
            x = tf.image.random_saturation(x, 0.8, 1.2)
            x = tf.image.random_hue(x, 0.1)
            return tf.clip_by_value(x, 0.0, 1.0)

        image = tf.cond(tf.random.uniform(()) < 0.8, lambda: jitter(image), lambda: image)
        return (image - mean) / std

    ds = files.repeat().map(load, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def worker(args) -> dict:
    """One measurement in this process; returns a JSON-able row."""
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import tensorflow as tf

    started = time.perf_counter()
    if args.kind == "plain":
        ds = plain_pipeline(args.folder, args.batch_size, args.image_size)
    else:
        from keras_aim import data

        ds = data.pretraining_dataset(
            f"folder:{args.folder}", args.batch_size * args.shards, args.image_size, "aim",
            seed=0, start_step=args.start_step, shard=(args.shard, args.shards),
            workers=args.workers,
        )
    iterator = iter(ds)
    before = _rchar()
    first = next(iterator)
    first_batch = time.perf_counter() - started
    delivered = first.shape[0]
    start = time.perf_counter()
    for _ in range(args.batches - 1):
        delivered += next(iterator).shape[0]
    elapsed = time.perf_counter() - start
    read = _rchar() - before
    del tf
    return {
        "kind": args.kind, "first_batch_s": first_batch,
        "images_per_s": (delivered - first.shape[0]) / elapsed if args.batches > 1 else None,
        "delivered": delivered, "bytes_read": read,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def stage_profile(folder: str, image_size: int, count: int = 64) -> list[tuple[str, float]]:
    """ms per image of each stage of the augmentation, eagerly compiled as
    one tf.function per stage over `count` images of `folder`."""
    import glob

    import tensorflow as tf

    from keras_aim.data import augment

    paths = [tf.constant(p) for p in sorted(glob.glob(os.path.join(folder, "*", "*.jpg")))[:count]]
    blobs = [tf.io.read_file(p) for p in paths]
    seeds = [tf.constant([0, i], tf.int64) for i in range(len(blobs))]
    full = [tf.io.decode_jpeg(b, channels=3, dct_method="INTEGER_ACCURATE") for b in blobs]
    crops = [augment.random_crop(b, s) for b, s in zip(blobs, seeds)]
    resized = [tf.image.resize(tf.cast(c, tf.float32), (image_size, image_size), "bicubic",
                               antialias=True) / 255.0 for c in crops]

    stages = {
        "read the file": (tf.function(lambda p: tf.io.read_file(p)), [(p,) for p in paths]),
        "decode whole (accurate IDCT)": (tf.function(
            lambda b: tf.io.decode_jpeg(b, channels=3, dct_method="INTEGER_ACCURATE")),
            [(b,) for b in blobs]),
        "decode whole (fast IDCT)": (tf.function(
            lambda b: tf.io.decode_jpeg(b, channels=3, dct_method="INTEGER_FAST")),
            [(b,) for b in blobs]),
        "decode fused with the crop (keras_aim)": (tf.function(augment.random_crop),
                                                   list(zip(blobs, seeds))),
        "crop of a decoded image": (tf.function(augment.random_crop), list(zip(full, seeds))),
        "resize, antialiased bicubic (keras_aim)": (tf.function(
            lambda c: tf.image.resize(tf.cast(c, tf.float32), (image_size, image_size),
                                      "bicubic", antialias=True)), [(c,) for c in crops]),
        "resize, bicubic without antialias": (tf.function(
            lambda c: tf.image.resize(tf.cast(c, tf.float32), (image_size, image_size),
                                      "bicubic")), [(c,) for c in crops]),
        "resize, bilinear antialiased": (tf.function(
            lambda c: tf.image.resize(tf.cast(c, tf.float32), (image_size, image_size),
                                      "bilinear", antialias=True)), [(c,) for c in crops]),
        "color jitter (brightness, contrast, saturation, hue)": (tf.function(
            lambda x, s: _jitter(x, s)), list(zip(resized, seeds))),
        "whole augmentation (keras_aim)": (tf.function(
            lambda b, s: augment.aim_augment(b, s, image_size)), list(zip(blobs, seeds))),
    }
    rows = []
    for name, (fn, inputs) in stages.items():
        fn = tf.function(fn.python_function if hasattr(fn, "python_function") else fn,
                         reduce_retracing=True)
        for item in inputs:
            fn(*item)  # traces, once per input rank and dtype
        start = time.perf_counter()
        for item in inputs:
            fn(*item)
        rows.append((name, 1000 * (time.perf_counter() - start) / len(inputs)))
    return rows


def _jitter(x, seed):
    import tensorflow as tf

    seeds = tf.random.experimental.stateless_split(seed, num=4)
    x = tf.image.stateless_random_brightness(x, 0.4, seeds[0])
    x = tf.image.stateless_random_contrast(x, 0.6, 1.4, seeds[1])
    x = tf.image.stateless_random_saturation(x, 0.8, 1.2, seeds[2])
    x = tf.image.stateless_random_hue(x, 0.1, seeds[3])
    return tf.clip_by_value(x, 0.0, 1.0)


def run_worker(folder: str, kind: str, batches: int, batch_size: int, image_size: int,
               start_step: int = 0, shard: int = 0, shards: int = 1,
               workers: int | None = None, background: bool = False):
    command = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--folder", folder,
               "--batches", str(batches), "--batch-size", str(batch_size),
               "--image-size", str(image_size), "--start-step", str(start_step),
               "--shard", str(shard), "--shards", str(shards)]
    if workers:
        command += ["--workers", str(workers)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "KERAS_BACKEND": "tensorflow",
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env)
    if background:
        return process
    return _result(process)


def _result(process) -> dict:
    out, err = process.communicate()
    if process.returncode:
        raise RuntimeError(f"worker failed:\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


def cpu_flags() -> str:
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
    try:
        with open("/proc/cpuinfo") as handle:
            text = handle.read()
        model = next(line.split(":", 1)[1].strip() for line in text.splitlines()
                     if line.startswith("model name"))
        flags = set(next(line for line in text.splitlines() if line.startswith("flags")).split())
        return f"{model}; " + " ".join(f for f in wanted if f in flags)
    except (OSError, StopIteration):
        return platform.processor()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--batches", type=int, default=16, help="timed batches per pipeline")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--far-step", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=2, help="throughput runs per pipeline")
    parser.add_argument("--folder", help="reuse this folder of images (default: write one)")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--worker", choices=("plain", "keras_aim"), help=argparse.SUPPRESS)
    parser.add_argument("--start-step", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--shard", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--shards", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        args.kind = args.worker
        print(json.dumps(worker(args)))
        return 0

    import tensorflow as tf

    cores = len(os.sched_getaffinity(0))
    print(f"CPU: {cpu_flags()}; {cores} cores")
    print(f"Python {platform.python_version()}, TensorFlow {tf.__version__}")
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.folder or os.path.join(scratch, "images")
        big = os.path.join(scratch, "images_2x")
        if not args.folder:
            size = make_folder(folder, args.images)
            print(f"{args.images} JPEGs, {size / args.images / 1024:.0f} KiB each on average")
        n_big = min(args.images, 200)
        make_folder(big, n_big, scale=2.0)
        epoch_steps = args.images // args.batch_size

        rows = []
        for kind in ("plain", "keras_aim"):
            for _ in range(args.repeats):
                rows.append(run_worker(folder, kind, args.batches, args.batch_size,
                                       args.image_size, workers=args.workers))
        rate = {kind: max(r["images_per_s"] for r in rows if r["kind"] == kind)
                for kind in ("plain", "keras_aim")}
        print("\n| pipeline | images/s (best of %d) | per core | vs plain |" % args.repeats)
        print("|---|---|---|---|")
        for kind in ("plain", "keras_aim"):
            print(f"| {kind} | {rate[kind]:.0f} | {rate[kind] / cores:.0f} | "
                  f"{rate[kind] / rate['plain']:.2f}x |")

        steps = 16  # read-ahead (prefetch) is amortized over the delivered images
        one = run_worker(folder, "keras_aim", steps, args.batch_size, args.image_size)
        parts = [run_worker(folder, "keras_aim", steps, args.batch_size // 4, args.image_size,
                            shard=i, shards=4, background=True) for i in range(4)]
        parts = [_result(p) for p in parts]
        per_one = one["bytes_read"] / one["delivered"]
        per_four = sum(p["bytes_read"] for p in parts) / sum(p["delivered"] for p in parts)
        print("\n| processes | file bytes read per delivered image |")
        print("|---|---|")
        print(f"| 1 | {per_one / 1024:.1f} KiB |")
        print(f"| 4 (shard=(i, 4)) | {per_four / 1024:.1f} KiB ({per_four / per_one:.2f}x) |")

        near = run_worker(folder, "keras_aim", 1, args.batch_size, args.image_size)
        far = run_worker(folder, "keras_aim", 1, args.batch_size, args.image_size,
                         start_step=args.far_step)
        print(f"\n| start step | time to the first batch | peak RSS |")
        print("|---|---|---|")
        for step, row in ((0, near), (args.far_step, far)):
            print(f"| {step:,} | {row['first_batch_s']:.2f} s | {row['peak_rss_mb']:.0f} MB |")
        print(f"ratio: {far['first_batch_s'] / near['first_batch_s']:.2f}x "
              f"(an epoch is {epoch_steps} steps)")

        small = run_worker(folder, "keras_aim", 8, args.batch_size, args.image_size)
        large = run_worker(big, "keras_aim", 8, args.batch_size, args.image_size)
        print("\n| images | peak RSS of the stream |")
        print("|---|---|")
        print(f"| 200-330 x 200-400 px | {small['peak_rss_mb']:.0f} MB |")
        print(f"| twice the side (4x the pixels) | {large['peak_rss_mb']:.0f} MB "
              f"({large['peak_rss_mb'] / small['peak_rss_mb']:.2f}x) |")

        print("\n| stage (one image, one thread) | ms |")
        print("|---|---|")
        for name, ms in stage_profile(folder, args.image_size):
            print(f"| {name} | {ms:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
