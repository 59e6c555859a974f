"""Throughput of AIM inference and pre-training steps, keras_aim vs plain PyTorch.

For one or more cases (model size, batch, modes, dtype policies), each
target runs in a fresh process:

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
slows a process down; the matmul rates likewise take their highest reading)
and the range (slowest-fastest process).

The yardstick, measured in every round in fresh processes: the machine's
float32 matmul rate is the fastest of JAX's and PyTorch's 2048^3 products
(not NumPy's: its OpenBLAS may be built for, or pinned by OPENBLAS_CORETYPE
to, an older core type than the CPU's); each framework's own rate on the
model's GEMM shapes (`gemm_shapes`) is reported beside it, in each compute
dtype. An analytic FLOP count (trunk + attention (+ pixel head); backward =
2x forward) turns each target into achieved FLOP/s, a fraction of the
machine's rate and of its own framework's GEMM rate. The notes name the CPU
flags that set the limit (AVX2, AVX-512, AVX512_BF16, AMX) and the versions.
Prints the rates and one table with the ratios to plain PyTorch eager and to
float32, and writes CSV, Markdown and a PNG chart when asked.

    python benchmarks/throughput.py --all-backends [--csv F] [--markdown-out F] [--chart F]
    python benchmarks/throughput.py --all-backends --repeats 2 --cases cpu \
        aim_600m@4/inference/float32,bfloat16,mixed_bfloat16 aim_600m@16/inference \
        aim_600m_6blocks/train
    python benchmarks/throughput.py --config aim_1b --targets keras-jax torch-eager \
        --dtype mixed_bfloat16 --report-mfu        # on a GPU

No assertions: this is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import collections
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
from keras_aim.training import memory_plan  # noqa: E402
from keras_aim.training.memory_plan import PretrainingShape  # noqa: E402
from keras_aim.utils.atomic_files import atomic_file  # noqa: E402

KERAS_TARGETS = ("keras-jax", "keras-tensorflow", "keras-torch")
TORCH_TARGETS = ("torch-eager", "torch-compile")
ALL_TARGETS = KERAS_TARGETS + TORCH_TARGETS
MATMUL_WORKERS = ("matmul-jax", "matmul-tensorflow", "matmul-torch")
MODES = ("inference", "train")
DTYPES = ("float32", "bfloat16", "mixed_bfloat16")

# Model configs. "cpu" is small enough for a 2-core machine; "aim_600m_6blocks"
# is a CPU-sized training model at aim_600m's width (6 blocks, pixel head as
# wide as the trunk and 3 deep, like "cpu"); the others are the released
# trunks at 224 px with the paper's pixel head (2048 wide, 12 deep), for GPUs
# (inference uses the trunk only: `--cases aim_600m@4/inference` on a CPU).
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
CONFIGS["aim_600m_6blocks"] = {**CONFIGS["aim_600m"], "num_layers": 6, "batch_size": 8,
                               "head_width": CONFIGS["aim_600m"]["hidden_dim"], "head_depth": 3}

# Dense peak FLOP/s of accelerators (bfloat16, float32), for --report-mfu.
DEVICE_PEAKS = {
    "H200": (989e12, 67e12),
    "H100": (989e12, 67e12),
    "A100": (312e12, 19.5e12),
    "L4": (121e12, 30e12),
}


def _shape(config: dict) -> PretrainingShape:
    return PretrainingShape(
        **{k: config[k] for k in ("image_size", "patch_size", "hidden_dim", "num_layers",
                                  "num_heads")},
        pixel_head_width=config["head_width"], pixel_head_depth=config["head_depth"])


def forward_flops(config: dict) -> dict:
    """Analytic FLOPs of one image's forward pass (trunk, attention, pixel
    head): `keras_aim.training.memory_plan.forward_flops` of `config`."""
    return memory_plan.forward_flops(_shape(config))


def step_flops(config: dict) -> dict:
    """FLOPs per image: inference (trunk, full attention) and a pre-training
    step (trunk + pixel head, forward + backward = 3x forward)."""
    return memory_plan.step_flops(_shape(config))


# --- The yardstick: this machine's matmul rates ---------------------------

# CPU features the float32 / bfloat16 matmul limit depends on: (name in
# /proc/cpuinfo, how tables print it).
CPU_FEATURES = (("avx2", "AVX2"), ("avx512f", "AVX-512"), ("avx512_bf16", "AVX512_BF16"),
                ("amx_bf16", "AMX-BF16"), ("amx_tile", "AMX-TILE"))
# The framework whose matmuls each target's operations run on.
FRAMEWORK_OF = {"keras-jax": "jax", "keras-tensorflow": "tensorflow", "keras-torch": "torch",
                "torch-eager": "torch", "torch-compile": "torch"}
# The frameworks whose square float32 matmul sets the machine's rate: on CPUs
# with AVX-512, NumPy's OpenBLAS may be built for (or pinned by
# OPENBLAS_CORETYPE to) an older core type, so it is not the machine's limit.
MACHINE_RATE_FRAMEWORKS = ("jax", "torch")
SQUARE = 2048


def cpu_features(cpuinfo: str | None = None) -> dict[str, bool]:
    """`{"AVX2": True, "AVX-512": True, ...}` from the first `flags` line of
    `/proc/cpuinfo` (or of the text given); empty where there is none."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as handle:
                cpuinfo = handle.read()
        except OSError:
            return {}
    line = next((l for l in cpuinfo.splitlines() if l.split(":")[0].strip() == "flags"), None)
    if line is None:
        return {}
    present = set(line.split(":", 1)[1].split())
    return {label: flag in present for flag, label in CPU_FEATURES}


