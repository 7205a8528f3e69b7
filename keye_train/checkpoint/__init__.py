"""Checkpoints: DCP save/load/resume and Hugging Face adapters."""
