import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from worker.engine.calibrate.targets import select_linears
from worker.engine.export.compressed import save_compressed_
from worker.engine.quantize.quant_math import (
    clipped_params,
    fake_quantize,
    int_range,
    quantize,
    requantize_in_dtype,
    rtn_params,
)
from worker.engine.steps import StepContext, run_step, step_spec

SCHEMES = [  # bits, group_size, symmetric, bound on the mean relative weight error
    (8, None, True, 1e-2),
    (8, None, False, 1e-2),
    (4, 32, True, 0.15),
    (4, 32, False, 0.15),
]


def run_rtn(model, bits, group_size, symmetric):
    step = {
        "type": "quantize",
        "method": "rtn",
        "weights": {"bits": bits, "group_size": group_size, "symmetric": symmetric},
    }
    return run_step(model, step_spec(step), StepContext(calibration=None, report_progress=lambda f, m: None))


@pytest.mark.parametrize("bits,group_size,symmetric", [(8, None, True), (4, 32, False), (4, 64, True)])
def test_math_matches_compressed_tensors(bits, group_size, symmetric):
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize as ct_fake_quantize

    torch.manual_seed(0)
    w = torch.randn(48, 128) * torch.rand(48, 1)
    scale, zero_point = rtn_params(w, bits, group_size, symmetric)
    codes = quantize(w, scale, zero_point, bits, group_size)
    qmin, qmax = int_range(bits)
    assert codes.min() >= qmin and codes.max() <= qmax and torch.equal(codes, codes.round())
    args = QuantizationArgs(
        num_bits=bits, symmetric=symmetric, strategy="group" if group_size else "channel", group_size=group_size
    )
    ct_zero = zero_point.to(torch.int8) if zero_point is not None else None
    theirs = ct_fake_quantize(
        w,
        scale if group_size else scale.reshape(-1, 1),
        ct_zero if group_size or ct_zero is None else ct_zero.reshape(-1, 1),
        args,
    )
    assert torch.equal(theirs, fake_quantize(w, scale, zero_point, bits, group_size))


@pytest.mark.parametrize("bits,group_size", [(8, None), (4, 64), (4, 32)])
def test_symmetric_scales_clip_nothing_and_use_both_ends(bits, group_size):
    """Each group's positive end lands on qmax or its negative end on qmin, whichever needs the coarser scale:
    nothing is clipped, and the scale is never coarser than absmax / qmax (the 15-level int4 form)."""
    torch.manual_seed(1)
    w = torch.randn(16, 128) * torch.rand(16, 1)
    scale, zero_point = rtn_params(w, bits, group_size, True)
    qmin, qmax = int_range(bits)
    groups = w.unflatten(-1, (-1, group_size or 128))
    assert zero_point is None
    assert (scale <= groups.abs().amax(-1) / qmax + 1e-9).all()
    codes = quantize(w, scale, zero_point, bits, group_size).unflatten(-1, (-1, group_size or 128))
    assert ((groups - codes * scale.unsqueeze(-1)).abs() <= scale.unsqueeze(-1) / 2 + 1e-6).all()  # no clipping
    assert ((codes.amax(-1) == qmax) | (codes.amin(-1) == qmin)).all()
    assert (codes.amin(-1) == qmin).any()  # the level that absmax / qmax leaves unused is in use


def test_zero_rows_and_zeros_survive():
    w = torch.zeros(4, 32)
    w[1, :16] = torch.linspace(-1, 1, 16)
    for symmetric in (True, False):
        scale, zero_point = rtn_params(w, 4, None, symmetric)
        out = fake_quantize(w, scale, zero_point, 4, None)
        assert torch.equal(out[w == 0], w[w == 0])  # pruned zeros stay exactly zero


