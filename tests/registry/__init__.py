"""``registry``: the Redis-backed store, scorers, Sentinel and Cluster, the registry CLI."""
