"""Parallelism applied from outside the model: mesh, FSDP, TP, PP, CP, ViT routing."""
