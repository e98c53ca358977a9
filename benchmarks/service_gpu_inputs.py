"""The inputs of the service benchmark: a random bf16 Llama checkpoint packed as an uploadable .tar, and text.

    python -m benchmarks.service_gpu_inputs --folder DIR [--tiny] [--calibration-tokens N] [--evaluation-tokens N]

Writes DIR/model.tar (sharded safetensors + model.safetensors.index.json + config.json + a tokenizer, at the
archive root, as `modelpress upload model` sends a .tar), DIR/calibration.txt and DIR/evaluation.txt, and prints
one JSON line saying what it wrote and how long it took.

The weights are made on the GPU when there is one (on the CPU otherwise), in bfloat16, one tensor at a time, and
each shard is serialized straight into the archive: neither a whole model in host memory nor a model folder beside
the archive (the archive alone is 16 GB at the 8B shape). Norm weights are ones, every other tensor is drawn from
N(0, 0.02), as transformers initializes a Llama. The tokenizer is the tests' small byte-level BPE, trained here on
generated text (no hub); its ids are far below the model's vocabulary, which only the embedding table's size sees.
The text is the same generator's, with other seeds, long enough for the windows asked for.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SHARD_BYTES = 2 * 1024**3  # shard size: what one serialize-and-append holds in host memory
INIT_STD = 0.02


def model_config(tiny: bool):
    """The Llama-3-8B shape (or the benchmarks' tiny Llama), saved with dtype bfloat16."""
    from benchmarks.gpu_engine import llama_config

    config = llama_config(smoke=tiny)
    config.dtype = "bfloat16"
    config.architectures = ["LlamaForCausalLM"]
    return config


def tensor_shapes(config) -> dict[str, tuple[tuple[int, ...], bool]]:
    """name -> (shape, is a norm weight) for every tensor the checkpoint holds, from a model on the meta device."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return {name: (tuple(t.shape), name.endswith("norm.weight")) for name, t in model.state_dict().items()}


def plan_shards(shapes: dict[str, tuple[tuple[int, ...], bool]], shard_bytes: int) -> list[list[str]]:
    """Tensor names grouped into shards of at most `shard_bytes` (bf16), in the model's order."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, (shape, _) in shapes.items():
        nbytes = 2 * _numel(shape)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def random_tensor(shape: tuple[int, ...], norm: bool, device, generator):
    import torch

    if norm:
        return torch.ones(shape, dtype=torch.bfloat16, device=device)
    return torch.empty(shape, dtype=torch.bfloat16, device=device).normal_(0.0, INIT_STD, generator=generator)


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(time.time())
    tar.addfile(info, io.BytesIO(data))


def write_checkpoint(archive: Path, tiny: bool, seed: int = 0, shard_bytes: int = SHARD_BYTES) -> dict:
    """Write the model archive; returns its shape, parameter count, shards and bytes."""
    import torch
    from safetensors.torch import save

    from tests.utils.factories import build_tokenizer

    config = model_config(tiny)
    shapes = tensor_shapes(config)
    shards = plan_shards(shapes, shard_bytes)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    generator = torch.Generator(device=device).manual_seed(seed)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {tensor: file for file, group in zip(names, shards, strict=True) for tensor in group}
    total = sum(2 * _numel(shape) for shape, _ in shapes.values())
    with tarfile.open(archive, "w") as tar:
        _add_bytes(tar, "config.json", config.to_json_string().encode())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        _add_bytes(tar, "model.safetensors.index.json", json.dumps(index, indent=2).encode())
        with tempfile.TemporaryDirectory() as folder:
            vocabulary = build_tokenizer(Path(folder))
            for path in sorted(Path(folder).iterdir()):
                tar.add(path, arcname=path.name)
        for file, group in zip(names, shards, strict=True):
            tensors = {name: random_tensor(*shapes[name], device, generator).cpu() for name in group}
            _add_bytes(tar, file, save(tensors, metadata={"format": "pt"}))
            del tensors
    return {
        "shape": {key: getattr(config, key) for key in SHAPE_KEYS},
        "parameters": sum(_numel(shape) for shape, _ in shapes.values()),
        "tensor_bytes": total,
        "shards": len(shards),
        "tokenizer_vocabulary": vocabulary,
        "made_on": device.type,
    }


SHAPE_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
)


def write_text(path: Path, tokenizer, tokens: int, seed: int) -> int:
    """Generated text of at least `tokens` tokens (grown until it is); returns how many it has."""
    from tests.utils.factories import sample_text

    lines = max(64, tokens // 8)
    while True:
        text = sample_text(lines, seed)
        count = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if count >= tokens:
            path.write_text(text)
            return count
        lines = int(lines * 1.3 * tokens / max(count, 1)) + 1


def write_inputs(folder: Path, tiny: bool, calibration_tokens: int, evaluation_tokens: int) -> dict:
    from transformers import AutoTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    checkpoint = write_checkpoint(folder / "model.tar", tiny)
    checkpoint["build_s"] = time.perf_counter() - started
    checkpoint["archive_bytes"] = (folder / "model.tar").stat().st_size
    with tarfile.open(folder / "model.tar") as tar, tempfile.TemporaryDirectory() as scratch:
        members = [m for m in tar.getmembers() if m.name.startswith(("tokenizer", "special_tokens"))]
        tar.extractall(scratch, members=members, filter="data")
        tokenizer = AutoTokenizer.from_pretrained(scratch)
    text = {
        "calibration_tokens": write_text(folder / "calibration.txt", tokenizer, calibration_tokens, seed=11),
        "evaluation_tokens": write_text(folder / "evaluation.txt", tokenizer, evaluation_tokens, seed=12),
    }
    return {"checkpoint": checkpoint, "text": text}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true", help="the tiny Llama instead of the Llama-3-8B shape")
    parser.add_argument("--calibration-tokens", type=int, required=True)
    parser.add_argument("--evaluation-tokens", type=int, required=True)
    args = parser.parse_args()
    written = write_inputs(args.folder, args.tiny, args.calibration_tokens, args.evaluation_tokens)
    print(json.dumps(written), flush=True)


if __name__ == "__main__":
    main()
