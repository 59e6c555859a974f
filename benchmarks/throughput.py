"""Throughput of AIM inference and pre-training steps, keras_aim vs plain PyTorch.

For one model config and batch size, each target runs in a fresh process:

  keras-jax, keras-tensorflow, keras-torch   keras_aim on that Keras backend
  torch-eager, torch-compile                 benchmarks/torch_reference_aim.py

and measures, after warm-up, the median over several runs of

  inference   images/s of the trunk (`predict_on_batch` of an `AIMBackbone`
              whose tokens are mean-pooled, so only `(B, D)` leaves a GPU)
  train       images/s of a pre-training step (`AIMPretrainer.train_on_batch`:
              prefix-causal mask, pixel head, loss, backward, clipped AdamW)

plus the process's peak memory (resident set on CPU, device memory on a GPU).
Every target runs `--repeats` times (default 3), each time in a fresh
process, in rounds over the targets, so that a slow spell of a shared machine
hits all targets alike; the table gives the fastest process (noise only
slows a process down; the matmul rate likewise takes its higher reading) and
the range (slowest-fastest process).
An analytic FLOP count (trunk + attention (+ pixel head); backward = 2x
forward) turns each into achieved FLOP/s and a fraction of the machine's
float32 matrix-multiply rate, measured in the same run (numpy, 2048x2048).
Prints one table with the ratios to plain PyTorch eager, and writes CSV,
Markdown and a PNG chart when asked.

    python benchmarks/throughput.py --all-backends [--csv F] [--markdown-out F] [--chart F]
    python benchmarks/throughput.py --config aim_1b --targets keras-jax torch-eager \\
        --dtype mixed_bfloat16 --report-mfu        # on a GPU

No assertions: this is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


# Both framework-free: this parent process stays without Keras or a backend
# (each target runs in its own process).
from keras_aim.models.aim.aim_presets import pretraining_architecture  # noqa: E402
from keras_aim.utils.atomic_files import atomic_file  # noqa: E402

KERAS_TARGETS = ("keras-jax", "keras-tensorflow", "keras-torch")
TORCH_TARGETS = ("torch-eager", "torch-compile")
ALL_TARGETS = KERAS_TARGETS + TORCH_TARGETS

# Model configs. "cpu" is small enough for a 2-core machine; the others are
# the released trunks at 224 px with the paper's pixel head (2048 wide, 12
# deep), for GPUs.
CONFIGS = {
    "cpu": dict(image_size=112, patch_size=14, hidden_dim=384, num_layers=6,
                num_heads=6, head_width=384, head_depth=3, batch_size=8),
    **{
        name: {
            **{k: arch[k] for k in ("image_size", "patch_size", "hidden_dim",
                                    "num_layers", "num_heads")},
            "head_width": arch["pixel_head_width"],
            "head_depth": arch["pixel_head_depth"],
            "batch_size": batch_size,
        }
        for name, batch_size in (("aim_600m", 64), ("aim_1b", 64), ("aim_3b", 32))
        for arch in [pretraining_architecture(name)]
    },
}

# Dense peak FLOP/s of accelerators (bfloat16, float32), for --report-mfu.
DEVICE_PEAKS = {
    "H200": (989e12, 67e12),
    "H100": (989e12, 67e12),
    "A100": (312e12, 19.5e12),
    "L4": (121e12, 30e12),
}


def forward_flops(config: dict) -> dict:
    """Analytic FLOPs (2 per multiply-add) of one image's forward pass.

    `trunk`: patch projection, qkv, attention output projection, MLPs;
    `attention`: the two `N x N` products (counted in full, also under the
    causal mask); `pixel_head`: its input projection, MLPs and output
    projection. Norms, softmax and element-wise ops are not counted.
    """
    p, d = config["patch_size"], config["hidden_dim"]
    n = (config["image_size"] // p) ** 2
    pixels, depth, ratio = p * p * 3, config["num_layers"], 4.0
    trunk = 2 * n * pixels * d + depth * 2 * n * d * d * (4 + 2 * ratio)
    attention = depth * 4 * n * n * d
    w = config["head_width"]
    head = (2 * n * d * w + config["head_depth"] * 4 * n * w * w * ratio
            + 2 * n * w * pixels)
    return {"trunk": trunk, "attention": attention, "pixel_head": head}


def step_flops(config: dict) -> dict:
    """FLOPs per image: inference (trunk, full attention) and a pre-training
    step (trunk + pixel head, forward + backward = 3x forward)."""
    f = forward_flops(config)
    return {"inference": f["trunk"] + f["attention"],
            "train": 3 * (f["trunk"] + f["attention"] + f["pixel_head"])}


def matmul_rate(size: int = 2048, repeats: int = 7) -> float:
    """The machine's float32 matmul rate (FLOP/s): median of numpy products."""
    import numpy as np

    a = np.random.default_rng(0).standard_normal((size, size), dtype=np.float32)
    a @ a
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ a
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times)


