"""`keye-data convert`: common VLM data formats to shards of the schema in docs/data.md."""
