"""Models: the base model, merging an adapter, the MLflow registry, held-out evaluation."""
