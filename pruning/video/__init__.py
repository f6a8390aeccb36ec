"""System B: PruneVid on Qwen2.5-VL (spatial-temporal merging, attention-based pruning, KV-cache compression)."""
