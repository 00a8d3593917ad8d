"""A config made real: its checks (refused before anything is built), the compressors and schedule it
composes, the LMM and data module it builds, a trained checkpoint read back."""
