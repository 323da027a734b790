"""Rate limits: local token buckets and global counters batched to Redis (see `step.py` for the hot path)."""
