"""Remote code copied into every Hugging Face export; standalone (imports torch and transformers only)."""
