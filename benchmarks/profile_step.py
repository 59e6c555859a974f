"""Where the time of AIM inference and of a pre-training step goes, on the
current Keras backend.

Uses a case of `throughput.py` (`--cases CONFIG[@BATCH][/MODES]`, default its
small CPU config, or the size flags) and prints:

  JAX:      for inference, the XLA:CPU operations of one `predict_on_batch`
            of the trunk by kind (matrix products with their GFLOP/s,
            transposing copies, other fusions) and the slowest ones; for
            training, median times of the compiled pieces of the step (trunk
            forward, trunk + pixel head + loss, forward + backward, the whole
            `train_on_batch`), then the step's operations by kind. From
            `jax.profiler` traces.
  TensorFlow: the oneDNN primitives of the calls (matrix products,
            attention's batched products, softmax, the patch convolution),
            each with its ms per call and, for products, GFLOP/s from its
            shape, against the call's wall time; the rest is TensorFlow's own
            kernels (norms, GELU, adds, transposes). From `ONEDNN_VERBOSE`,
            which `main` sets before TensorFlow starts.
  PyTorch:  the trunk's forward through Keras (`predict_on_batch`, a call
            under `torch.inference_mode`) against the plain PyTorch model of
            `torch_reference_aim.py` on the same weights, then the
            torch.profiler operator tables (self CPU time, top operators) of
            a Keras inference call and, for training, a Keras step.

    KERAS_BACKEND=jax python benchmarks/profile_step.py
    KERAS_BACKEND=jax python benchmarks/profile_step.py --cases aim_600m@4/inference
    KERAS_BACKEND=tensorflow python benchmarks/profile_step.py --cases aim_600m@4/inference
    KERAS_BACKEND=torch python benchmarks/profile_step.py --cases aim_600m@4/inference

A measurement, not a test.
"""

from __future__ import annotations

import collections
import contextlib
import glob
import gzip
import json
import math
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import throughput  # noqa: E402


def _median_ms(function, repeats: int = 5, warmup: int = 2) -> float:
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def build(config: dict, train: bool = True):
    """`(backbone, pretrainer)`, the pretrainer compiled, or `None` when
    `train` is false."""
    import keras

    import keras_aim

    keras.utils.set_random_seed(0)
    size = config["image_size"]
    backbone = keras_aim.AIMBackbone(
        image_shape=(size, size, 3), patch_size=config["patch_size"],
        hidden_dim=config["hidden_dim"], num_layers=config["num_layers"],
        num_heads=config["num_heads"])
    if not train:
        return backbone, None
    pretrainer = keras_aim.AIMPretrainer(
        backbone, pixel_head_width=config["head_width"],
        pixel_head_depth=config["head_depth"], seed=0)
    pretrainer.compile()
    return backbone, pretrainer


def pooled_trunk(backbone):
    """The trunk with its tokens mean-pooled, as `throughput.py` times it."""
    import keras

    return keras.Model(backbone.input, keras.ops.mean(backbone.output, axis=1))


def _large(config: dict) -> bool:
    """Whether a call takes seconds here (over 20 GFLOP per inference)."""
    return throughput.step_flops(config)["inference"] * config["batch_size"] > 20e9


def _timing(config: dict) -> tuple[int, int]:
    """`(timed calls, warm-up calls)`: one each where a call takes seconds."""
    return (1, 1) if _large(config) else (5, 2)


