"""Webdataset shards: source readers, the manifest, and the header-only shard index."""