@pytest.mark.parametrize("bits,group_size,symmetric,bound", SCHEMES)
def test_rtn_error_is_bounded_and_reported(tiny, bits, group_size, symmetric, bound):
    originals = {n: m.weight.detach().clone() for n, m in select_linears(tiny.model).items()}
    result = run_rtn(tiny.model, bits, group_size, symmetric)
    assert result.summary["mean_relative_error"] < bound
    assert set(result.quantized) == set(originals)
    for layer in result.layers:
        w = originals[layer["name"]]
        measured = float((w - tiny.model.get_submodule(layer["name"]).weight.detach()).norm() / w.norm())
        assert layer["relative_error"] == pytest.approx(measured, rel=1e-5)
        assert (layer["bits"], layer["group_size"]) == (bits, group_size)
    if bits == 4:  # 16 levels are coarser than 256 but still far from noise
        assert result.summary["mean_relative_error"] > 1e-2


def test_bad_group_size_is_refused(tiny):
    from worker.engine.steps import EngineError

    with pytest.raises(EngineError) as info:
        run_rtn(tiny.model, 4, 128, True)  # the tiny model's input widths are 64 and 128
    assert info.value.code == "bad_group_size"


def test_asymmetric_pack_quantized_loads_only_when_dequantized(tiny, tmp_path, monkeypatch):
    """Why asymmetric schemes are saved int-quantized: compressed-tensors' own pack-quantized checkpoint, zero
    points packed, is right (transformers' dequantize option loads it with our exact weights) but a plain
    from_pretrained refuses it. When that raise goes, switch asymmetric schemes to pack-quantized in
    storage_format (see ct_export's docstring)."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from worker.engine.export import compressed as ct_export

    result = run_rtn(tiny.model, 4, 32, False)
    expected = {n: tiny.model.get_submodule(n).weight.detach().clone() for n in result.quantized}
    monkeypatch.setattr(ct_export, "storage_format", lambda q: "pack-quantized")
    save_compressed_(tiny.model, result.quantized, tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as tensors:
        for name, weight in expected.items():
            zero_point = tensors.get_slice(f"{name}.weight_zero_point")
            assert zero_point.get_dtype() == "I32"
            assert zero_point.get_shape() == [weight.shape[0] * 4 // 32, weight.shape[1] // 32]  # packed by rows

    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True)
    dequantized = CompressedTensorsConfig(dequantize=True)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True, quantization_config=dequantized)
    for name, weight in expected.items():
        assert torch.equal(loaded.get_submodule(name).weight, weight), name


LOGITS_IN_CLEAN_PROCESS = textwrap.dedent(
    """
    import json, sys, torch
    from transformers import AutoModelForCausalLM
    ids, logits = torch.load(sys.argv[1]), {}
    for folder in sys.argv[3:]:
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
        with torch.no_grad():
            logits[folder] = model(input_ids=ids).logits
    torch.save(logits, sys.argv[2])
    print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("worker", "modelpress", "tests", "app"))))
    """
)


def logits_in_clean_process(folders: list[Path], ids: torch.Tensor, work: Path) -> dict[Path, torch.Tensor]:
    """Load each artifact folder in one fresh interpreter with transformers (+ compressed-tensors) alone and return
    its logits on `ids`; fails if that interpreter imported any of our code."""
    torch.save(ids, work / "ids.pt")
    run = subprocess.run(
        [sys.executable, "-c", LOGITS_IN_CLEAN_PROCESS, str(work / "ids.pt"), str(work / "out.pt"), *map(str, folders)],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == []  # nothing of ours was imported
    loaded = torch.load(work / "out.pt")
    return {folder: loaded[str(folder)] for folder in folders}


@pytest.fixture(scope="module")
def rtn_artifacts(tiny_model_dir, tmp_path_factory):
    """Every RTN scheme's artifact of one tiny model, with the in-memory logits and the logits a clean process
    gets from the artifact (one interpreter for all schemes)."""
    from worker.engine.load.checkpoint import load_model

    root = tmp_path_factory.mktemp("rtn-artifacts")
    built = {}
    for bits, group_size, symmetric, _ in SCHEMES:
        model = load_model(tiny_model_dir, "hf", torch.device("cpu")).model
        ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
        targeted = {n: m.weight.numel() for n, m in select_linears(model).items()}
        result = run_rtn(model, bits, group_size, symmetric)
        with torch.no_grad():
            expected = model(input_ids=ids).logits
        folder = root / f"int{bits}-g{group_size}-{'sym' if symmetric else 'asym'}"
        qconfig = save_compressed_(model, result.quantized, folder)
        built[(bits, group_size, symmetric)] = (folder, targeted, result, expected, qconfig)
    loaded = logits_in_clean_process([b[0] for b in built.values()], ids, root)
    return {key: (*value, loaded[value[0]]) for key, value in built.items()}


@pytest.mark.parametrize("bits,group_size,symmetric,bound", SCHEMES)
def test_artifact_loads_alone_and_matches(rtn_artifacts, bits, group_size, symmetric, bound):
    folder, targeted, result, expected, qconfig, loaded = rtn_artifacts[(bits, group_size, symmetric)]
    torch.testing.assert_close(loaded, expected, rtol=1e-4, atol=1e-4)

    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and qconfig["format"] == config["format"]
    assert config["format"] == ("pack-quantized" if symmetric else "int-quantized")
    quantized_bytes, dtypes = 0, set()
    with safe_open(folder / "model.safetensors", "pt") as tensors:
        for key in tensors.keys():
            module = key.rsplit(".", 1)[0]
            if module in targeted:
                dtypes.add(tensors.get_slice(key).get_dtype())
                quantized_bytes += tensors.get_tensor(key).nbytes
                if key.endswith((".weight", ".weight_packed")):  # the codes are integers, never a float copy
                    assert tensors.get_slice(key).get_dtype() in ("I8", "I32"), key
    assert dtypes & {"I32", "I8"}
    ratio = quantized_bytes / (4 * sum(targeted.values()))
    assert ratio == pytest.approx(
        result.summary["targeted_weight_bytes_after"] / result.summary["targeted_weight_bytes_before"]
    )
    if bits == 8:
        assert ratio < 0.35
    if bits == 4 and symmetric:
        assert ratio < 0.2


@pytest.mark.parametrize("symmetric", [True, False])
def test_clipped_params_scale_the_range_per_group_and_ratio_one_is_rtn(symmetric):
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(3))
    full_scale, full_zero = rtn_params(w, 4, 32, symmetric)
    ones_scale, ones_zero = clipped_params(w, 4, 32, symmetric, torch.ones(8, 2))  # the tensor path, no shortcut
    assert torch.equal(ones_scale, full_scale)
    assert (ones_zero is None and full_zero is None) or torch.equal(ones_zero, full_zero)
    ratio = torch.tensor([0.5, 0.8]).expand(8, 2)  # each group shrinks by its own ratio
    scale, _ = clipped_params(w, 4, 32, symmetric, ratio)
    torch.testing.assert_close(scale, full_scale * ratio)
    half_scale, _ = clipped_params(w, 4, 32, symmetric, 0.5)
    torch.testing.assert_close(half_scale, full_scale * 0.5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("bits", "group_size"), [(8, None), (8, 128), (4, 128)])
def test_weights_held_in_half_precision_survive_compressed_tensors_round_trip(dtype, bits, group_size):
    """compressed-tensors re-derives the codes from a bf16 / fp16 weight dividing in that dtype, which for 8-bit
    codes can land one code away: the weight the engine keeps is the one its round trip reproduces."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize as ct_fake_quantize

    weight = torch.randn(512, 1024, generator=torch.Generator().manual_seed(3)) * 0.02
    scale, zero = rtn_params(weight, bits, group_size, True)
    held, held_scale = requantize_in_dtype(
        fake_quantize(weight, scale, zero, bits, group_size), scale, zero, bits, group_size, dtype
    )
    strategy = "channel" if group_size is None else "group"
    args = QuantizationArgs(num_bits=bits, symmetric=True, strategy=strategy, group_size=group_size)
    assert torch.equal(ct_fake_quantize(held, held_scale.reshape(512, -1), None, args), held)
    assert held.dtype == dtype and held_scale.dtype == dtype
