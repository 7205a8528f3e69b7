"""Synthetic shards and media with known content, for demos and tests."""
