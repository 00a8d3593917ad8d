"""vtc: visual token compression for LLaVA-style large multimodal models."""

__version__ = "0.1.0"
