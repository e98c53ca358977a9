"""The routing function: a job's estimated memory picks its class, and a worker's GPUs the classes it serves."""

from __future__ import annotations

import pytest

from modelpress.routing import (
    CPU_CLASS,
    GB,
    Need,
    class_capacity,
    classes_served,
    estimate_memory,
    queue_name,
    route,
    waiting_reason,
)
from modelpress.specs import JobSpec

GiB = 1024**3
CPU_MAX = 8 * GiB
# shapes as inspection records them (config.json), with parameter counts
SMOLLM2_135M = (134_515_008, {"hidden_size": 576, "vocab_size": 49152, "num_hidden_layers": 30,
                              "intermediate_size": 1536, "linear_in_features": [576, 1536]})  # fmt: skip
QWEN_3B = (3_085_938_688, {"hidden_size": 2048, "vocab_size": 151936, "num_hidden_layers": 36,
                           "intermediate_size": 11008, "linear_in_features": [2048, 11008]})  # fmt: skip
LLAMA_8B = (8_030_261_248, {"hidden_size": 4096, "vocab_size": 128256, "num_hidden_layers": 32,
                            "intermediate_size": 14336, "linear_in_features": [4096, 14336]})  # fmt: skip
LLAMA_70B = (70_553_706_496, {"hidden_size": 8192, "vocab_size": 128256, "num_hidden_layers": 80,
                              "intermediate_size": 28672, "linear_in_features": [8192, 28672]})  # fmt: skip

RTN = [{"type": "quantize", "method": "rtn", "weights": {"bits": 4, "group_size": 128}}]
GPTQ = [{"type": "quantize", "method": "gptq", "weights": {"bits": 4, "group_size": 128}}]
KD_LEAN = [{"type": "distill", "dataset_id": "d", "batch_size": 8, "seq_len": 1024, "offload": True}]
KD_AUTO = [{"type": "distill", "dataset_id": "d", "batch_size": 8, "seq_len": 2048}]
KD_FAST = [{"type": "distill", "dataset_id": "d", "batch_size": 8, "seq_len": 2048, "offload": False}]


def spec(recipe: list[dict]) -> JobSpec:
    return JobSpec.model_validate(
        {
            "model_id": "m",
            "recipe": recipe,
            "calibration": {"dataset_id": "d", "samples": 128, "seq_len": 2048},
            "evaluation": {"dataset_id": "d", "seq_len": 2048},
        }
    )


@pytest.mark.parametrize(
    ("model", "recipe", "memory_class"),
    [
        (SMOLLM2_135M, RTN, "cpu"),
        (SMOLLM2_135M, GPTQ, "cpu"),
        (SMOLLM2_135M, KD_AUTO, "gpu-24"),  # 8 × 2048 tokens of training activations
        (QWEN_3B, RTN, "gpu-24"),
        (QWEN_3B, GPTQ, "gpu-24"),
        (QWEN_3B, KD_FAST, "gpu-80"),
        (LLAMA_8B, RTN, "gpu-24"),
        (LLAMA_8B, GPTQ, "gpu-48"),
        (LLAMA_8B, KD_LEAN, "gpu-48"),
        (LLAMA_8B, KD_FAST, "gpu-141"),
        (LLAMA_70B, RTN, "gpu-141"),  # more than every class holds: the largest, the nearest to holding it
    ],
)
def test_route_table(model: tuple[int, dict], recipe: list[dict], memory_class: str) -> None:
    parameters, details = model
    need = route(parameters, details, spec(recipe), CPU_MAX)
    assert need.memory_class == memory_class
    assert need.gpu == (memory_class != CPU_CLASS)


def test_the_chosen_class_is_the_smallest_that_holds_the_estimate() -> None:
    for parameters, details in (QWEN_3B, LLAMA_8B):
        for recipe in (RTN, GPTQ, KD_LEAN, KD_FAST):
            need = route(parameters, details, spec(recipe), CPU_MAX)
            assert need.memory_bytes <= class_capacity(need.gigabytes)
            smaller = [size for size in (24, 48, 80) if size < need.gigabytes]
            assert all(class_capacity(size) < need.memory_bytes for size in smaller)


def test_estimates_order_the_modes_as_the_engine_holds_them() -> None:
    parameters, details = LLAMA_8B
    rtn, gptq = estimate_memory(parameters, details, spec(RTN)), estimate_memory(parameters, details, spec(GPTQ))
    lean = estimate_memory(parameters, details, spec([{**KD_AUTO[0], "offload": True}]))
    auto, fast = (
        estimate_memory(parameters, details, spec(KD_AUTO)),
        estimate_memory(parameters, details, spec(KD_FAST)),
    )
    assert 2 * parameters < rtn < gptq < lean < fast
    assert auto == lean  # "auto" runs the lean mode where the fast one does not fit
    # GPTQ on this shape was measured within the bf16 model + 20 GB (README); fast KD at 96 GB
    assert gptq < 2 * parameters + 20 * GB
    assert 96 * GB < fast < 130 * GB


def test_the_cpu_ceiling_decides_whether_a_job_needs_a_gpu() -> None:
    parameters, details = SMOLLM2_135M
    job = spec(GPTQ)
    assert route(parameters, details, job, CPU_MAX).memory_class == "cpu"
    assert route(parameters, details, job, 0).memory_class == "gpu-24"


@pytest.mark.parametrize(
    ("gpus", "classes"),
    [
        ([], ["cpu"]),
        ([17_179_869_184], ["cpu"]),  # 16 GiB
        ([25_757_220_864], ["cpu", "gpu-24"]),  # RTX 4090 (24564 MiB)
        ([42_949_672_960], ["cpu", "gpu-24"]),  # A100 40 GB
        ([51_527_024_640], ["cpu", "gpu-24", "gpu-48"]),  # 48 GiB
        ([85_520_809_984], ["cpu", "gpu-24", "gpu-48", "gpu-80"]),  # H100 80 GB (81559 MiB)
        ([150_754_820_096], ["cpu", "gpu-24", "gpu-48", "gpu-80", "gpu-141"]),  # H200 (143771 MiB)
        ([150_754_820_096, 25_769_803_776], ["cpu", "gpu-24"]),  # a job may land on either card
    ],
)
def test_classes_a_worker_serves(gpus: list[int], classes: list[str]) -> None:
    assert classes_served(gpus) == classes


def test_waiting_reason_names_the_memory_it_waits_for() -> None:
    need = Need(37_200_000_000, "gpu-48")
    assert waiting_reason(need, ["cpu", "gpu-24", "gpu-48"]) is None
    reason = waiting_reason(need, ["cpu", "gpu-24"])
    assert reason is not None and "≥ 48 GB of GPU memory" in reason and "37.2 GB" in reason
    assert waiting_reason(Need(1, "cpu"), []) == "waiting for a worker: none is running"
    assert waiting_reason(Need(1, "cpu"), ["cpu"]) is None


def test_queue_names() -> None:
    assert queue_name("modelpress", "gpu-80") == "modelpress.gpu-80"
    assert queue_name("modelpress", "cpu") == "modelpress.cpu"
