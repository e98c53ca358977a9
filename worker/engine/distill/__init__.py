"""Distill: logit knowledge distillation (`kd`), its GPU memory modes, the host-side optimizer and the layer
streaming they use. Importing the room registers its step."""

from worker.engine.distill import kd  # noqa: F401  (registers the step)