def describe_cpu(cpuinfo: str | None = None) -> str:
    """`'CPU flags: AVX2 yes, AVX-512 yes, ...'` for the tables' notes."""
    features = cpu_features(cpuinfo)
    if not features:
        return "CPU flags: not readable (no /proc/cpuinfo)"
    return "CPU flags: " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in features.items())


def gemm_shapes(config: dict, mode: str) -> dict[tuple[int, int, int], int]:
    """The dense layers' matrix products of one step, `{(m, k, n): count}`.

    Inference: the patch projection and each block's qkv, output
    projection and two MLP products, over all `batch * N` tokens. Training
    adds the pixel head's products, and for every forward product `(m, k, n)`
    the two of its backward pass, `(m, n, k)` (input gradient) and
    `(k, m, n)` (weight gradient). The attention's batched `N x N` products
    are left out (a few percent of the FLOPs at N >= 64 tokens).
    """
    p, d = config["patch_size"], config["hidden_dim"]
    tokens = config["batch_size"] * (config["image_size"] // p) ** 2
    pixels, depth, hidden = p * p * 3, config["num_layers"], 4 * config["hidden_dim"]
    forward = collections.Counter({(tokens, pixels, d): 1})
    for shape in ((d, 3 * d), (d, d), (d, hidden), (hidden, d)):
        forward[(tokens, *shape)] += depth
    if mode == "train":
        w = config["head_width"]
        forward[(tokens, d, w)] += 1
        forward[(tokens, w, 4 * w)] += config["head_depth"]
        forward[(tokens, 4 * w, w)] += config["head_depth"]
        forward[(tokens, w, pixels)] += 1
        products = collections.Counter()
        for (m, k, n), count in forward.items():
            for shape in ((m, k, n), (m, n, k), (k, m, n)):
                products[shape] += count
        return dict(products)
    return dict(forward)


def combined_rate(seconds: dict, shapes: dict) -> float:
    """FLOP/s of running every product of `shapes` (`{(m, k, n): count}`)
    once per count, given `seconds[(m, k, n)]` for one product: total FLOPs
    over total time, so each shape weighs by its share of the step's time."""
    flops = sum(2 * m * k * n * count for (m, k, n), count in shapes.items())
    return flops / sum(seconds[shape] * count for shape, count in shapes.items())


def _matmul_timer(framework: str, dtype: str):
    """`time(m, k, n) -> seconds` of one `(m, k) @ (k, n)` product in
    `framework` (the fastest of a few after a warm-up call)."""
    if framework == "jax":
        import jax
        import jax.numpy as jnp

        product = jax.jit(jnp.matmul)

        def make(shape):
            return jax.random.normal(jax.random.key(0), shape, getattr(jnp, dtype))

        def run(a, b):
            product(a, b).block_until_ready()
    elif framework == "torch":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"

        def make(shape):
            return torch.randn(shape, dtype=getattr(torch, dtype), device=device)

        def run(a, b):
            # A local no_grad: this worker also runs inside other processes
            # (tests), whose autograd state it must leave as it found it.
            with torch.no_grad():
                torch.mm(a, b)
            if device == "cuda":
                torch.cuda.synchronize()
    elif framework == "tensorflow":
        import tensorflow as tf

        @tf.function(jit_compile=False)
        def product(a, b):
            return tf.linalg.matmul(a, b)

        def make(shape):
            return tf.cast(tf.random.normal(shape), dtype)

        def run(a, b):
            product(a, b).numpy()  # waits for the result; (m, n) is small next to the work
    else:
        raise ValueError(f"unknown framework {framework!r}")

    def time_one(m: int, k: int, n: int, budget: float = 0.6) -> float:
        a, b = make((m, k)), make((k, n))
        run(a, b)
        times = []
        while len(times) < 3 or (sum(times) < budget and len(times) < 15):
            start = time.perf_counter()
            run(a, b)
            times.append(time.perf_counter() - start)
        return min(times)

    return time_one


def matmul_rates(framework: str, dtypes, shape_sets: dict) -> dict:
    """This framework's matmul rates (FLOP/s), per dtype: `square`, the
    `SQUARE`^3 product, and one rate per named set of model GEMM shapes."""
    rates = {}
    for dtype in dtypes:
        time_one = _matmul_timer(framework, dtype)
        rate = {"square": 2 * SQUARE**3 / time_one(SQUARE, SQUARE, SQUARE)}
        seconds = {}
        for name, shapes in shape_sets.items():
            for shape in shapes:
                if shape not in seconds:
                    seconds[shape] = time_one(*shape)
            rate[name] = combined_rate(seconds, shapes)
        rates[dtype] = rate
    return rates


# --- Worker: one target in its own process ---------------------------------


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as handle:
        line = next(l for l in handle if l.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def _time_runs(step, calls: int, runs: int, warmup: int, sync,
               budget: float = 30.0) -> list[float]:
    """Seconds per call of each run, after `warmup` calls.

    One more call measures the step; a run then has up to `calls` calls
    (fewer, down to 1, when a call takes more than a second) and there are
    up to `runs` runs (fewer, down to 2, when they would take more than
    `budget` seconds), so that a model of 600M parameters is timed in about
    `budget` seconds like a small one."""
    for _ in range(warmup):
        step()
    sync()
    start = time.perf_counter()
    step()
    sync()
    once = time.perf_counter() - start
    calls = max(1, min(calls, round(1.0 / max(once, 1e-9))))
    runs = max(min(2, runs), min(runs, int(budget / (once * calls))))
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

    if args.dtype_policy != "float32":
        keras.config.set_dtype_policy(args.dtype_policy)  # bfloat16 or mixed_bfloat16
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
            args.warmup, sync=lambda: None, budget=args.budget)  # NumPy out: synced
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
            args.runs, args.warmup, sync=lambda: None, budget=args.budget)  # a float
        results["train_peak"] = _peak_memory()
    return results


