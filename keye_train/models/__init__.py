"""Single-device model code: ViT, projector, Qwen3 decoder, the composite, SigLIP text tower."""
