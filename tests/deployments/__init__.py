"""``deployments``: the Serve application end to end, its CLI, the static scheduler, and ``deploy/``."""
