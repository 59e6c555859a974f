"""aim_7b (7B): the paper's pre-training run (see configs/paper.py)."""

from configs.paper import paper_config

CONFIG = paper_config(hidden_dim=4096, num_layers=32, num_heads=32, total_steps=1_200_000)
