"""What the recipes share: building the pre-training model from a config."""

from __future__ import annotations


def build_pretrainer(config: dict, seed: int):
    """An `AIMPretrainer` for a recipe config, compiled with the paper's
    optimizer over `config["total_steps"]`."""
    import keras_aim

    backbone = keras_aim.AIMBackbone(
        image_shape=(config["image_size"], config["image_size"], 3),
        patch_size=config["patch_size"],
        hidden_dim=config["hidden_dim"],
        num_layers=config["num_layers"],
        num_heads=config["num_heads"],
        layer_norm_epsilon=1e-5,  # the training code's value
    )
    pretrainer = keras_aim.AIMPretrainer(
        backbone,
        pixel_head_width=config["pixel_head_width"],
        pixel_head_depth=config["pixel_head_depth"],
        seed=seed,
    )
    pretrainer.compile(
        optimizer=keras_aim.pretraining_optimizer(
            config["total_steps"], config["learning_rate"]
        )
    )
    return pretrainer
