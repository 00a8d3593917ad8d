"""vtc: visual token compression for LLaVA-style large multimodal models."""
from pathlib import Path

__version__ = "0.1.0"

# The source checkout: train.py, eval.py and conf/ sit here (vtc is installed editable).
ROOT = Path(__file__).resolve().parents[1]
