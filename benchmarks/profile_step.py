"""Where the time of an AIM pre-training step goes, on the current Keras backend.

Uses the CPU config of `throughput.py` (or its size flags) and prints:

  JAX:      median times of the compiled pieces of the step: trunk forward
            (full attention), trunk + pixel head + loss forward (prefix-causal
            mask), forward + backward (gradients), and the whole
            `train_on_batch` (plus clipping and the AdamW update).
  PyTorch:  the torch.profiler operator table of one Keras inference call
            and one Keras training step (self CPU time, top operators).

    KERAS_BACKEND=jax python benchmarks/profile_step.py
    KERAS_BACKEND=torch python benchmarks/profile_step.py

A measurement, not a test.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import throughput  # noqa: E402


def _median_ms(function, repeats: int = 5) -> float:
    function()
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def build(config: dict):
    import keras

    import keras_aim

    keras.utils.set_random_seed(0)
    size = config["image_size"]
    backbone = keras_aim.AIMBackbone(
        image_shape=(size, size, 3), patch_size=config["patch_size"],
        hidden_dim=config["hidden_dim"], num_layers=config["num_layers"],
        num_heads=config["num_heads"])
    pretrainer = keras_aim.AIMPretrainer(
        backbone, pixel_head_width=config["head_width"],
        pixel_head_depth=config["head_depth"], seed=0)
    pretrainer.compile()
    return backbone, pretrainer


def profile_jax(config: dict, images) -> list[tuple[str, float]]:
    import jax

    from keras_aim.losses import next_patch_pixel_loss

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
    rows = [
        ("trunk forward (inference)", _median_ms(lambda: ready(trunk(variables)))),
        ("trunk + pixel head + loss forward", _median_ms(lambda: ready(forward(variables)))),
        ("forward + backward", _median_ms(lambda: ready(gradients(variables)))),
    ]
    host_images = jax.device_get(images)
    rows.append(("train_on_batch (+ clip, AdamW)",
                 _median_ms(lambda: pretrainer.train_on_batch(host_images), 3)))
    return rows


def profile_torch(config: dict, images) -> str:
    from torch.profiler import profile

    backbone, pretrainer = build(config)
    backbone.predict_on_batch(images)
    pretrainer.train_on_batch(images)
    tables = []
    for name, step in (("inference", lambda: backbone.predict_on_batch(images)),
                       ("pre-training step", lambda: pretrainer.train_on_batch(images))):
        with profile() as recorded:
            step()
        tables.append(f"{name}:\n" + recorded.key_averages().table(
            sort_by="self_cpu_time_total", row_limit=12))
    return "\n".join(tables)


def main(argv=None) -> int:
    import keras
    import numpy as np

    args = throughput.parse_args(argv)
    config = throughput.resolve_config(args)
    size = config["image_size"]
    images = np.random.default_rng(0).standard_normal(
        (config["batch_size"], size, size, 3), dtype=np.float32)
    backend = keras.config.backend()
    flops = throughput.step_flops(config)
    print(f"backend {backend}; config {config}")
    if backend == "jax":
        rows = profile_jax(config, images)
        total = rows[-1][1]
        print(f"{'piece':<36}{'ms':>9}{'of step':>9}")
        for name, ms in rows:
            print(f"{name:<36}{ms:>9.1f}{100 * ms / total:>8.0f}%")
        print(f"(analytic: inference {flops['inference'] * config['batch_size'] / 1e9:.1f} "
              f"GFLOP, step {flops['train'] * config['batch_size'] / 1e9:.1f} GFLOP per batch)")
    elif backend == "torch":
        print(profile_torch(config, images))
    else:
        print("profile_step.py covers the JAX and PyTorch backends.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
