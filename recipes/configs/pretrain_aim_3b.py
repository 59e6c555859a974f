"""aim_3b (3B): the paper's pre-training run (see configs/paper.py)."""

from recipes.configs.paper import paper_config

CONFIG = paper_config("aim_3b")
