"""A small llama3v (SigLIP tower + LLaVA projector + Llama decoder) trained on a synthetic shapes task."""

__version__ = "0.1.0"
