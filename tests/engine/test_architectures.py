"""Every allow-listed architecture runs jobs end to end; the refused ones do not, and the docs table says so.

Each case runs the whole pipeline (load, evaluate, steps, export, reload) on a tiny random model built from a
transformers config; the artifact is then loaded by transformers and its perplexity compared with the report.
"""

from __future__ import annotations

import json
import math
import re
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from app.architectures import ARCHITECTURES, GGUF_ARCHITECTURES, REFUSED, SUPPORTED_ARCHITECTURES
from modelpress.specs import JobSpec
from tests.utils.factories import build_tiny_model_of
from worker.engine import EngineError, EngineRequest, run_pipeline
from worker.engine.load import load_model

pytestmark = pytest.mark.usefixtures("one_thread")

SEQ_LEN, WINDOWS = 32, 2
DOCS = Path(__file__).resolve().parents[2] / "docs" / "architectures.md"

CORE = {
    "magnitude+rtn-int8": [
        {"type": "prune", "method": "magnitude", "sparsity": 0.5},
        {"type": "quantize", "method": "rtn", "weights": {"bits": 8, "group_size": None, "symmetric": True}},
    ],
    "wanda+gptq-int4": [
        {"type": "prune", "method": "wanda", "sparsity": 0.5},
        {"type": "quantize", "method": "gptq", "weights": {"bits": 4, "group_size": 32, "symmetric": True}},
    ],
}
"""One prune and one quantize job per architecture; wanda and gptq exercise the calibration hooks."""

INT4 = {"bits": 4, "group_size": 32, "symmetric": True}
OTHERS = {
    "structured+depth+sparsegpt+kd+awq": [
        {"type": "prune", "method": "structured", "mlp_sparsity": 0.5, "attention_sparsity": 0.5},
        {"type": "prune", "method": "depth", "num_layers": 1},
        {"type": "prune", "method": "sparsegpt", "sparsity": 0.5},
        {"type": "distill", "method": "kd", "dataset_id": "d", "steps": 2, "batch_size": 2, "seq_len": SEQ_LEN},
        {"type": "quantize", "method": "awq", "weights": INT4},
    ],
    "magnitude-2:4+fp8-gptq": [
        {"type": "prune", "method": "magnitude", "pattern": "2:4"},
        {"type": "quantize", "method": "fp8", "gptq": True},
    ],
    "smoothquant": [{"type": "quantize", "method": "smoothquant"}],
    "rtn-int4-asymmetric": [
        {"type": "quantize", "method": "rtn", "weights": {"bits": 4, "group_size": 32, "symmetric": False}}
    ],
    "fp8": [{"type": "quantize", "method": "fp8"}],
}
"""The other methods, in as few jobs as cover them all (minus the steps an architecture lists as unsupported)."""

MOE = {"qwen3_moe", "mixtral"}
ALL_METHODS = {f"{s['type']}:{s['method']}" for recipe in (*CORE.values(), *OTHERS.values()) for s in recipe}


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory):
    """A tiny random model folder per model_type, built once per module."""
    root = tmp_path_factory.mktemp("architectures")
    built: dict[str, Path] = {}

    def of(model_type: str) -> Path:
        if model_type not in built:
            built[model_type] = build_tiny_model_of(root / model_type, model_type)
        return built[model_type]

    return of


def run(folder: Path, recipe: list[dict], text: Path, out: Path) -> dict:
    spec = {
        "model_id": "m",
        "recipe": recipe,
        "calibration": {"dataset_id": "d", "samples": 4, "seq_len": SEQ_LEN},
        "evaluation": {"dataset_id": "d", "seq_len": SEQ_LEN, "max_windows": WINDOWS},
    }
    request = EngineRequest(
        model_path=folder,
        model_format="hf",
        spec=JobSpec.model_validate(spec),
        calibration_path=text,
        calibration_format="txt",
        evaluation_path=text,
        evaluation_format="txt",
        output_dir=out,
        device="cpu",
        datasets={"d": (text, "txt")},
        checkpoint_dir=out / "checkpoints",
    )
    return run_pipeline(request, lambda event: None)


def unpack(out: Path) -> Path:
    folder = out / "artifact"
    with tarfile.open(out / "model.tar") as tar:
        tar.extractall(folder, filter="data")
    return folder


def reloaded_perplexity(folder: Path, text: Path) -> float:
    """Perplexity of the artifact as transformers loads it, over the windows the report used."""
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    ids = torch.tensor(tokenizer(text.read_text(), add_special_tokens=False)["input_ids"])
    windows = ids[: SEQ_LEN * WINDOWS].reshape(WINDOWS, SEQ_LEN)
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None]).loss for w in windows]
    return math.exp(float(torch.stack(losses).mean()))


def decoder_linears(folder: Path) -> set[str]:
    """The decoder's Linears as the engine sees them (one per expert matrix in a mixture-of-experts model),
    without the output head and the experts' routers."""
    model = load_model(folder, "hf", torch.device("cpu")).model
    return {
        n
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n != "lm_head" and not n.endswith(".mlp.gate")
    }


ON_DISK = {"mixtral": (".mlp.", ".block_sparse_moe.")}
"""How transformers renames a module when it saves this model_type (Mixtral keeps its original checkpoint names)."""


