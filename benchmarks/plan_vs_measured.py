"""recipes.plan's memory figures against the measured peak of real
training steps (JAX, float32, one CPU device).

Each configuration runs in a fresh process: imports and a first jitted op,
then (RSS baseline) builds an `AIMPretrainer` with the paper's AdamW,
runs 3 training steps on random images and reports the process's peak
resident memory (VmHWM) minus the baseline; then XLA's own figures for
that step (`jax.jit(train_step).lower(...).compile().memory_analysis()`:
argument, output, aliased and temporary buffer sizes). The planned figure is
`keras_aim.memory_plan.plan_memory(...)` on a 1x1 mesh. Widths, heads,
patch and image size are aim_600m's (D=1536, 12 heads, 224 px, patch 14,
pixel head 2048); depths and batch vary so that each run fits in memory.

    python benchmarks/plan_vs_measured.py
    python benchmarks/plan_vs_measured.py --runs 24:12:2 12:2:8:remat
    (a run is LAYERS:HEAD_DEPTH:BATCH[:remat])
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from keras_aim.models.aim.aim_presets import pretraining_architecture

# aim_600m's widths; the depths vary per run.
ARCH = pretraining_architecture("aim_600m")

CHILD = r"""
import json, os, sys
def status(field):
    with open("/proc/self/status") as f:
        line = next(l for l in f if l.startswith(field + ":"))
    return int(line.split()[1]) * 1024
layers, depth, batch, remat = (int(a) for a in sys.argv[1:5])
arch = json.loads(sys.argv[5])
import numpy as np, keras, keras_aim
keras.ops.convert_to_numpy(keras.ops.ones((4,)) * 2)  # starts XLA
baseline = status("VmRSS")
size = arch["image_size"]
backbone = keras_aim.AIMBackbone(
    image_shape=(size, size, 3), patch_size=arch["patch_size"], hidden_dim=arch["hidden_dim"],
    num_layers=layers, num_heads=arch["num_heads"], layer_norm_epsilon=1e-5,
    remat=bool(remat))
pretrainer = keras_aim.AIMPretrainer(
    backbone, pixel_head_width=arch["pixel_head_width"], pixel_head_depth=depth, seed=0)
pretrainer.compile(optimizer=keras_aim.pretraining_optimizer(learning_rate=1e-4))
images = np.random.default_rng(0).normal(size=(batch, size, size, 3)).astype("float32")
for _ in range(3):
    loss = float(pretrainer.train_on_batch(images))
peak = status("VmHWM")
# XLA's own figures for the same step: Keras' train_step (what fit and
# train_on_batch jit, with the state donated) lowered and compiled for
# these shapes; its buffers are the state, the batch and the temporaries.
import jax
state = tuple([v.value for v in variables] for variables in (
    pretrainer.trainable_variables, pretrainer.non_trainable_variables,
    pretrainer.optimizer.variables, pretrainer.metrics_variables))
compiled = jax.jit(pretrainer.train_step, donate_argnums=0).lower(
    state, (images, None, None)).compile()
analysis = compiled.memory_analysis()
xla = {name: int(getattr(analysis, name + "_size_in_bytes")) for name in (
    "argument", "output", "alias", "temp", "generated_code")}
print(json.dumps({"baseline": baseline, "peak": peak, "loss": loss, "xla": xla}))
"""


def measure(layers: int, depth: int, batch: int, remat: bool) -> dict:
    env = {**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "3",
           "JAX_PLATFORMS": "cpu"}
    run = subprocess.run(
        [sys.executable, "-c", CHILD, str(layers), str(depth), str(batch), str(int(remat)),
         json.dumps(ARCH)],
        env=env, capture_output=True, text=True,
    )
    if run.returncode:
        raise SystemExit(f"run {layers}:{depth}:{batch} failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def parse_run(text: str) -> tuple[int, int, int, bool]:
    parts = text.split(":")
    remat = parts[-1] == "remat"
    layers, depth, batch = (int(p) for p in parts[: 3])
    return layers, depth, batch, remat


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--runs", nargs="+",
        default=["6:2:2", "6:2:8", "12:4:2", "12:4:4"],
        help="LAYERS:HEAD_DEPTH:BATCH[:remat] per run",
    )
    args = parser.parse_args(argv)
    from keras_aim.training.memory_plan import GIB, PretrainingShape, plan_memory

    print("| trunk blocks | head blocks | batch | remat | planned: params+opt+grads "
          "| planned: activations | planned total | XLA: arguments | XLA: temporaries "
          "| XLA total | measured peak - baseline | XLA / planned | measured / planned |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    for text in args.runs:
        layers, depth, batch, remat = parse_run(text)
        shape = PretrainingShape.from_config(
            {**ARCH, "num_layers": layers, "pixel_head_depth": depth}
        )
        plan = plan_memory(shape, 1, 1, batch, "fp32", remat)
        measured = measure(layers, depth, batch, remat)
        used = measured["peak"] - measured["baseline"]
        state = plan.parameters + plan.optimizer_state + plan.gradients
        xla = measured["xla"]
        # Live at once: inputs, plus outputs that do not reuse a donated
        # input's buffer, plus temporaries (JAX's own peak estimate).
        xla_total = xla["argument"] + xla["output"] - xla["alias"] + xla["temp"]
        print(f"| {layers} | {depth} | {batch} | {'yes' if remat else 'no'} "
              f"| {state / GIB:.2f} GiB | {plan.activations / GIB:.2f} GiB "
              f"| {plan.total / GIB:.2f} GiB | {xla['argument'] / GIB:.2f} GiB "
              f"| {xla['temp'] / GIB:.2f} GiB | {xla_total / GIB:.2f} GiB "
              f"| {used / GIB:.2f} GiB | {xla_total / plan.total:.2f} "
              f"| {used / plan.total:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