def profile_jax(config: dict, images):
    """`(rows, step)`: the (piece, median ms) rows and the timed training step."""
    import jax

    from keras_aim.training.losses import next_patch_pixel_loss

    backbone, pretrainer = build(config)
    variables = [v.value for v in pretrainer.trainable_variables]
    seed_state = [v.value for v in pretrainer.non_trainable_variables]
    count = len(backbone.trainable_variables)
    patch = config["patch_size"]

    def loss(trainable):
        outputs, _ = pretrainer.stateless_call(
            trainable, seed_state, images, training=True)
        return next_patch_pixel_loss(
            images, outputs["predictions"], outputs["prefix_lengths"], patch)

    trunk = jax.jit(lambda t: backbone.stateless_call(t[:count], [], images)[0])
    forward = jax.jit(loss)
    gradients = jax.jit(jax.grad(loss))
    ready = jax.block_until_ready
    repeats, warmup = _timing(config)
    rows = [
        ("trunk forward (inference)", _median_ms(lambda: ready(trunk(variables)), repeats, warmup)),
        ("trunk + pixel head + loss forward",
         _median_ms(lambda: ready(forward(variables)), repeats, warmup)),
        ("forward + backward", _median_ms(lambda: ready(gradients(variables)), repeats, warmup)),
    ]
    host_images = jax.device_get(images)
    rows.append(("train_on_batch (+ clip, AdamW)",
                 _median_ms(lambda: pretrainer.train_on_batch(host_images), min(repeats, 3),
                            warmup)))
    return rows, lambda: pretrainer.train_on_batch(host_images)


def operation_kind(name: str) -> str:
    """The kind of an XLA:CPU thunk, from its name in the trace."""
    base = name.split(".")[0]
    if base.startswith(("ynn_fusion", "xnn_fusion", "onednn", "dot", "convolution")):
        return "matrix products (dot, YNNPACK fusions, convolution)"
    if base.startswith(("copy", "transpose")):
        return "transposing copies (loop fusions that write a transpose)"
    if "fusion" in base or base.startswith("wrapped_"):
        return "other element-wise / reduction fusions"
    return "runtime (transfers, waits)"


def trace_by_kind(step, steps: int = 4):
    """Per-step milliseconds of the XLA:CPU thunks of `step()`, by kind and
    the slowest ones, from a `jax.profiler` trace (needs
    `--xla_cpu_enable_xprof_traceme`, set by `main` before JAX starts)."""
    import jax

    with tempfile.TemporaryDirectory() as directory:
        with jax.profiler.trace(directory, create_perfetto_trace=True):
            for _ in range(steps):
                step()
        path = glob.glob(os.path.join(directory, "**", "*.trace.json.gz"), recursive=True)[0]
        with gzip.open(path) as handle:
            events = json.load(handle)
    events = events["traceEvents"] if isinstance(events, dict) else events
    per_op = collections.Counter()
    for event in events:
        name = event.get("name", "")
        if (event.get("ph") != "X" or name.startswith(("$", "end:")) or "Execute" in name
                or "Pjit" in name or "Await" in name):
            continue
        per_op[name] += event["dur"] / 1e3 / steps
    kinds = collections.Counter()
    for name, ms in per_op.items():
        kinds[operation_kind(name)] += ms
    return kinds, per_op


def profile_torch(config: dict, images, modes) -> str:
    import keras
    import torch
    from torch.profiler import profile

    import torch_reference_aim as reference

    backbone, pretrainer = build(config, train="train" in modes)
    trunk = pooled_trunk(backbone)
    trunk.predict_on_batch(images)

    plain = reference.TorchAIM(
        image_size=config["image_size"], patch_size=config["patch_size"],
        hidden_dim=config["hidden_dim"], num_layers=config["num_layers"],
        num_heads=config["num_heads"], head_width=config["head_width"], head_depth=0)
    reference.copy_keras_weights(plain, backbone)
    plain.eval()
    tensor = torch.from_numpy(images)
    nchw = tensor.permute(0, 3, 1, 2).contiguous()

    def keras_call():
        with torch.inference_mode():
            return backbone(tensor)

    def plain_call():
        with torch.inference_mode():
            return plain(nchw)

    def count_layer_calls() -> int:
        calls = [0]
        original = keras.layers.Layer.__call__

        def counting(self, *args, **kwargs):
            calls[0] += 1
            return original(self, *args, **kwargs)

        keras.layers.Layer.__call__ = counting
        try:
            keras_call()
        finally:
            keras.layers.Layer.__call__ = original
        return calls[0]

    repeats = 3 if _large(config) else 15
    forward = [
        ("Keras predict_on_batch (NumPy in and out)",
         _median_ms(lambda: trunk.predict_on_batch(images), repeats)),
        ("Keras call under torch.inference_mode", _median_ms(keras_call, repeats)),
        ("plain PyTorch model, same weights", _median_ms(plain_call, repeats)),
    ]
    lines = [f"forward of the trunk ({count_layer_calls()} Keras layer calls per forward):"]
    lines += [f"  {name:<44}{ms:>8.1f} ms" for name, ms in forward]
    tables = ["\n".join(lines)]
    steps = [("Keras inference", lambda: trunk.predict_on_batch(images)),
             ("plain PyTorch inference", plain_call)]
    if pretrainer is not None:
        pretrainer.train_on_batch(images)
        steps.append(("Keras pre-training step", lambda: pretrainer.train_on_batch(images)))
    for name, step in steps:
        with profile() as recorded:
            step()
        tables.append(f"{name}:\n" + recorded.key_averages().table(
            sort_by="self_cpu_time_total", row_limit=12))
    return "\n".join(tables)