def disk_name(model_type: str, name: str) -> str:
    old, new = ON_DISK.get(model_type, ("", ""))
    return name.replace(old, new) if old else name


def config_ignore(config: dict) -> set[str]:
    return set(config["quantization_config"]["ignore"])


@pytest.mark.parametrize("recipe", list(CORE), ids=list(CORE))
@pytest.mark.parametrize("model_type", list(SUPPORTED_ARCHITECTURES))
def test_listed_architecture_prunes_and_quantizes(model_type, recipe, tiny_models, text_dataset, tmp_path) -> None:
    folder = tiny_models(model_type)
    report = run(folder, CORE[recipe], text_dataset, tmp_path)

    prune, quant = report["steps"]
    linears = decoder_linears(folder)
    assert linears, "the model has no Linear layer to work on"
    assert {layer["name"] for layer in prune["layers"]} == linears
    assert all(layer["sparsity"] == pytest.approx(0.5, abs=0.02) for layer in prune["layers"])
    assert {layer["name"] for layer in quant["layers"]} == linears

    artifact = unpack(tmp_path)
    config = json.loads((artifact / "config.json").read_text())
    assert config["model_type"] == model_type
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    tensors = load_file(artifact / "model.safetensors")
    saved = {disk_name(model_type, name) for name in linears}
    assert all(f"{name}.weight_scale" in tensors for name in saved), "a targeted Linear was saved unquantized"
    routers = {n for n in tensors if n.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight"))}
    assert all(tensors[n].is_floating_point() for n in routers), "a router was quantized"
    assert {n.removesuffix(".weight") for n in routers} <= {disk_name(model_type, n) for n in config_ignore(config)}
    assert reloaded_perplexity(artifact, text_dataset) == pytest.approx(report["optimized"]["perplexity"], rel=0.01)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", list(OTHERS), ids=list(OTHERS))
@pytest.mark.parametrize("model_type", list(SUPPORTED_ARCHITECTURES))
def test_listed_architecture_runs_the_other_methods(model_type, recipe, tiny_models, text_dataset, tmp_path) -> None:
    unsupported = next(a for a in ARCHITECTURES if a.model_type == model_type).unsupported or {}
    steps = [s for s in OTHERS[recipe] if f"{s['type']}:{s['method']}" not in unsupported]
    if model_type in MOE and recipe == "rtn-int4-asymmetric":
        with pytest.raises(EngineError, match="use symmetric weights on mixture-of-experts models"):
            run(tiny_models(model_type), steps, text_dataset, tmp_path)
        return
    if not steps:
        pytest.skip(f"{model_type} cannot run any step of {recipe}")
    report = run(tiny_models(model_type), steps, text_dataset, tmp_path)
    assert [f"{s['type']}:{s['method']}" for s in report["steps"]] == [f"{s['type']}:{s['method']}" for s in steps]
    artifact = unpack(tmp_path)
    assert reloaded_perplexity(artifact, text_dataset) == pytest.approx(report["optimized"]["perplexity"], rel=0.01)


@pytest.mark.parametrize(
    ("model_type", "step"),
    [(a.model_type, key) for a in ARCHITECTURES for key in (a.unsupported or {})],
)
def test_unsupported_step_really_fails(model_type, step, tiny_models, text_dataset, tmp_path) -> None:
    """An entry in `unsupported` is true: the engine cannot run that step on this architecture."""
    (recipe,) = [s for r in OTHERS.values() for s in r if f"{s['type']}:{s['method']}" == step]
    with pytest.raises((AttributeError, RuntimeError, ValueError, KeyError)):
        run(tiny_models(model_type), [recipe], text_dataset, tmp_path)


@pytest.mark.parametrize("model_type", list(REFUSED))
def test_refused_architecture_really_fails(model_type, tiny_models, text_dataset, tmp_path) -> None:
    """A refused family is refused for a reason: the engine cannot run even magnitude pruning on it."""
    with pytest.raises(EngineError, match="matched no Linear layer"):
        run(
            tiny_models(model_type), [{"type": "prune", "method": "magnitude", "sparsity": 0.5}], text_dataset, tmp_path
        )


def test_gguf_names_are_ones_transformers_dequantizes() -> None:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    assert set(GGUF_ARCHITECTURES) <= set(GGUF_SUPPORTED_ARCHITECTURES)
    assert {model_type for _, model_type in GGUF_ARCHITECTURES.values()} <= set(SUPPORTED_ARCHITECTURES)


def test_docs_table_matches_the_allow_list() -> None:
    """docs/architectures.md lists each allow-listed architecture with the methods it runs, and the refused ones."""
    rows = {}
    for line in DOCS.read_text().splitlines():
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if len(cells) >= 4 and cells[1] in SUPPORTED_ARCHITECTURES | REFUSED.keys():
            rows[cells[1]] = (cells[0], set(re.findall(r"[a-z]+:[a-z0-9]+", cells[3])))
    expected = {a.model_type: (a.hf_class, ALL_METHODS - set(a.unsupported or {})) for a in ARCHITECTURES}
    assert {k: v for k, v in rows.items() if k in SUPPORTED_ARCHITECTURES} == expected
    assert {k: methods for k, (_, methods) in rows.items() if k in REFUSED} == {k: set() for k in REFUSED}
