"""Training: tokenization into the trainer's layout, the ORPO loss, the trainer and its multi-process launcher."""
