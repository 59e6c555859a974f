"""aim_1b (1B): the paper's pre-training run (see configs/paper.py)."""

from configs.paper import paper_config

CONFIG = paper_config(hidden_dim=2048, num_layers=24, num_heads=16, total_steps=1_200_000)
