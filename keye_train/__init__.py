"""keye_train: distributed pre-training of Keye-VL-1.5-style multimodal models."""

__version__ = "0.1.0"
