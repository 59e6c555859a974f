"""The optimizers and learning-rate schedules of keras_aim, all Keras' own:
AdamW with global-norm clipping and a warmup + cosine schedule.

- `pretraining_optimizer`: the AIM paper's pre-training setting.
- `adamw_warmup_cosine`: probes and LoRA fine-tuning.
"""

from __future__ import annotations

import keras

from keras_aim.utils.arguments import check_learning_rate

# Variables without weight decay: biases, LayerNorm scale/offset (the fixed
# position embeddings have no variables).
NO_WEIGHT_DECAY = ["bias", "gamma", "beta"]


def pretraining_optimizer(
    total_steps: int | None = None,
    learning_rate: float = 1e-3,
    warmup_fraction: float = 0.025,
    warmup_start: float = 1e-6,
    weight_decay: float = 0.05,
    global_clipnorm: float = 1.0,
    gradient_accumulation_steps: int | None = None,
) -> keras.optimizers.Optimizer:
    """The paper's optimizer: AdamW (0.9, 0.95, eps 1e-8), weight decay 0.05
    except biases and norms, global-norm clipping 1.0; with `total_steps`,
    linear warmup from 1e-6 over the first 2.5% then cosine decay to 0,
    else a constant learning rate. With `gradient_accumulation_steps=n`
    (>= 2), the weights change every n-th step with the mean gradient of
    the last n batches (Keras' own accumulation); the schedule counts every
    step, so give `total_steps` in steps, not in updates. With TensorFlow it
    is `distribution_tf.GlobalNormClipAdamW`, which clips the gradient of
    the whole global batch under a `tf.distribute` strategy."""
    check_learning_rate("pretraining_optimizer", learning_rate)
    schedule = learning_rate
    if total_steps:
        if total_steps < 2:
            raise ValueError(f"total_steps must be >= 2; received {total_steps}.")
        warmup = max(1, round(warmup_fraction * total_steps))
        schedule = keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=warmup_start,
            decay_steps=max(1, total_steps - warmup),
            alpha=0.0,
            warmup_target=learning_rate,
            warmup_steps=warmup,
        )
    adamw = keras.optimizers.AdamW
    if keras.config.backend() == "tensorflow":
        # Clips the gradient summed over tf.distribute replicas, not each
        # replica's (what Keras' TensorFlow optimizer does).
        from keras_aim.training.distribution_tf import GlobalNormClipAdamW as adamw
    optimizer = adamw(
        learning_rate=schedule,
        weight_decay=weight_decay,
        beta_1=0.9,
        beta_2=0.95,
        epsilon=1e-8,
        global_clipnorm=global_clipnorm,
        gradient_accumulation_steps=gradient_accumulation_steps,
    )
    optimizer.exclude_from_weight_decay(var_names=NO_WEIGHT_DECAY)
    return optimizer


def adamw_warmup_cosine(
    learning_rate: float,
    total_steps: int,
    weight_decay: float = 0.05,
    gradient_accumulation_steps: int | None = None,
) -> keras.optimizers.AdamW:
    """AdamW whose rate rises linearly from 0 over the first 10% of
    `total_steps` (batches, accumulated or not), then follows a cosine decay
    to 0 (probes, LoRA)."""
    check_learning_rate("adamw_warmup_cosine", learning_rate)
    warmup = max(1, total_steps // 10)
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps=max(1, total_steps - warmup), warmup_target=learning_rate,
        warmup_steps=warmup,
    )
    return keras.optimizers.AdamW(
        schedule, weight_decay=weight_decay,
        gradient_accumulation_steps=gradient_accumulation_steps,
    )
