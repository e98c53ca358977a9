"""Quantize: one module per method (rtn, gptq, awq, smoothquant, fp8), their pure math (`quant_math`,
`gptq_math`, `awq_math`) and the plumbing they share (`common`). Importing the room registers its steps.

The number formats come first: export and speed read them through this package while it is still loading.
"""

from worker.engine.quantize.quant_math import (  # isort: skip  (the formats before the steps; see above)
    FP8_MAX,
    INT8_HALF_RANGE,
    dequantize,
    fake_quantize,
    fake_quantize_tokens,
    fp8_fake_quantize,
    fp8_params,
    quantize,
    rtn_params,
    TokenQuantHook,
)
from worker.engine.quantize import awq, fp8, gptq, rtn, smoothquant  # noqa: F401, E402  (registers the steps)
from worker.engine.quantize.awq import awq_round_, fold_awq_scales_  # noqa: E402
from worker.engine.quantize.common import InputStats, LayerGroup, quantize_, quantize_layers  # noqa: E402
from worker.engine.quantize.fp8 import fp8_quantize_  # noqa: E402
from worker.engine.quantize.gptq_math import gptq_quantize  # noqa: E402

__all__ = [
    "FP8_MAX",
    "INT8_HALF_RANGE",
    "LayerGroup",
    "awq_round_",
    "dequantize",
    "InputStats",
    "fake_quantize",
    "fake_quantize_tokens",
    "fold_awq_scales_",
    "fp8_fake_quantize",
    "fp8_quantize_",
    "gptq_quantize",
    "quantize_",
    "quantize_layers",
    "fp8_params",
    "quantize",
    "rtn_params",
    "TokenQuantHook",
]
