"""Every allow-listed architecture runs jobs end to end; the refused ones do not, and the docs table says so.

Each case runs the whole pipeline (load, evaluate, steps, export, reload) on a tiny random model built from a
transformers config; the artifact is then loaded by transformers and its perplexity compared with the report.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from app.architectures import ARCHITECTURES, GGUF_ARCHITECTURES, REFUSED, SUPPORTED_ARCHITECTURES
from tests.utils.checks import transformers_perplexity
from tests.utils.factories import build_tiny_model_of, run_engine_job
from worker.engine import EngineError
from worker.engine.load import load_model

pytestmark = pytest.mark.usefixtures("one_thread")

SEQ_LEN, WINDOWS = 32, 2
DOCS = Path(__file__).resolve().parents[2] / "docs" / "architectures.md"
README = DOCS.parents[1] / "README.md"

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


def run(folder: Path, recipe: list[dict], text: Path, out: Path) -> tuple[dict, Path]:
    """(report, unpacked artifact) of one job on the tiny model, calibrated and evaluated on `text`."""
    return run_engine_job(
        folder,
        recipe,
        out,
        calibration=(text, {"samples": 4, "seq_len": SEQ_LEN}),
        evaluation=(text, {"seq_len": SEQ_LEN, "max_windows": WINDOWS}),
        datasets={"d": (text, "txt")},
    )


def reloaded_perplexity(folder: Path, text: Path) -> float:
    """Perplexity of the artifact as transformers alone loads it, over the windows the report used."""
    return transformers_perplexity(folder, text, SEQ_LEN, WINDOWS)["perplexity"]


def all_linears(folder: Path) -> set[str]:
    """Every Linear of the model as the engine sees it (one per expert matrix in a mixture-of-experts model)."""
    model = load_model(folder, "hf", torch.device("cpu")).model
    return {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def head_and_routers(folder: Path) -> set[str]:
    """What every step ignores by default: the output head and the experts' routers (`mlp.gate`)."""
    model = load_model(folder, "hf", torch.device("cpu")).model
    return {"lm_head"} | {n for n, _ in model.named_modules() if n.endswith(".mlp.gate")}


def decoder_linears(folder: Path) -> set[str]:
    """The Linears every step targets by default: all but the output head and the experts' routers."""
    return all_linears(folder) - head_and_routers(folder)


ON_DISK = {"mixtral": (".mlp.", ".block_sparse_moe.")}
"""How transformers renames a module when it saves this model_type (Mixtral keeps its original checkpoint names)."""


def disk_name(model_type: str, name: str) -> str:
    old, new = ON_DISK.get(model_type, ("", ""))
    return name.replace(old, new) if old else name


def config_ignore(config: dict) -> set[str]:
    return set(config["quantization_config"]["ignore"])


def assert_quantization_config(artifact: Path, model_type: str, skipped: set[str]) -> None:
    """compressed-tensors' config targets Linear, ignores exactly the `skipped` modules (the head and the
    routers), and no quantized tensor on disk belongs to one of them."""
    config = json.loads((artifact / "config.json").read_text())
    quantization = config["quantization_config"]
    assert quantization["quant_method"] == "compressed-tensors"
    assert [group["targets"] for group in quantization["config_groups"].values()] == [["Linear"]]
    skipped_on_disk = {disk_name(model_type, n) for n in skipped}
    assert {disk_name(model_type, n) for n in config_ignore(config)} == skipped_on_disk
    tensors = load_file(artifact / "model.safetensors")
    quantized = {n.rsplit(".", 1)[0] for n in tensors if n.endswith(".weight_scale")}
    assert quantized and not quantized & skipped_on_disk


LAYOUT_KEYS = ("rope_parameters", "layer_types", "sliding_window", "tie_word_embeddings")
"""Config fields the artifact must keep as the upload had them (Llama 3 rope scaling, Gemma 3's sliding layers)."""


@pytest.mark.parametrize("recipe", list(CORE), ids=list(CORE))
@pytest.mark.parametrize("model_type", list(SUPPORTED_ARCHITECTURES))
def test_listed_architecture_prunes_and_quantizes(model_type, recipe, tiny_models, text_dataset, tmp_path) -> None:
    folder = tiny_models(model_type)
    report, artifact = run(folder, CORE[recipe], text_dataset, tmp_path)

    prune, quant = report["steps"]
    linears = decoder_linears(folder)
    assert linears, "the model has no Linear layer to work on"
    assert {layer["name"] for layer in prune["layers"]} == linears
    assert all(layer["sparsity"] == pytest.approx(0.5, abs=0.02) for layer in prune["layers"])
    assert {layer["name"] for layer in quant["layers"]} == linears

    config = json.loads((artifact / "config.json").read_text())
    assert config["model_type"] == model_type
    uploaded = json.loads((folder / "config.json").read_text())
    assert {k: config.get(k) for k in LAYOUT_KEYS} == {k: uploaded.get(k) for k in LAYOUT_KEYS}
    assert_quantization_config(artifact, model_type, head_and_routers(folder))
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
    report, artifact = run(tiny_models(model_type), steps, text_dataset, tmp_path)
    assert [f"{s['type']}:{s['method']}" for s in report["steps"]] == [f"{s['type']}:{s['method']}" for s in steps]
    assert_quantization_config(artifact, model_type, head_and_routers(artifact))  # depth pruning drops a layer
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


def table_lines(path: Path) -> list[str]:
    """The rows of the architecture table in a markdown file."""
    lines = path.read_text().splitlines()
    start = lines.index("| architecture | model_type | GGUF | methods that run | limits |")
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("|"))
    return lines[start:end]


def test_readme_shows_the_docs_table() -> None:
    assert table_lines(README) == table_lines(DOCS)


def test_docs_table_matches_the_allow_list() -> None:
    """docs/architectures.md lists each allow-listed architecture with the methods it runs, and the refused ones."""
    rows = {}
    for line in table_lines(DOCS):
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if len(cells) >= 4 and cells[1] in SUPPORTED_ARCHITECTURES | REFUSED.keys():
            rows[cells[1]] = (cells[0], set(re.findall(r"[a-z]+:[a-z0-9]+", cells[3])))
    expected = {a.model_type: (a.hf_class, ALL_METHODS - set(a.unsupported or {})) for a in ARCHITECTURES}
    assert {k: v for k, v in rows.items() if k in SUPPORTED_ARCHITECTURES} == expected
    assert {k: methods for k, (_, methods) in rows.items() if k in REFUSED} == {k: set() for k in REFUSED}


def test_tiny_models_have_the_layouts_under_test(tiny_models) -> None:
    """The llama model uses Llama 3.x rope scaling; gemma3_text alternates a sliding layer (a window shorter than
    the test windows) with a global one and ties its embeddings."""
    llama = json.loads((tiny_models("llama") / "config.json").read_text())
    assert llama["rope_parameters"]["rope_type"] == "llama3"
    gemma3 = json.loads((tiny_models("gemma3_text") / "config.json").read_text())
    assert gemma3["layer_types"] == ["sliding_attention", "full_attention"] and gemma3["sliding_window"] < SEQ_LEN
    assert gemma3["tie_word_embeddings"]