def _torch_worker(args, config, compiled: bool) -> dict:
    import torch

    sys.path.insert(0, HERE)
    import torch_reference_aim as reference

    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    dtype = torch.bfloat16 if args.dtype_policy == "mixed_bfloat16" else None
    weights = torch.bfloat16 if args.dtype_policy == "bfloat16" else torch.float32
    torch.manual_seed(0)
    size = config["image_size"]
    images = torch.randn(config["batch_size"], 3, size, size, device=device, dtype=weights)
    model = reference.TorchAIM(
        image_size=size, patch_size=config["patch_size"],
        hidden_dim=config["hidden_dim"], num_layers=config["num_layers"],
        num_heads=config["num_heads"], head_width=config["head_width"],
        head_depth=config["head_depth"]).to(device, weights)
    autocast = (lambda: torch.autocast(device, dtype=dtype)) if dtype else _nothing

    results = {}
    if "inference" in args.modes:
        trunk = torch.compile(model) if compiled else model

        def infer():
            with torch.inference_mode(), autocast():
                return trunk(images).mean(1)  # as the Keras targets

        results["inference"] = _time_runs(infer, args.calls, args.runs, args.warmup, sync,
                                          args.budget)
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
            train, max(1, args.calls // 4), args.runs, args.warmup, sync, args.budget)
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
    if args.worker in MATMUL_WORKERS:
        plan = json.loads(args.matmul_plan)
        sets = {name: {tuple(row[:3]): row[3] for row in rows}
                for name, rows in plan["sets"].items()}
        rates = matmul_rates(args.worker.split("-", 1)[1], plan["dtypes"], sets)
        print("RESULT " + json.dumps(rates), flush=True)
        return
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


def resolve_config(args, name: str | None = None, batch_size: int | None = None) -> dict:
    """Config `name` (default `args.config`) with the size flags of `args`
    and then `batch_size` applied."""
    config = dict(CONFIGS[name or args.config])
    for key in config:
        value = getattr(args, key, None)
        if value is not None:
            config[key] = value
    if batch_size is not None:
        config["batch_size"] = batch_size
    return config


def parse_case(spec: str, args) -> dict:
    """One measured case from `CONFIG[@BATCH][/MODES][/DTYPES]`, e.g.
    `aim_600m@4/inference/float32,bfloat16`: modes and dtypes are
    comma-separated, in either order; those not given come from `--modes`
    and `--dtype`."""
    head, *lists = spec.split("/")
    name, _, batch = head.partition("@")
    if name not in CONFIGS:
        raise ValueError(f"unknown config {name!r} in {spec!r}; known: {', '.join(CONFIGS)}")
    modes, dtypes = list(args.modes), list(args.dtype)
    for part in lists:
        items = [item for item in part.split(",") if item]
        if items and all(item in MODES for item in items):
            modes = items
        elif items and all(item in DTYPES for item in items):
            dtypes = items
        else:
            raise ValueError(f"{part!r} in {spec!r} is neither modes {MODES} nor dtypes {DTYPES}")
    config = resolve_config(args, name, int(batch) if batch else None)
    return {"name": name, "label": f"{name} b{config['batch_size']}", "config": config,
            "modes": modes, "dtypes": dtypes}


def compute_dtype(dtype: str) -> str:
    """The dtype the matrix products run in under a dtype policy."""
    return "bfloat16" if "bfloat16" in dtype else "float32"


def matmul_plan(cases: list[dict]) -> dict:
    """What each matmul worker measures: the compute dtypes and, per
    `label/mode`, the model's GEMM shapes (`gemm_shapes`)."""
    dtypes = sorted({"float32"} | {compute_dtype(d) for c in cases for d in c["dtypes"]},
                    key=DTYPES.index)
    sets = {f"{c['label']}/{mode}": [[*shape, count] for shape, count in
                                     gemm_shapes(c["config"], mode).items()]
            for c in cases for mode in c["modes"]}
    return {"dtypes": dtypes, "sets": sets}


def best_rates(readings: dict) -> dict:
    """`{framework: {dtype: {key: FLOP/s}}}`, the highest of each framework's
    readings (one per round; a slow reading is noise)."""
    best = {}
    for framework, rounds in readings.items():
        for reading in rounds:
            for dtype, rates in reading.items():
                for key, rate in rates.items():
                    slot = best.setdefault(framework, {}).setdefault(dtype, {})
                    slot[key] = max(slot.get(key, 0.0), rate)
    return best


def machine_rate(rates: dict) -> float | None:
    """The machine's float32 matmul rate: the fastest of the square
    products of `MACHINE_RATE_FRAMEWORKS` (JAX and PyTorch) that were
    measured, in `best_rates`' form."""
    found = [rates[f]["float32"]["square"] for f in MACHINE_RATE_FRAMEWORKS
             if "square" in rates.get(f, {}).get("float32", {})]
    return max(found) if found else None


def _run(command: list[str], env: dict, timeout: float) -> dict:
    start = time.perf_counter()
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        return {"error": (out.stderr or out.stdout).strip().splitlines()[-1:] or ["?"],
                "wall": time.perf_counter() - start}
    result = json.loads(lines[-1][len("RESULT "):])
    result["wall"] = time.perf_counter() - start
    return result


def _environment(backend: str | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "TF_CPP_MIN_LOG_LEVEL": "3"}
    if backend:
        env["KERAS_BACKEND"] = backend
    return env


def measure_target(target: str, args, case: dict | None = None, dtype: str | None = None) -> dict:
    """One fresh process of `target` on `case` (default: the flags' config)
    in `dtype`."""
    if case is None:
        case = parse_case(args.config, args)
    backend = target.split("-", 1)[1] if target in KERAS_TARGETS else None
    command = [sys.executable, os.path.abspath(__file__), "--worker", target]
    command += _forwarded_arguments(args, case, dtype or case["dtypes"][0])
    return _run(command, _environment(backend), args.target_timeout)


def measure_matmuls(framework: str, plan: dict, timeout: float) -> dict:
    """One fresh process measuring `framework`'s matmul rates (`plan`)."""
    command = [sys.executable, os.path.abspath(__file__), "--worker", f"matmul-{framework}",
               "--matmul-plan", json.dumps(plan)]
    return _run(command, _environment(), timeout)


def _forwarded_arguments(args, case: dict, dtype: str) -> list[str]:
    forwarded = ["--config", case["name"], "--dtype", dtype, "--runs", str(args.runs),
                 "--calls", str(args.calls), "--warmup", str(args.warmup),
                 "--budget", str(args.budget), "--modes", *case["modes"]]
    for key in CONFIGS["cpu"]:
        value = case["config"][key] if key == "batch_size" else getattr(args, key)
        if value is not None:
            forwarded += ["--" + key.replace("_", "-"), str(value)]
    if args.remat:
        forwarded.append("--remat")
    forwarded += ["--jit-compile", args.jit_compile]
    if args.flash_attention is not None:
        forwarded += ["--flash-attention", str(args.flash_attention).lower()]
    return forwarded


def table_rows(results: dict, case: dict, rates: dict, peaks: dict | None = None) -> list[dict]:
    """One row per (target, dtype, mode) of `case` from `results[(target,
    dtype)]`, a list of worker results (one per fresh process, i.e. per
    `--repeats` round), against `rates` (`best_rates`' form).

    A process's speed is the median of its runs. The row reports the fastest
    process, like the matmul rates report their highest reading: on a shared
    machine noise only ever slows a process down, so the fastest one is the
    closest to what the code can do. The range (slowest-fastest process) and
    the median over processes are reported with it. `of_matmul` is over the
    machine's float32 rate (`machine_rate`), `of_own_gemm` over the rate of
    the target's own framework on this case's GEMM shapes in the compute
    dtype; `vs_torch_eager` compares with plain PyTorch eager in the same
    dtype, `vs_float32` with the same target in float32."""
    config = case["config"]
    flops = step_flops(config)
    batch = config["batch_size"]
    machine = machine_rate(rates)

    def speeds(target, dtype, mode):
        return [batch / statistics.median(r[mode])
                for r in results.get((target, dtype), []) if mode in r]

    rows = []
    for mode in case["modes"]:
        for (target, dtype), processes in results.items():
            measured = speeds(target, dtype, mode)
            if not measured:
                continue
            images_per_s = max(measured)
            achieved = images_per_s * flops[mode]
            own = (rates.get(FRAMEWORK_OF[target], {}).get(compute_dtype(dtype), {})
                   .get(f"{case['label']}/{mode}"))
            eager = speeds("torch-eager", dtype, mode)
            float32 = speeds(target, "float32", mode)
            rows.append({
                "size": case["label"], "target": target, "mode": mode, "dtype": dtype,
                "batch": batch, "processes": len(measured),
                "ms_per_step": 1e3 * batch / images_per_s, "images_per_s": images_per_s,
                "gflops": achieved / 1e9,
                "of_matmul": achieved / machine if machine else None,
                "of_matmul_min": min(measured) * flops[mode] / machine if machine else None,
                "of_matmul_median": (statistics.median(measured) * flops[mode] / machine
                                     if machine else None),
                "of_own_gemm": achieved / own if own else None,
                "mfu": achieved / peaks[dtype] if peaks and peaks.get(dtype) else None,
                "vs_torch_eager": images_per_s / max(eager) if eager else None,
                "vs_float32": (images_per_s / max(float32)
                               if float32 and dtype != "float32" else None),
                "peak_memory_gb": max(r[mode + "_peak"] for r in processes if mode in r) / 1e9,
            })
    return rows


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def _ratio(value) -> str:
    return "-" if value is None else f"{value:.2f}x"


def format_table(rows: list[dict], markdown: bool = False, mfu: bool = False) -> str:
    header = ["size", "target", "mode", "dtype", "ms/step", "images/s", "GFLOP/s",
              "of machine", "range", "of own GEMMs", "vs torch eager", "vs float32",
              "peak mem GB"] + (["MFU"] if mfu else [])
    lines = []
    for row in rows:
        low = row["of_matmul_min"]
        cells = [row["size"], row["target"], row["mode"], row["dtype"],
                 f"{row['ms_per_step']:.1f}", f"{row['images_per_s']:.2f}",
                 f"{row['gflops']:.1f}", _percent(row["of_matmul"]),
                 "-" if low is None else f"{100 * low:.0f}-{100 * row['of_matmul']:.0f}%",
                 _percent(row["of_own_gemm"]), _ratio(row["vs_torch_eager"]),
                 _ratio(row["vs_float32"]), f"{row['peak_memory_gb']:.2f}"]
        if mfu:
            cells.append("-" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%")
        lines.append(cells)
    return _render(header, lines, markdown)


def _render(header: list[str], lines: list[list[str]], markdown: bool) -> str:
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(cells) + " |" for cells in lines]
        return "\n".join(out)
    widths = [max(len(h), *(len(c[i]) for c in lines)) if lines else len(h)
              for i, h in enumerate(header)]
    fmt = "  ".join("{:>%d}" % w for w in widths)
    return "\n".join([fmt.format(*header)] + [fmt.format(*cells) for cells in lines])


def format_rates(rates: dict, markdown: bool = False) -> str:
    """The yardstick: each framework's matmul rates (GFLOP/s, best reading)
    on the square product and on each case's GEMM shapes."""
    keys = ["square"] + sorted({k for f in rates.values() for d in f.values() for k in d
                                if k != "square"})
    header = ["framework", "dtype", f"{SQUARE}^3"] + [k.replace("/", " ") + " GEMMs"
                                                     for k in keys[1:]]
    lines = []
    for framework, by_dtype in rates.items():
        for dtype, values in by_dtype.items():
            lines.append([framework, dtype] + [f"{values[k] / 1e9:.1f}" if k in values else "-"
                                               for k in keys])
    return _render(header, lines, markdown)


def write_chart(rows: list[dict], path: str, title: str) -> None:
    """One panel per (size, mode): each row's share of the machine's float32
    matmul rate, whiskers down to the slowest process."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((r["size"], r["mode"]) for r in rows))
    columns = min(2, len(panels))
    lines = -(-len(panels) // columns)
    figure, axes = plt.subplots(lines, columns, figsize=(6 * columns, 0.5 + 2.9 * lines),
                                squeeze=False)
    for axis in axes.flat[len(panels):]:
        axis.set_visible(False)
    for axis, (size, mode) in zip(axes.flat, panels):
        picked = [r for r in rows if (r["size"], r["mode"]) == (size, mode)]
        names = [f"{r['target']} {r['dtype']}" for r in picked]
        values = [100 * r["of_matmul"] for r in picked]
        slowest = [100 * r["of_matmul_min"] for r in picked]
        bars = axis.barh(names, values, color=["#3b75af" if n.startswith("keras") else "#999999"
                                               for n in names])
        axis.errorbar(values, range(len(picked)), fmt="none", ecolor="#333333", capsize=3,
                      xerr=[[v - low for v, low in zip(values, slowest)], [0] * len(values)])
        for bar, row in zip(bars, picked):
            axis.text(bar.get_width() + 1, bar.get_y() + bar.get_height() / 2,
                      f"{row['images_per_s']:.3g} img/s", va="center", fontsize=7)
        axis.set_xlim(0, max(110, max(values) + 35))
        axis.invert_yaxis()
        axis.tick_params(axis="y", labelsize=7)
        axis.set_xlabel("% of the machine's float32 matmul rate", fontsize=8)
        axis.set_title(f"{size}: {'pre-training step' if mode == 'train' else mode}",
                       fontsize=9)
    figure.suptitle(title, fontsize=8)
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
    parser.add_argument("--cases", nargs="+", default=None, metavar="CONFIG[@BATCH][/..]",
                        help="several sizes in one run, e.g. cpu aim_600m@4/inference/"
                             "float32,bfloat16 (default: --config with the flags)")
    for key in CONFIGS["cpu"]:
        parser.add_argument("--" + key.replace("_", "-"), type=int, default=None)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--dtype", nargs="+", choices=DTYPES, default=["float32"],
                        help="dtype policies, each target runs in each")
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
    parser.add_argument("--budget", type=float, default=30.0,
                        help="seconds of timed runs per process: fewer calls and runs "
                             "(at least 1 and 2) where a call is slow")
    parser.add_argument("--target-timeout", type=int, default=600)
    parser.add_argument("--csv", default=None)
    parser.add_argument("--markdown-out", default=None)
    parser.add_argument("--chart", default=None, help="PNG path, e.g. docs/throughput.png")
    parser.add_argument("--worker", choices=ALL_TARGETS + MATMUL_WORKERS, help=argparse.SUPPRESS)
    parser.add_argument("--matmul-plan", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker in ALL_TARGETS and len(args.dtype) != 1:
        parser.error("a worker runs one dtype")
    args.dtype_policy = args.dtype[0]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        run_worker(args)
        return 0
    targets = ALL_TARGETS if args.all_backends or not args.targets else args.targets
    cases = [parse_case(spec, args) for spec in (args.cases or [args.config])]
    plan = matmul_plan(cases)
    frameworks = list(dict.fromkeys([*MACHINE_RATE_FRAMEWORKS,
                                     *(FRAMEWORK_OF[t] for t in targets)]))
    started = time.perf_counter()
    readings = {framework: [] for framework in frameworks}
    results = {(c["label"], t, d): [] for c in cases for d in c["dtypes"] for t in targets}
    errors = {}

    def read_matmul_rates():
        for framework in frameworks:
            reading = measure_matmuls(framework, plan, args.target_timeout)
            if "error" in reading:
                errors[f"matmul-{framework}"] = reading["error"][0]
            else:
                reading.pop("wall")
                readings[framework].append(reading)

    for round_index in range(args.repeats):
        read_matmul_rates()
        for case in cases:
            for dtype in case["dtypes"]:
                for target in targets:
                    key = (case["label"], target, dtype)
                    if key in errors:
                        continue
                    result = measure_target(target, args, case, dtype)
                    status = "ok"
                    if "error" in result:
                        errors[key] = status = result["error"][0]
                    else:
                        results[key].append(result)
                    print(f"round {round_index + 1}/{args.repeats} {case['label']} {target} "
                          f"{dtype}: {status} ({result['wall']:.0f} s)", flush=True)
    read_matmul_rates()
    rates = best_rates(readings)
    machine = machine_rate(rates)

    measured = [r for found in results.values() for r in found]
    device = measured[0]["device"] if measured else _device_name()
    peaks = _device_peaks(args, device, machine)
    rows = []
    for case in cases:
        mine = {(t, d): found for (label, t, d), found in results.items()
                if label == case["label"] and found}
        rows += table_rows(mine, case, rates, peaks)
    notes = run_notes(cases, targets, args, device, rates, machine)
    print()
    print("\n".join(notes))
    print(format_rates(rates))
    print(format_table(rows, mfu=args.report_mfu))
    for key, error in errors.items():
        print(f"{key}: failed: {error}")
    print(f"total {time.perf_counter() - started:.0f} s")

    if args.csv and rows:
        with atomic_file(args.csv) as staging, open(staging, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    if args.markdown_out and rows:
        text = "\n".join(f"{line}  " for line in notes) + "\n\n"
        text += format_rates(rates, markdown=True) + "\n\n"
        _write_text(args.markdown_out, text + format_table(rows, True, args.report_mfu) + "\n")
    if args.chart and rows:
        write_chart(rows, args.chart, notes[0])
    return 0 if measured else 1


def describe_case(case: dict) -> str:
    c = case["config"]
    return (f"{case['label']}: AIM {c['hidden_dim']}x{c['num_layers']} ({c['num_heads']} heads), "
            f"patch {c['patch_size']}, {c['image_size']} px, batch {c['batch_size']}, pixel "
            f"head {c['head_width']}x{c['head_depth']}; {'/'.join(case['modes'])}; "
            f"{', '.join(case['dtypes'])}")


def run_notes(cases, targets, args, device, rates, machine) -> list[str]:
    """The lines above a run's tables: what, where, when, the yardstick."""
    square = {f: rates[f]["float32"]["square"] for f in MACHINE_RATE_FRAMEWORKS
              if "square" in rates.get(f, {}).get("float32", {})}
    rate_note = ("machine float32 matmul rate: not measured" if machine is None else
                 f"machine float32 matmul rate {machine / 1e9:.1f} GFLOP/s: the fastest of "
                 + ", ".join(f"{f} {r / 1e9:.1f}" for f, r in square.items())
                 + f" on a {SQUARE}^3 product, highest of {args.repeats + 1} readings each")
    notes = [f"{device}; {describe_cpu()}",
             f"date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {_versions()}",
             f"{args.repeats} fresh process(es) per target, run in rounds; each process's "
             f"median run; the fastest process (range: slowest-fastest)",
             rate_note]
    notes += [describe_case(case) + "; FLOPs per image: " + ", ".join(
        f"{mode} {step_flops(case['config'])[mode] / 1e9:.1f} G" for mode in case["modes"])
        for case in cases]
    return notes


def _device_peaks(args, device: str, machine: float | None) -> dict | None:
    """Peak FLOP/s per dtype policy for --report-mfu."""
    if not args.report_mfu:
        return None
    if args.peak_tflops:
        return {d: args.peak_tflops * 1e12 for d in DTYPES}
    for name, (bf16, fp32) in DEVICE_PEAKS.items():
        if name in device:
            return {d: bf16 if compute_dtype(d) == "bfloat16" else fp32 for d in DTYPES}
    return {d: machine for d in DTYPES}


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
