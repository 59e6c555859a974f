"""The paper's pre-training settings for the released sizes (AIM section 4),
read from keras_aim's preset table. The paper trains on DFN-2B+ (not
public); these configs read ImageNet-1k from tensorflow-datasets; point
--data elsewhere for other data."""

from keras_aim.models.aim.aim_presets import PAPER_PRETRAINING, pretraining_architecture


def paper_config(name: str) -> dict:
    """The paper's pre-training run of released preset `name`."""
    return dict(
        **pretraining_architecture(name),
        data="tfds:imagenet2012",
        batch_size=PAPER_PRETRAINING["batch_size"],
        total_steps=PAPER_PRETRAINING["total_steps"][name],
        learning_rate=PAPER_PRETRAINING["learning_rate"],
        augmentation="aim",
        precision=PAPER_PRETRAINING["precision"],
        checkpoint_every=1000,
    )
