"""CPU demo: a tiny AIM on scikit-learn's digits (embedded, no download)."""

CONFIG = dict(
    data="digits",
    image_size=16,
    patch_size=4,
    hidden_dim=128,
    num_layers=4,
    num_heads=4,
    pixel_head_width=128,
    pixel_head_depth=2,
    batch_size=128,
    total_steps=600,
    learning_rate=1e-3,
    augmentation="shift",
    precision="float32",
    checkpoint_every=100,
)
