"""The paper's pre-training settings shared by the released sizes (AIM
section 4). The paper trains on DFN-2B+ (not public); these configs read
ImageNet-1k from tensorflow-datasets; point --data elsewhere for other data."""


def paper_config(hidden_dim: int, num_layers: int, num_heads: int, total_steps: int) -> dict:
    return dict(
        data="tfds:imagenet2012",
        image_size=224,
        patch_size=14,
        hidden_dim=hidden_dim,
        num_layers=num_layers,
        num_heads=num_heads,
        pixel_head_width=2048,
        pixel_head_depth=12,
        batch_size=4096,
        total_steps=total_steps,
        learning_rate=1e-3,
        augmentation="aim",
        precision="mixed_bfloat16",
        checkpoint_every=1000,
    )
