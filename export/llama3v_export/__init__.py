"""llama3v export: Hugging Face LLaVA (SigLIP + Llama-3) checkpoints -> llama3v model directories."""

__version__ = "0.1.0"
