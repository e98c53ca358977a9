"""Models larger than the GPU: the engine's calibrated steps on Llama-3-8B and Qwen2.5-32B shapes, with the
model in host memory when it does not fit (execution `onloaded`: each decoder layer visits the GPU in turn).

Each case builds its shape with random bf16 weights (seeded; generated on the GPU tensor by tensor and copied
into host memory, so a 65 GB model takes seconds, not minutes on the CPU), random calibration token ids
(128 × 2048 by default, seeded), lets the engine's execution plan choose `whole` or `onloaded` from the GPU's free
memory (`worker.engine.execution`), runs the step through its public entry (`run_step` with a `StepContext`),
then measures perplexity on a few fixed random windows the way the pipeline does in that mode. It records the
step's wall time, peak GPU memory (max allocated and reserved, reset before the step), the process's peak host
memory (VmHWM, whole run) and the time per decoder layer, and writes one JSON per case into --out.

    python benchmarks/onload_scale.py --case llama8b-uncapped --out benchmarks/onload_scale_results
    python benchmarks/onload_scale.py --case qwen32b-gptq --layers 16 --out DIR   # first 16 layers, projected
    python benchmarks/onload_scale.py --case all --tiny --out /tmp/onload          # tiny shapes on the CPU

Cases: llama8b-uncapped, llama8b-capped12 (`torch.cuda.set_per_process_memory_fraction` to 12 GiB),
qwen32b-gptq-capped16 (16 GiB), qwen32b-gptq-capped16gb (16 × 10⁹ bytes), qwen32b-gptq-capped24, qwen32b-gptq,
qwen32b-wanda, qwen32b-sparsegpt, qwen32b-awq, and llmcompressor-8b (llm-compressor's `oneshot` GPTQ W4A16 g128
on the same 8B shape and calibration tokens; llmcompressor is imported only there).

`--layers N` builds and runs only the first N decoder layers and prints the projected whole-model time: the
first layer as measured (it includes capturing the embeddings) plus the mean of the others for each layer left.
Imports: torch, transformers, safetensors, compressed-tensors, pydantic and the engine (the GPU image's set).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from worker.engine.evaluate.evaluation import perplexity  # noqa: E402
from worker.engine.evaluate.measure import read_peak_rss, tensor_bytes_in_memory  # noqa: E402
from worker.engine.execution import device_free_bytes, job_working_bytes, plan_execution  # noqa: E402
from worker.engine.steps import StepContext, run_step, step_spec  # noqa: E402

log = logging.getLogger("onload_scale")

GIB = 2**30
CAP_BYTES = 12 * GIB
EVAL_WINDOWS = 4
W4_G128 = {"bits": 4, "group_size": 128, "symmetric": True}
STEPS = {
    "gptq": {"type": "quantize", "method": "gptq", "weights": W4_G128, "act_order": True},
    "wanda": {"type": "prune", "method": "wanda", "sparsity": 0.5},
    "sparsegpt": {"type": "prune", "method": "sparsegpt", "sparsity": 0.5},
    "awq": {"type": "quantize", "method": "awq", "weights": W4_G128},
}
SHAPES = {
    "llama8b": {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "rope_theta": 500000.0,
    },
    "qwen32b": {
        "model_type": "qwen2",
        "hidden_size": 5120,
        "intermediate_size": 27648,
        "num_hidden_layers": 64,
        "num_attention_heads": 40,
        "num_key_value_heads": 8,
        "vocab_size": 152064,
        "rope_theta": 1000000.0,
    },
}
TINY = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 3, "num_attention_heads": 4}
TINY |= {"num_key_value_heads": 2, "vocab_size": 512}
CASES = {  # name -> (shape, step, GPU memory cap)
    "llama8b-uncapped": ("llama8b", "gptq", None),
    "llama8b-capped12": ("llama8b", "gptq", CAP_BYTES),
    "qwen32b-gptq-capped16": ("qwen32b", "gptq", 16 * GIB),
    "qwen32b-gptq-capped16gb": ("qwen32b", "gptq", 16 * 10**9),  # the target's 16 GB read as 10⁹ bytes
    "qwen32b-gptq-capped24": ("qwen32b", "gptq", 24 * GIB),
    "qwen32b-gptq": ("qwen32b", "gptq", None),
    "qwen32b-wanda": ("qwen32b", "wanda", None),
    "qwen32b-sparsegpt": ("qwen32b", "sparsegpt", None),
    "qwen32b-awq": ("qwen32b", "awq", None),
    "llmcompressor-8b": ("llama8b", "llmcompressor", None),
}
PUBLISHED = {  # the peers' own figures for the same work; not measured here
    "llm-compressor": "about 30 min for GPTQ on Llama-3-8B on an A100, GPU memory about twice one layer",
    "AutoRound W4G128": "8B in 12 min and 18 GB, 70B in 120 min and 42 GB, A100",
}


# --- the model ------------------------------------------------------------------------------------------------


def build_config(shape: str, tiny: bool, layers: int | None):
    from transformers import AutoConfig

    sizes = dict(SHAPES[shape])
    model_type = sizes.pop("model_type")
    if tiny:
        sizes.update(TINY)
    full_layers = sizes["num_hidden_layers"]
    if layers is not None:
        sizes["num_hidden_layers"] = min(layers, full_layers)
    config = AutoConfig.for_model(
        model_type, **sizes, max_position_embeddings=32768, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0
    )
    config.dtype = "bfloat16"
    return config, full_layers


@torch.no_grad()
def build_model(config, device: torch.device, seed: int = 0) -> torch.nn.Module:
    """The model in host memory, bf16, random (normal, std = initializer_range; norms 1): built on the meta device,
    given empty host tensors, and filled tensor by tensor from a seeded generator on `device`."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.to_empty(device="cpu")
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, parameter in model.named_parameters():
        if "norm" in name:
            parameter.fill_(1.0)
            continue
        values = torch.randn(parameter.shape, generator=generator, device=device, dtype=torch.float32)
        parameter.copy_((values * config.initializer_range).to(torch.bfloat16))
    for name, module in model.named_modules():
        if name.endswith("rotary_emb"):  # its frequencies are buffers that to_empty left uninitialized
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, type(module)(config=config))
    return model.eval()


