"""Data pipeline: sources, image and video preprocessing, chat templates, packing, mixtures."""
