"""Media decoding and preprocessing: images, videos, SlowFast frame planning."""
