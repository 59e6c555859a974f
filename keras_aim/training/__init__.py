"""Training: the AIM pre-training loss, the optimizers, attentive probes,
LoRA, checkpoints, distribution over devices and hosts, and the memory
planner. Imports no model; the models import it.

    losses.py           next-patch normalized-pixel loss, patchify
    optimizers.py       AdamW + schedules (pre-training, probes, LoRA)
    probing.py          features of a frozen trunk, the attentive probe, feature cache
    lora.py             LoRA helpers (count, fit, save adapters, merge)
    checkpointing.py    exact step checkpoints and epoch backups
    distribution.py     meshes, layout maps, distribution scopes (+ distribution_tf.py)
    memory_plan.py      per-device memory of a pre-training run
"""

from keras_aim.utils.lazy_imports import lazy_attributes

__getattr__, __dir__ = lazy_attributes(
    __name__,
    {
        name: f"keras_aim.training.{name}"
        for name in ("checkpointing", "distribution", "distribution_tf", "lora",
                     "losses", "memory_plan", "optimizers", "probing")
    },
)