@contextlib.contextmanager
def _stdout_to(path: str):
    """Send file descriptor 1 (where oneDNN writes its verbose lines, one
    flushed line each) to `path` for the duration."""
    sys.stdout.flush()
    saved = os.dup(1)
    with open(path, "ab") as target:
        os.dup2(target.fileno(), 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def product_flops(problem: str) -> float:
    """FLOPs of a oneDNN matmul from its verbose problem, e.g.
    `1024x1536:1536x4608` or `4x12x256x128:4x12x128x256` (batch dims lead)."""
    left, right = (tuple(int(d) for d in side.split("x")) for side in problem.split(":"))
    return 2.0 * math.prod(left[:-2]) * left[-2] * left[-1] * right[-1]


def onednn_primitives(lines) -> dict:
    """`{(kind, problem): [total ms, executions]}` from the `primitive,exec`
    lines of oneDNN's verbose output (other lines are skipped)."""
    totals = collections.defaultdict(lambda: [0.0, 0])
    for line in lines:
        fields = line.strip().split(",")
        if not fields[0].endswith("_verbose") or "exec" not in fields[:5]:
            continue
        where = fields.index("exec")
        try:
            ms = float(fields[-1])
            entry = totals[(fields[where + 2], fields[-2])]
        except (IndexError, ValueError):
            continue
        entry[0] += ms
        entry[1] += 1
    return dict(totals)


def profile_tensorflow(name: str, step, calls: int, warmup: int) -> None:
    """Print one call of `step` split into oneDNN primitives and the rest."""
    with tempfile.TemporaryDirectory() as directory:
        log = os.path.join(directory, "onednn.log")
        with _stdout_to(os.devnull):
            for _ in range(warmup):
                step()
        with _stdout_to(log):
            start = time.perf_counter()
            for _ in range(calls):
                step()
            wall = 1e3 * (time.perf_counter() - start) / calls
        with open(log, errors="replace") as handle:
            totals = onednn_primitives(handle)
    print(f"\n{name}: {wall:.1f} ms per call (mean of {calls}), by oneDNN primitive:")
    if not totals:
        print("  no oneDNN primitive ran (is TF_ENABLE_ONEDNN_OPTS=0 set?)")
        return
    inside = sum(ms for ms, _ in totals.values()) / calls
    slowest = sorted(totals.items(), key=lambda item: -item[1][0])[:12]
    for (kind, problem), (ms, count) in slowest:
        rate = (f"  {count * product_flops(problem) / ms / 1e6:.0f} GFLOP/s"
                if kind in ("gemm_api", "matmul") and ms else "")
        ms /= calls
        print(f"  {kind + ' ' + problem:<60}{ms:>9.1f} ms{100 * ms / wall:>6.0f}%{rate}")
    print(f"  {'all oneDNN primitives':<60}{inside:>9.1f} ms{100 * inside / wall:>6.0f}%")
    if inside <= wall:
        print(f"  {'the rest (TensorFlow kernels, runtime)':<60}{wall - inside:>9.1f} ms"
              f"{100 * (wall - inside) / wall:>6.0f}%")
    else:
        print("  (more than the wall time: TensorFlow ran some primitives concurrently,"
              " so the rest cannot be told apart)")


def print_kinds(kinds, per_op, what: str, matrix_flops: float) -> None:
    """The trace's operations by kind (matrix products with their GFLOP/s
    from the analytic count) and the slowest ones."""
    traced = sum(kinds.values())
    print(f"\n{what} by kind of XLA operation (trace; {traced:.0f} ms of thunks per call):")
    for kind, ms in kinds.most_common():
        rate = (f"  {matrix_flops / ms / 1e6:.0f} GFLOP/s"
                if kind.startswith("matrix") and ms else "")
        print(f"  {kind:<60}{ms:>9.1f} ms{100 * ms / traced:>6.0f}%{rate}")
    print("slowest operations:")
    for name, ms in per_op.most_common(8):
        print(f"  {name:<60}{ms:>9.1f} ms  ({operation_kind(name).split(' (')[0]})")


def main(argv=None) -> int:
    backend = os.environ.get("KERAS_BACKEND", "jax")
    if backend == "jax":
        # Per-operation events in jax.profiler traces (before JAX starts).
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + " --xla_cpu_enable_xprof_traceme=true").strip()
    elif backend == "tensorflow":
        # One line per executed oneDNN primitive (read when oneDNN starts).
        os.environ["ONEDNN_VERBOSE"] = "1"
    import keras
    import numpy as np

    args = throughput.parse_args(argv)
    case = throughput.parse_case((args.cases or [args.config])[0], args)
    config, modes = case["config"], case["modes"]
    size, batch = config["image_size"], config["batch_size"]
    images = np.random.default_rng(0).standard_normal(
        (batch, size, size, 3), dtype=np.float32)
    backend = keras.config.backend()
    flops = {mode: batch * value for mode, value in throughput.step_flops(config).items()}
    print(f"backend {backend}; {throughput.describe_case(case)}; "
          f"{throughput.describe_cpu()}")
    print(f"(analytic: inference {flops['inference'] / 1e9:.1f} GFLOP, "
          f"pre-training step {flops['train'] / 1e9:.1f} GFLOP per batch)")
    if backend == "jax":
        if "inference" in modes:
            trunk = pooled_trunk(build(config, train=False)[0])
            infer = lambda: trunk.predict_on_batch(images)  # noqa: E731
            print(f"predict_on_batch of the trunk: {_median_ms(infer, 3):.1f} ms")
            print_kinds(*trace_by_kind(infer, steps=2), "inference", flops["inference"])
        if "train" in modes:
            rows, step = profile_jax(config, images)
            total = rows[-1][1]
            print(f"\n{'piece':<36}{'ms':>9}{'of step':>9}")
            for name, ms in rows:
                print(f"{name:<36}{ms:>9.1f}{100 * ms / total:>8.0f}%")
            print_kinds(*trace_by_kind(step, steps=1 if _large(config) else 4),
                        "compiled train step", flops["train"])
    elif backend == "torch":
        print(profile_torch(config, images, modes))
    elif backend == "tensorflow":
        calls, warmup = _timing(config)
        if "inference" in modes:
            trunk = pooled_trunk(build(config, train=False)[0])
            profile_tensorflow("predict_on_batch of the trunk",
                               lambda: trunk.predict_on_batch(images), calls, warmup)
        if "train" in modes:
            pretrainer = build(config)[1]
            profile_tensorflow("train_on_batch of the pretrainer",
                               lambda: pretrainer.train_on_batch(images), calls, warmup)
    else:
        print(f"profile_step.py covers the JAX, TensorFlow and PyTorch backends, not {backend}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
