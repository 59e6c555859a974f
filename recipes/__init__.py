"""Recipes: small scripts over the library, one per job, run as modules from
the repository root (`python -m recipes.pretrain --config tiny ...`).

    demo               the main job: tiny pre-training + probes + LoRA on digits
    pretrain           AIM pre-training with exact checkpoints (configs/: one per experiment)
    attentive_probe    train an attentive probe on a frozen trunk, or evaluate a head
    finetune_lora      LoRA fine-tuning of a trunk with its probe
    plan               per-device memory of a pre-training run

Shared options and helpers are in `recipes.common`.
"""
