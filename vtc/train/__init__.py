"""train.py's task: the LightningModule, the CompressionCurriculum callback, checkpoint writing, and
what a run prints."""
