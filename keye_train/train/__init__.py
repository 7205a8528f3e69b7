"""Training loop, stages, optimisation, losses, metrics, merging."""
