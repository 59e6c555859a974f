"""aim_3b: the paper's pre-training settings (AIM section 4). The paper
trains on DFN-2B+ (not public); this config reads ImageNet-1k from
tensorflow-datasets; point --data elsewhere for other data."""

CONFIG = dict(
    data="tfds:imagenet2012",
    image_size=224,
    patch_size=14,
    hidden_dim=3072,
    num_layers=24,
    num_heads=24,
    pixel_head_width=2048,
    pixel_head_depth=12,
    batch_size=4096,
    total_steps=1_200_000,
    learning_rate=1e-3,
    augmentation="aim",
    precision="mixed_bfloat16",
    checkpoint_every=1000,
)
