"""aim_600m (0.6B): the paper's pre-training run (see configs/paper.py)."""

from configs.paper import paper_config

CONFIG = paper_config(hidden_dim=1536, num_layers=24, num_heads=12, total_steps=500_000)