# --- Worker: one target in its own process ---------------------------------


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as handle:
        line = next(l for l in handle if l.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def _time_runs(step, calls: int, runs: int, warmup: int, sync) -> list[float]:
    """Seconds per call of each run, after `warmup` calls."""
    for _ in range(warmup):
        step()
    sync()
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        for _ in range(calls):
            step()
        sync()
        seconds.append((time.perf_counter() - start) / calls)
    return seconds


def _keras_worker(args, config) -> dict:
    import keras
    import numpy as np

    import keras_aim

    if args.dtype != "float32":
        keras.config.set_dtype_policy(args.dtype)
    keras.utils.set_random_seed(0)
    size = config["image_size"]
    images = np.random.default_rng(0).standard_normal(
        (config["batch_size"], size, size, 3), dtype=np.float32)

    def build():
        backbone = keras_aim.AIMBackbone(
            image_shape=(size, size, 3), patch_size=config["patch_size"],
            hidden_dim=config["hidden_dim"], num_layers=config["num_layers"],
            num_heads=config["num_heads"])
        if args.flash_attention is not None:
            for block in backbone.blocks:
                block.attn.flash_attention = args.flash_attention
        return backbone

    jit_compile = {"auto": "auto", "true": True, "false": False}[args.jit_compile]
    results = {}
    if "inference" in args.modes:
        backbone = build()
        # Mean-pooled tokens: only (B, D) leaves the device on a GPU.
        trunk = keras.Model(backbone.input, keras.ops.mean(backbone.output, axis=1))
        if jit_compile != "auto":
            trunk.jit_compile = jit_compile
        results["inference"] = _time_runs(
            lambda: trunk.predict_on_batch(images), args.calls, args.runs,
            args.warmup, sync=lambda: None)  # returns NumPy: already synced
        results["inference_peak"] = _peak_memory()
        del backbone, trunk
    if "train" in args.modes:
        # Rematerialize the transformer blocks (trunk and pixel head), whose
        # activations dominate the memory of the backward pass.
        blocks = [f"block_{i}" for i in range(max(config["num_layers"], config["head_depth"]))]
        scope = (keras.RematScope(mode="list_of_layers", layer_names=blocks)
                 if args.remat else _nothing())
        with scope:
            pretrainer = keras_aim.AIMPretrainer(
                build(), pixel_head_width=config["head_width"],
                pixel_head_depth=config["head_depth"], seed=0)
        pretrainer.compile(jit_compile=jit_compile)
        results["train"] = _time_runs(
            lambda: pretrainer.train_on_batch(images), max(1, args.calls // 4),
            args.runs, args.warmup, sync=lambda: None)  # returns a float
        results["train_peak"] = _peak_memory()
    return results


def _torch_worker(args, config, compiled: bool) -> dict:
    import torch

    sys.path.insert(0, HERE)
    import torch_reference_aim as reference

    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    dtype = torch.bfloat16 if args.dtype == "mixed_bfloat16" else None
    torch.manual_seed(0)
    size = config["image_size"]
    images = torch.randn(config["batch_size"], 3, size, size, device=device)
    model = reference.TorchAIM(
        image_size=size, patch_size=config["patch_size"],
        hidden_dim=config["hidden_dim"], num_layers=config["num_layers"],
        num_heads=config["num_heads"], head_width=config["head_width"],
        head_depth=config["head_depth"]).to(device)
    autocast = (lambda: torch.autocast(device, dtype=dtype)) if dtype else _nothing

    results = {}
    if "inference" in args.modes:
        trunk = torch.compile(model) if compiled else model

        def infer():
            with torch.inference_mode(), autocast():
                return trunk(images).mean(1)  # as the Keras targets

        results["inference"] = _time_runs(infer, args.calls, args.runs, args.warmup, sync)
        results["inference_peak"] = _peak_memory()
    if "train" in args.modes:
        loss_fn = reference.PretrainingLoss(model)
        if compiled:
            loss_fn = torch.compile(loss_fn)
        optimizer = reference.make_optimizer(model)

        def train():
            with autocast():
                return reference.train_step(model, optimizer, images, loss_fn=loss_fn)

        results["train"] = _time_runs(
            train, max(1, args.calls // 4), args.runs, args.warmup, sync)
        results["train_peak"] = _peak_memory()
    return results


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _peak_memory() -> int:
    """Peak bytes so far: the device's on a GPU, else the process's RSS."""
    backend = os.environ.get("KERAS_BACKEND")
    try:
        if backend == "jax":
            import jax

            if jax.devices()[0].platform != "cpu":
                return int(jax.devices()[0].memory_stats()["peak_bytes_in_use"])
        if "torch" in sys.modules:
            import torch

            if torch.cuda.is_available():
                return int(torch.cuda.max_memory_allocated())
        if backend == "tensorflow":
            import tensorflow as tf

            if tf.config.list_physical_devices("GPU"):
                return int(tf.config.experimental.get_memory_info("GPU:0")["peak"])
    except (KeyError, RuntimeError, ValueError):
        pass
    return _status_bytes("VmHWM")


def run_worker(args) -> None:
    config = resolve_config(args)
    if args.worker in KERAS_TARGETS:
        results = _keras_worker(args, config)
    else:
        results = _torch_worker(args, config, compiled=args.worker == "torch-compile")
    results["device"] = _device_name()
    print("RESULT " + json.dumps(results), flush=True)


def _device_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    return f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


# --- Parent: runs the workers, prints the table ----------------------------


def resolve_config(args) -> dict:
    config = dict(CONFIGS[args.config])
    for key in config:
        value = getattr(args, key, None)
        if value is not None:
            config[key] = value
    return config


def measure_target(target: str, args) -> dict:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "TF_CPP_MIN_LOG_LEVEL": "3"}
    if target in KERAS_TARGETS:
        env["KERAS_BACKEND"] = target.split("-", 1)[1]
    command = [sys.executable, os.path.abspath(__file__), "--worker", target]
    command += _forwarded_arguments(args)
    start = time.perf_counter()
    out = subprocess.run(command, env=env, capture_output=True, text=True,
                         timeout=args.target_timeout)
    lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        return {"error": (out.stderr or out.stdout).strip().splitlines()[-1:] or ["?"],
                "wall": time.perf_counter() - start}
    result = json.loads(lines[-1][len("RESULT "):])
    result["wall"] = time.perf_counter() - start
    return result


def _forwarded_arguments(args) -> list[str]:
    forwarded = ["--config", args.config, "--dtype", args.dtype, "--runs", str(args.runs),
                 "--calls", str(args.calls), "--warmup", str(args.warmup),
                 "--modes", *args.modes]
    for key in CONFIGS["cpu"]:
        value = getattr(args, key)
        if value is not None:
            forwarded += ["--" + key.replace("_", "-"), str(value)]
    if args.remat:
        forwarded.append("--remat")
    forwarded += ["--jit-compile", args.jit_compile]
    if args.flash_attention is not None:
        forwarded += ["--flash-attention", str(args.flash_attention).lower()]
    return forwarded


def table_rows(results: dict, config: dict, rate: float, peak: float | None) -> list[dict]:
    """One row per (target, mode) from `results[target]`, a list of worker
    results (one per fresh process, i.e. per `--repeats` round).

    A process's speed is the median of its runs. The row reports the fastest
    process, like the matmul rate reports its higher reading: on a shared
    machine noise only ever slows a process down, so the fastest one is the
    closest to what the code can do. The range (slowest-fastest process) and
    the median over processes are reported with it."""
    flops = step_flops(config)
    batch = config["batch_size"]

    def per_process(target, mode):
        return [batch / statistics.median(r[mode]) for r in results.get(target, []) if mode in r]

    rows = []
    for mode in ("inference", "train"):
        eager = per_process("torch-eager", mode)
        for target, processes in results.items():
            speeds = per_process(target, mode)
            if not speeds:
                continue
            images_per_s = max(speeds)
            achieved = images_per_s * flops[mode]
            rows.append({
                "target": target, "mode": mode, "batch": batch, "processes": len(speeds),
                "ms_per_step": 1e3 * batch / images_per_s, "images_per_s": images_per_s,
                "gflops": achieved / 1e9, "of_matmul": achieved / rate,
                "of_matmul_min": min(speeds) * flops[mode] / rate,
                "of_matmul_median": statistics.median(speeds) * flops[mode] / rate,
                "mfu": achieved / peak if peak else None,
                "vs_torch_eager": images_per_s / max(eager) if eager else None,
                "peak_memory_gb": max(r[mode + "_peak"] for r in processes if mode in r) / 1e9,
            })
    return rows


def format_table(rows: list[dict], markdown: bool = False, mfu: bool = False) -> str:
    header = ["target", "mode", "ms/step", "images/s", "GFLOP/s", "of matmul",
              "range", "vs torch eager", "peak mem GB"] + (["MFU"] if mfu else [])
    lines = []
    for row in rows:
        cells = [row["target"], row["mode"], f"{row['ms_per_step']:.1f}",
                 f"{row['images_per_s']:.1f}", f"{row['gflops']:.1f}",
                 f"{100 * row['of_matmul']:.0f}%",
                 f"{100 * row['of_matmul_min']:.0f}-{100 * row['of_matmul']:.0f}%",
                 "-" if row["vs_torch_eager"] is None else f"{row['vs_torch_eager']:.2f}x",
                 f"{row['peak_memory_gb']:.2f}"]
        if mfu:
            cells.append("-" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%")
        lines.append(cells)
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(cells) + " |" for cells in lines]
        return "\n".join(out)
    widths = [max(len(h), *(len(c[i]) for c in lines)) if lines else len(h)
              for i, h in enumerate(header)]
    fmt = "  ".join("{:>%d}" % w for w in widths)
    return "\n".join([fmt.format(*header)] + [fmt.format(*cells) for cells in lines])


def write_chart(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in ("inference", "train") if any(r["mode"] == m for r in rows)]
    figure, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 3.6), squeeze=False)
    for axis, mode in zip(axes[0], modes):
        picked = [r for r in rows if r["mode"] == mode]
        names = [r["target"] for r in picked]
        values = [100 * r["of_matmul"] for r in picked]
        slowest = [100 * r.get("of_matmul_min", r["of_matmul"]) for r in picked]
        bars = axis.barh(names, values, color=["#3b75af" if n.startswith("keras") else "#999999"
                                               for n in names])
        # Whiskers: down to the slowest process.
        axis.errorbar(values, range(len(picked)), fmt="none", ecolor="#333333", capsize=3,
                      xerr=[[v - low for v, low in zip(values, slowest)], [0] * len(values)])
        for bar, row in zip(bars, picked):
            axis.text(bar.get_width() + 1, bar.get_y() + bar.get_height() / 2,
                      f"{row['images_per_s']:.0f} img/s", va="center", fontsize=8)
        axis.set_xlim(0, max(110, max(values) + 25))
        axis.invert_yaxis()
        axis.set_xlabel("% of the measured matmul rate (whisker: slowest process)")
        axis.set_title("pre-training step" if mode == "train" else "inference")
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    with atomic_file(path) as staging:
        figure.savefig(staging, dpi=110)
    plt.close(figure)


def _write_text(path: str, text: str) -> None:
    with atomic_file(path) as staging, open(staging, "w") as handle:
        handle.write(text)


def _at_least(minimum: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--all-backends", action="store_true",
                        help="every target: three Keras backends, torch eager and compiled")
    parser.add_argument("--targets", nargs="+", choices=ALL_TARGETS, default=None)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="cpu")
    for key in CONFIGS["cpu"]:
        parser.add_argument("--" + key.replace("_", "-"), type=int, default=None)
    parser.add_argument("--modes", nargs="+", choices=("inference", "train"),
                        default=["inference", "train"])
    parser.add_argument("--dtype", choices=("float32", "mixed_bfloat16"), default="float32")
    parser.add_argument("--remat", action="store_true",
                        help="rematerialize activations in the backward pass (Keras targets)")
    parser.add_argument("--flash-attention", type=lambda s: s.lower() == "true", default=None,
                        help="true/false: force keras.ops.dot_product_attention's flash path")
    parser.add_argument("--jit-compile", choices=("auto", "true", "false"), default="auto",
                        help="Keras targets: compiled steps (XLA on JAX/TF, torch.compile on "
                             "torch); auto is Keras' default")
    parser.add_argument("--report-mfu", action="store_true",
                        help="add model FLOPs utilization against the device's peak")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's peak for --report-mfu (default: known GPUs, "
                             "or the measured matmul rate on a CPU)")
    parser.add_argument("--repeats", type=_at_least(1), default=3,
                        help="fresh processes per target, run in rounds over the targets; "
                             "the table gives the fastest and the range over them")
    parser.add_argument("--runs", type=_at_least(1), default=5)
    parser.add_argument("--calls", type=_at_least(1), default=4,
                        help="inference calls per run (training steps: a quarter, at least 1)")
    parser.add_argument("--warmup", type=_at_least(0), default=2)
    parser.add_argument("--target-timeout", type=int, default=300)
    parser.add_argument("--csv", default=None)
    parser.add_argument("--markdown-out", default=None)
    parser.add_argument("--chart", default=None, help="PNG path, e.g. docs/throughput.png")
    parser.add_argument("--worker", choices=ALL_TARGETS, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        run_worker(args)
        return 0
    targets = ALL_TARGETS if args.all_backends or not args.targets else args.targets
    config = resolve_config(args)
    started = time.perf_counter()
    rates = []
    results = {target: [] for target in targets}
    errors = {}
    for round_index in range(args.repeats):
        rates.append(matmul_rate())
        for target in targets:
            if target in errors:
                continue
            result = measure_target(target, args)
            status = "ok"
            if "error" in result:
                errors[target] = status = result["error"][0]
            else:
                results[target].append(result)
            print(f"round {round_index + 1}/{args.repeats} {target}: {status} "
                  f"({result['wall']:.0f} s)", flush=True)
    rates.append(matmul_rate())
    rate = max(rates)  # the machine's limit; lower readings are noise
    measured = {t: r for t, r in results.items() if r}

    device = next((r[0]["device"] for r in measured.values()), _device_name())
    peak = _device_peak(args, device, rate)
    rows = table_rows(measured, config, rate, peak)
    flops = step_flops(config)
    versions = _versions()
    title = (f"AIM {config['hidden_dim']}x{config['num_layers']} ({config['num_heads']} heads), "
             f"patch {config['patch_size']}, {config['image_size']} px, batch "
             f"{config['batch_size']}, {args.dtype}; {device}")
    notes = [
        title,
        f"date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {versions}",
        f"{args.repeats} fresh process(es) per target, run in rounds; each process's "
        f"median run; the fastest process (range: slowest-fastest)",
        f"float32 matmul rate (numpy 2048x2048): {rate / 1e9:.1f} GFLOP/s "
        f"(readings {', '.join(f'{r / 1e9:.1f}' for r in rates)})",
        f"FLOPs per image: inference {flops['inference'] / 1e9:.3f} G, "
        f"pre-training step {flops['train'] / 1e9:.3f} G (3x forward of trunk + pixel head "
        f"{config['head_width']}x{config['head_depth']})",
    ]
    print()
    print("\n".join(notes))
    print(format_table(rows, mfu=args.report_mfu))
    for target, error in errors.items():
        print(f"{target}: failed: {error}")
    print(f"total {time.perf_counter() - started:.0f} s")

    if args.csv and rows:
        with atomic_file(args.csv) as staging, open(staging, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    if args.markdown_out and rows:
        text = "\n".join(f"{line}  " for line in notes) + "\n\n"
        _write_text(args.markdown_out, text + format_table(rows, True, args.report_mfu) + "\n")
    if args.chart and rows:
        write_chart(rows, args.chart, title)
    return 0 if measured else 1


def _device_peak(args, device: str, rate: float) -> float | None:
    if not args.report_mfu:
        return None
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    for name, (bf16, fp32) in DEVICE_PEAKS.items():
        if name in device:
            return bf16 if args.dtype == "mixed_bfloat16" else fp32
    return rate


def _versions() -> str:
    from importlib import metadata

    found = {"python": platform.python_version()}
    for name in ("keras", "keras-hub", "jax", "tensorflow", "torch", "numpy"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return ", ".join(f"{k} {v}" for k, v in found.items())


if __name__ == "__main__":
    sys.exit(main())
