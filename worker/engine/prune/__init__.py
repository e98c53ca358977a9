"""Prune: one module per method (magnitude, wanda, sparsegpt, structured, depth), their mask math in
`masks`, the layer-by-layer driver the calibrated methods share in `sequential`, and the size summary of the
steps that remove parameters in `size`. Importing the room registers its steps."""

from worker.engine.prune import depth, magnitude, sparsegpt, structured, wanda  # noqa: F401  (registers the steps)
from worker.engine.prune.masks import nm_mask, sparsity_of

__all__ = ["nm_mask", "sparsity_of"]
