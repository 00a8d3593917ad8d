"""Parallelism applied from outside the model: the FSDP2 plan, sharded checkpoints on disk and their
consolidation into one file."""
