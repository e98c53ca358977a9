"""The modelpress HTTP API (FastAPI). Never imports torch, transformers or the worker."""
