"""aim_3b (3B): the paper's pre-training run (see configs/paper.py)."""

from configs.paper import paper_config

CONFIG = paper_config(hidden_dim=3072, num_layers=24, num_heads=24, total_steps=1_200_000)