# --- one case -------------------------------------------------------------------------------------------------


class LayerClock:
    """The step's progress callback: the time of each report (one per decoder layer), device synchronized."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.started, self.marks = device, time.perf_counter(), []

    def __call__(self, fraction: float, message: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.marks.append(time.perf_counter() - self.started)
        log.info("%7.1f s  %5.1f%%  %s", self.marks[-1], 100 * fraction, message)

    def projected(self, layers_run: int, layers_full: int) -> float | None:
        """Whole-model seconds: the first layer as measured plus the mean of the others for each layer left."""
        if len(self.marks) < 2 or layers_run >= layers_full:
            return None
        first, last = self.marks[0], self.marks[-1]
        per_layer = (last - first) / (len(self.marks) - 1)
        return first + per_layer * (layers_full - 1)


def windows(config, count: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (count, length), generator=torch.Generator().manual_seed(seed))


def run_case(name: str, args: argparse.Namespace) -> dict[str, Any]:
    shape, step, cap = CASES[name]
    device = torch.device("cpu") if args.tiny else torch.device("cuda", 0)
    if cap is not None and device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(cap / total, device)
    config, full_layers = build_config(shape, args.tiny, args.layers)
    started = time.perf_counter()
    model = build_model(config, device)
    build_s = time.perf_counter() - started
    calibration = windows(config, args.samples, args.seq_len, seed=1)
    evaluation = windows(config, EVAL_WINDOWS, args.seq_len, seed=2)
    row: dict[str, Any] = {
        "case": name,
        "shape": shape,
        "step": step,
        "config": {k: getattr(config, k) for k in (*TINY, "model_type")},
        "layers_run": config.num_hidden_layers,
        "layers_full": full_layers,
        "model_bytes": tensor_bytes_in_memory(model),
        "build_s": build_s,
        "calibration": list(calibration.shape),
        "evaluation_windows": list(evaluation.shape),
        "gpu_cap_bytes": cap,
    }
    if step == "llmcompressor":
        row.update(run_llmcompressor(model, calibration, device, args))
    else:
        # on the CPU (--tiny) a capped case poses a device with no room, so its onloaded path runs too
        reset_gpu_peak(device)  # the free memory counts what building the model left in the allocator's cache
        free = 0 if cap is not None and device.type != "cuda" else device_free_bytes(device)
        row.update(run_engine(model, STEPS[step], calibration, evaluation, device, full_layers, free))
    row["peak_host_bytes"] = read_peak_rss()
    row["published"] = PUBLISHED
    return row


def run_engine(
    model, spec: dict, calibration, evaluation, device: torch.device, full_layers: int, free: int | None
) -> dict[str, Any]:
    working = job_working_bytes(model.config, 2, tuple(calibration.shape), tuple(evaluation.shape))
    plan = plan_execution(tensor_bytes_in_memory(model), working, free, device)
    log.info("execution: %s (%s)", plan.mode, plan.reason)
    if not plan.onloaded:
        model.to(device)
    reset_gpu_peak(device)
    clock = LayerClock(device)
    typed = step_spec(spec)
    result = run_step(model, typed, StepContext(calibration=calibration, report_progress=clock, device=device))
    step_s = time.perf_counter() - clock.started
    peaks = gpu_peaks(device)
    ppl = perplexity(model, evaluation, device, lambda f, m: None, onloaded=plan.onloaded)["perplexity"]
    return {
        "spec": spec,
        "execution": plan.to_dict(),
        "step_s": step_s,
        "seconds_per_layer": (clock.marks[-1] - clock.marks[0]) / max(len(clock.marks) - 1, 1),
        "first_layer_s": clock.marks[0] if clock.marks else None,
        "projected_s": clock.projected(model.config.num_hidden_layers, full_layers),
        "summary": {k: v for k, v in result.summary.items() if isinstance(v, int | float | str | bool)},
        "perplexity": ppl,
        **peaks,
    }


def run_llmcompressor(model, calibration, device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    """llm-compressor's oneshot GPTQ W4A16 g128 on the same model and tokens (its sequential pipeline onloads
    layers itself); imported here only."""
    from datasets import Dataset  # noqa: PLC0415 - a wheel only this case needs
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    data = Dataset.from_dict(
        {"input_ids": calibration.tolist(), "attention_mask": torch.ones_like(calibration).tolist()}
    )
    # oneshot re-reads the model's config from its name_or_path and insists on a processor, though the dataset
    # is already token ids: a saved config and a one-token tokenizer satisfy both
    config_dir = tempfile.mkdtemp()
    model.config.save_pretrained(config_dir)
    model.config._name_or_path = config_dir
    vocab = Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
    processor = PreTrainedTokenizerFast(tokenizer_object=vocab)
    recipe = GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"])
    reset_gpu_peak(device)
    started = time.perf_counter()
    oneshot(
        model=model,
        dataset=data,
        recipe=recipe,
        processor=processor,
        max_seq_length=calibration.shape[1],
        num_calibration_samples=calibration.shape[0],
    )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return {
        "spec": "llmcompressor oneshot GPTQModifier W4A16",
        "step_s": time.perf_counter() - started,
        **gpu_peaks(device),
    }


def reset_gpu_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def gpu_peaks(device: torch.device) -> dict[str, int | None]:
    if device.type != "cuda":
        return {"peak_gpu_allocated_bytes": None, "peak_gpu_reserved_bytes": None}
    return {
        "peak_gpu_allocated_bytes": torch.cuda.max_memory_allocated(device),
        "peak_gpu_reserved_bytes": torch.cuda.max_memory_reserved(device),
    }


def environment(device: torch.device) -> dict[str, Any]:
    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__, "device": str(device)}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["gpu_memory_bytes"] = torch.cuda.get_device_properties(device).total_memory
    return env


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", required=True, help=f"one of {', '.join(CASES)}, or all")
    parser.add_argument("--out", required=True, help="folder for one JSON per case")
    parser.add_argument("--samples", type=int, default=None, help="calibration windows (128; tiny 4)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per window (2048; tiny 32)")
    parser.add_argument("--layers", type=int, default=None, help="run only the first N decoder layers, project")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (tests the script)")
    args = parser.parse_args(argv)
    args.samples = args.samples or (4 if args.tiny else 128)
    args.seq_len = args.seq_len or (32 if args.tiny else 2048)
    names = list(CASES) if args.case == "all" else [args.case]
    unknown = sorted(set(names) - set(CASES))
    if unknown:
        parser.error(f"unknown case {unknown}; known: {', '.join(CASES)}")
    if args.tiny:
        names = [n for n in names if CASES[n][1] != "llmcompressor"]  # llmcompressor is not installed here
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in names:
        row = run_case(name, args)
        row["environment"] = environment(torch.device("cpu" if args.tiny else "cuda"))
        row["tiny"] = args.tiny
        (out / f"{name}.json").write_text(json.dumps(row, indent=2, default=str))
        rows.append(row)
        print(summary_line(row), flush=True)
    return rows


def summary_line(row: dict) -> str:
    gb = 1e9
    parts = [f"{row['case']}: {row['step_s']:.1f} s over {row['layers_run']}/{row['layers_full']} layers"]
    if row.get("projected_s"):
        parts.append(f"projected {row['projected_s']:.0f} s for all layers")
    if row.get("execution"):
        parts.append(f"mode {row['execution']['mode']}")
    if row.get("peak_gpu_allocated_bytes") is not None:
        parts.append(f"peak GPU {row['peak_gpu_allocated_bytes'] / gb:.1f} GB allocated")
    parts.append(f"peak host {row['peak_host_bytes'] / gb:.1f} GB")
    if row.get("perplexity") is not None:
        parts.append(f"perplexity {row['perplexity']:.4f}")
    return "; ".join(parts)


if __name__ == "__main__":
    main()
