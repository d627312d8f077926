"""The bottom layer: meshes and sharding rules, the training state, the pure train step, BCD
blocks and phase plans, optimizers and schedules, losses, metric functions. Imports nothing
else of the package."""
