"""aim_1b (1B): the paper's pre-training run (see configs/paper.py)."""

from recipes.configs.paper import paper_config

CONFIG = paper_config("aim_1b")
