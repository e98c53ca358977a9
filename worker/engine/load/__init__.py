"""Load: a Hugging Face folder or a GGUF file into a transformers model and tokenizer, on the chosen device."""

from worker.engine.load.checkpoint import LoadedModel, load_model, load_tokenizer, pick_device, require_tokenizer

__all__ = ["LoadedModel", "load_model", "load_tokenizer", "pick_device", "require_tokenizer"]
