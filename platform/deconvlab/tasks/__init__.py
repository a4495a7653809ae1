"""LightningModules, one per task: they own the loss, the metrics and the optimiser."""
