"""GPTQ, AWQ, SmoothQuant and FP8: math against compressed-tensors, exactness of folding, error bounds, and every
scheme's artifact loaded in a clean process by transformers with the logits of the in-memory model."""

import json

import pytest
import torch
from safetensors import safe_open

from tests.engine.quantize.test_quantization import logits_in_clean_process
from worker.engine import steps as engine
from worker.engine.calibrate.layerwise import decoder_layers
from worker.engine.calibrate.targets import select_linears
from worker.engine.export.compressed import save_compressed_
from worker.engine.quantize.awq import FOLDS, NORM_FOLDS, fold_checked_, fold_groups
from worker.engine.quantize.awq_math import candidate_scales, scale_candidates, weight_means
from worker.engine.quantize.common import REPORT_WINDOWS, LayerGroup, calibrated_layers, quantize_
from worker.engine.quantize.gptq_math import gptq_quantize
from worker.engine.quantize.quant_math import (
    fake_quantize,
    fake_quantize_tokens,
    fp8_fake_quantize,
    fp8_params,
    output_error,
    rtn_params,
)
from worker.engine.quantize.smoothquant import smoothing_factors
from worker.engine.steps import StepContext, step_spec

INT4_G32 = {"bits": 4, "group_size": 32, "symmetric": True}


def calibration_windows(model, count=4, length=48, seed=0):
    return torch.randint(0, model.config.vocab_size, (count, length), generator=torch.Generator().manual_seed(seed))


def run_step(model, step, calibration):
    step = {"type": "quantize", **step}
    return engine.run_step(
        model, step_spec(step), StepContext(calibration=calibration, report_progress=lambda f, m: None)
    )


def correlated_inputs(tokens=2048, features=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, 12, generator=g) @ torch.randn(12, features, generator=g)
    x = x + 0.05 * torch.randn(tokens, features, generator=g)
    return x * (0.2 + 3 * torch.rand(features, generator=g))  # unequal channel magnitudes, as in LLMs


# --- math -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size,symmetric", [(32, True), (None, False)])
def test_gptq_beats_rtn_in_output_error_with_correlated_inputs(act_order, group_size, symmetric):
    x = correlated_inputs()
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    hessian = 2 / x.shape[0] * x.T @ x
    q, scale, zero = gptq_quantize(w, hessian, 4, group_size, symmetric, block_size=48, act_order=act_order)
    assert torch.equal(fake_quantize(q, scale, zero, 4, group_size), q)  # on the grid its scales describe
    rtn = fake_quantize(w, *rtn_params(w, 4, group_size, symmetric), 4, group_size)
    measured = float((x @ (w - q).T).norm() / (x @ w.T).norm())
    assert measured == pytest.approx(output_error(w, q, hessian), rel=1e-3)
    assert output_error(w, q, hessian) < 0.6 * output_error(w, rtn, hessian)


def test_gptq_on_the_fp8_grid_beats_rounding_to_nearest():
    x = correlated_inputs()
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(2)) * 0.05
    hessian = 2 / x.shape[0] * x.T @ x
    q, scale, zero = gptq_quantize(w, hessian, 8, None, True, kind="float")
    assert zero is None and torch.equal(scale, fp8_params(w))
    assert torch.equal(fp8_fake_quantize(q, scale), q)  # every weight is an E4M3 value times its row's scale
    rtn = fp8_fake_quantize(w, fp8_params(w))
    assert output_error(w, q, hessian) < 0.8 * output_error(w, rtn, hessian)
    with pytest.raises(ValueError, match="FP8"):
        gptq_quantize(w, hessian, 4, 32, True, kind="float")


def test_gptq_handles_dead_columns_and_a_singular_hessian():
    x = correlated_inputs(tokens=64)  # fewer tokens than features: H is singular
    x[:, 5] = 0  # an input channel that never fires
    w = torch.randn(16, 128)
    q, _, _ = gptq_quantize(w, 2 / 64 * x.T @ x, 4, 32, True, act_order=True)
    assert torch.isfinite(q).all() and (q[:, 5] == 0).all()


@pytest.mark.parametrize("kind,num_bits,type_", [("int8", 8, "int"), ("fp8", 8, "float")])
def test_token_activation_quant_matches_compressed_tensors(kind, num_bits, type_):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationStatus
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    x = torch.randn(2, 7, 96) * torch.rand(2, 7, 1) * 10
    x[0, 3] = 0  # an all-zero token
    args = QuantizationArgs(num_bits=num_bits, type=type_, symmetric=True, strategy="token", dynamic=True)
    module = torch.nn.Linear(96, 4)
    module.quantization_status = QuantizationStatus.FROZEN
    theirs = forward_quantize(module, x, "input", args)
    assert torch.equal(fake_quantize_tokens(x, kind), theirs)
    assert not torch.equal(theirs, x)


def test_fp8_weights_match_compressed_tensors():
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize as ct_fake_quantize

    w = torch.randn(32, 64) * torch.rand(32, 1) * 3
    scale = fp8_params(w)
    ours = fp8_fake_quantize(w, scale)
    args = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="channel")
    assert torch.equal(ct_fake_quantize(w, scale, None, args), ours)
    assert float((ours - w).norm() / w.norm()) < 0.05


# --- folding is exact before quantization ---------------------------------------------------------------------


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def first_layer_group(model):
    linears = select_linears(model)
    windows = calibration_windows(model, count=2, length=16)
    layers = calibrated_layers(model, linears, windows, "cpu", None)
    group = next(layers)
    return group, layers


@pytest.mark.parametrize("folds", [FOLDS, NORM_FOLDS], ids=["awq", "smoothquant"])
def test_folding_scales_keeps_the_function(tiny, folds):
    model = tiny.model
    ids = calibration_windows(model, count=2, length=20, seed=3)
    expected = logits(model, ids)
    g = torch.Generator().manual_seed(0)
    folded = 0
    for layer in model.model.layers:
        group = LayerGroup(step=_Pass(layer, model), linears=select_linears(model), stats={})
        for site in fold_groups(group, folds):
            s = 0.25 + 4 * torch.rand(site.features, generator=g)
            assert fold_checked_(site, [group.linears[c] for c in site.consumers], s)
            folded += 1
    llama_folds = 4 if folds is FOLDS else 2  # v_proj → o_proj too, under grouped-query attention
    assert folded == llama_folds * len(model.model.layers)
    torch.testing.assert_close(logits(model, ids), expected, rtol=1e-4, atol=1e-4)


class _Pass:
    """Just what fold_groups reads from a LayerPass: the layer and its full name."""

    def __init__(self, layer, model):
        self.layer = layer
        self.name = next(n for n, m in model.named_modules() if m is layer)


def test_smoothing_factors_balance_activation_and_weight_ranges():
    x_absmax = torch.tensor([100.0, 1.0, 0.0])
    w = torch.tensor([[0.01, 1.0, 1.0]])
    s = smoothing_factors(x_absmax, [w], 0.5)
    assert s[0] == pytest.approx(100.0)  # sqrt(100 / 0.01)
    assert s[2] == 1.0  # a channel that never fired is left alone
    assert torch.allclose(x_absmax[:2] / s[:2], (w[0, :2] * s[:2]), rtol=1e-5)  # equal ranges at α = 0.5


def test_shared_inputs_are_observed_once(tiny):
    group, layers = first_layer_group(tiny.model)
    layers.close()
    q, k, v = (group.stats[f"model.layers.0.self_attn.{p}_proj"] for p in "qkv")
    gate, up = (group.stats[f"model.layers.0.mlp.{p}_proj"] for p in ("gate", "up"))
    assert q is k is v and gate is up and q is not gate
    assert group.stats["model.layers.0.self_attn.o_proj"] is not q


# --- steps ----------------------------------------------------------------------------------------------------


def test_gptq_step_beats_rtn_in_reported_output_error(tiny_model_dir):
    from worker.engine.load.checkpoint import load_model

    errors = {}
    for method, extra in (("rtn", {}), ("gptq", {"act_order": True}), ("gptq_plain", {"act_order": False})):
        model = load_model(tiny_model_dir, "hf", torch.device("cpu")).model
        step = {"method": method.split("_")[0], "weights": INT4_G32, **extra}
        result = run_step(model, step, calibration_windows(model, count=8, length=64))
        assert all(layer["output_error"] is not None for layer in result.layers)
        errors[method] = result.summary["mean_output_error"]
    # random embeddings give nearly isotropic inputs here, where GPTQ gains least (see the correlated test above)
    assert errors["gptq"] < 0.9 * errors["rtn"] and errors["gptq_plain"] < 0.9 * errors["rtn"]


@pytest.mark.parametrize("step", [{"method": "rtn", "weights": INT4_G32}, {"method": "fp8"}])
def test_report_only_statistics_run_each_layer_once_over_bounded_windows(tiny_model_dir, step):
    from worker.engine.load.checkpoint import load_model
    from worker.engine.quantize.common import quantize_layers

    model = load_model(tiny_model_dir, "hf", torch.device("cpu")).model
    _, layers = decoder_layers(model)
    calls = [0] * len(layers)
    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda _m, _a, i=i: calls.__setitem__(i, calls[i] + 1))
    windows = calibration_windows(model, count=3 * REPORT_WINDOWS, length=32)
    result = run_step(model, step, windows)
    assert calls == [REPORT_WINDOWS] * len(layers)  # one forward per layer and window, not two over all 24
    assert all(layer["output_error"] is not None and layer["output_error"] > 0 for layer in result.layers)

    if step["method"] == "rtn":  # the Gram-matrix measurement on those windows, which observes each float layer
        # before rounding it: q/k/v read the same inputs in both; o/gate/up/down here read the quantized ones
        reference = load_model(tiny_model_dir, "hf", torch.device("cpu")).model
        linears = select_linears(reference)
        context = StepContext(calibration=windows[:REPORT_WINDOWS], report_progress=lambda f, m: None)
        expected = quantize_layers(reference, context, linears, lambda _n, lin, _s: quantize_(lin.weight, 4, 32, True))
        for got, want in zip(result.layers, expected.layers, strict=True):
            assert got["name"] == want["name"]
            same_inputs = got["name"].split(".")[-1] in ("q_proj", "k_proj", "v_proj")
            assert got["output_error"] == pytest.approx(want["output_error"], rel=1e-4 if same_inputs else 0.05)


def test_awq_duo_scales_match_a_hand_computation():
    # two Linears reading 3 channels, groups of 1 (every |w| / group max is 1) and of 3
    w1 = torch.tensor([[1.0, -2.0, 4.0], [0.5, 0.5, -1.0]])
    w2 = torch.tensor([[2.0, 1.0, -1.0]])
    w_mean = weight_means([w1, w2], 3)
    # rows relative to their max |w|: [1/4, 1/2, 1], [1/2, 1/2, 1], [1, 1/2, 1/2]; column means over the 3 rows
    torch.testing.assert_close(w_mean, torch.tensor([7 / 12, 1 / 2, 5 / 6]), rtol=1e-5, atol=0)
    x_mean = torch.tensor([4.0, 1.0, 0.25])
    s = candidate_scales(x_mean, 0.5, w_mean)
    raw = [2 / ((7 / 12) ** 0.5 + 1e-4), 1 / (0.5**0.5 + 1e-4), 0.5 / ((5 / 6) ** 0.5 + 1e-4)]
    expected = torch.tensor(raw) / (max(raw) * min(raw)) ** 0.5
    torch.testing.assert_close(s, expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(candidate_scales(x_mean, 0.5), torch.tensor([2.0, 1.0, 0.5]))  # plain: x^α, max·min 1
    assert candidate_scales(x_mean, 0.0).eq(1).all()  # plain α = 0 is plain rounding; duo α = 0 is not
    assert scale_candidates(4, True) == [(0.0, True), (0.25, True), (0.5, True), (0.75, True)]  # as the references
    assert [alpha for alpha, _ in scale_candidates(3, False)] == [0.0, 0.5, 1.0]
    assert scale_candidates(4, "both") == [(0.0, False), (0.0, True), (0.5, False), (0.5, True)]


@pytest.mark.parametrize("duo_scaling", [True, False, "both"])
def test_awq_step_scales_every_layer_group_and_beats_rtn_proxy(tiny, duo_scaling):
    step = {"method": "awq", "weights": INT4_G32, "grid": 10, "duo_scaling": duo_scaling}
    result = run_step(tiny.model, step, calibration_windows(tiny.model))
    layers = {layer["name"]: layer for layer in result.layers}
    assert result.summary["scaled_layers"] == 7 * 2  # q, k, v, o, gate, up, down in both layers
    ratios = [layer["awq_loss_vs_rtn"] for layer in layers.values()]
    if duo_scaling is True:  # no duo candidate is plain rounding, yet the best one should rarely lose to it
        assert sum(ratios) / len(ratios) < 1.0 and {layer["awq_duo"] for layer in layers.values()} == {True}
    else:  # α = 0 of the plain family is plain rounding
        assert all(ratio <= 1.0 + 1e-6 for ratio in ratios)


@pytest.mark.parametrize("step", [{"method": "gptq", "weights": INT4_G32}, {"method": "fp8", "gptq": True}])
def test_calibrated_steps_need_calibration(tiny, step):
    from worker.engine.steps import EngineError

    with pytest.raises(EngineError) as info:
        run_step(tiny.model, step, None)
    assert info.value.code == "missing_calibration"


def test_fp8_gptq_step_beats_fp8_rounding_in_reported_output_error(tiny_model_dir):
    from worker.engine.load.checkpoint import load_model

    errors = {}
    for gptq in (False, True):
        model = load_model(tiny_model_dir, "hf", torch.device("cpu")).model
        result = run_step(model, {"method": "fp8", "gptq": gptq}, calibration_windows(model, count=8, length=64))
        assert result.summary["gptq"] is gptq
        errors[gptq] = result.summary["mean_output_error"]
    assert errors[True] < 0.9 * errors[False]


# --- artifacts ------------------------------------------------------------------------------------------------

SCHEMES = {  # step, format, stored code dtype, activation type, bytes per weight bound
    "gptq-act-order": ({"method": "gptq", "weights": INT4_G32, "act_order": True}, "pack-quantized", "I32", None),
    "gptq-asym-int8": (
        {"method": "gptq", "weights": {"bits": 8, "group_size": None, "symmetric": False}},
        "int-quantized",
        "I8",
        None,
    ),
    "awq": ({"method": "awq", "weights": INT4_G32, "grid": 6}, "pack-quantized", "I32", None),
    "smoothquant": ({"method": "smoothquant", "alpha": 0.5}, "int-quantized", "I8", "int"),
    "fp8": ({"method": "fp8"}, "float-quantized", "F8_E4M3", "float"),
    "fp8-gptq": ({"method": "fp8", "gptq": True}, "float-quantized", "F8_E4M3", "float"),
}


@pytest.fixture(scope="module")
def artifacts(tiny_model_dir, tmp_path_factory):
    """Each scheme's artifact of one tiny model, with its in-memory logits (and, for dynamic activation
    quantization, the logits without it) and the logits one clean interpreter gets from every artifact."""
    from worker.engine.load.checkpoint import load_model

    root = tmp_path_factory.mktemp("quant-artifacts")
    built = {}
    for scheme, (step, *_, activation_type) in SCHEMES.items():
        model = load_model(tiny_model_dir, "hf", torch.device("cpu")).model
        ids = calibration_windows(model, count=2, length=24, seed=5)
        targeted = {n: m.weight.numel() for n, m in select_linears(model).items()}
        result = run_step(model, step, calibration_windows(model))
        expected, without_activation_quant = logits(model, ids), None
        if activation_type is not None:
            hooks = {n: dict(m._forward_pre_hooks) for n, m in model.named_modules() if n in targeted}
            for name in targeted:
                model.get_submodule(name)._forward_pre_hooks.clear()
            without_activation_quant = logits(model, ids)
            for name, saved in hooks.items():
                model.get_submodule(name)._forward_pre_hooks.update(saved)
        folder = root / scheme
        save_compressed_(model, result.quantized, folder)
        built[scheme] = (folder, targeted, result, expected, without_activation_quant)
    loaded = logits_in_clean_process([b[0] for b in built.values()], ids, root)
    return {scheme: (*value, loaded[value[0]]) for scheme, value in built.items()}


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_artifact_loads_alone_with_the_same_logits(artifacts, scheme):
    step, fmt, code_dtype, activation_type = SCHEMES[scheme]
    folder, targeted, result, expected, without_activation_quant, loaded = artifacts[scheme]
    if activation_type is not None:  # the in-memory model really quantizes activations: without, logits differ
        assert not torch.allclose(without_activation_quant, expected, atol=1e-5)
    # transformers applies the dynamic activation quantization too, so logits agree to float rounding
    torch.testing.assert_close(loaded, expected, rtol=1e-4, atol=1e-4)

    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    (scheme_config,) = config["config_groups"].values()
    assert config["format"] == fmt == result.summary["format"]
    assert (scheme_config["input_activations"] or {}).get("type") == activation_type
    if activation_type:
        assert scheme_config["input_activations"]["strategy"] == "token"
        assert scheme_config["input_activations"]["dynamic"] is True
    assert scheme_config["weights"].get("actorder") == ("static" if step.get("act_order") else None)
    stored = 0
    with safe_open(folder / "model.safetensors", "pt") as tensors:
        for key in tensors.keys():
            module, leaf = key.rsplit(".", 1)
            if module in targeted:
                stored += tensors.get_tensor(key).nbytes
                if leaf in ("weight", "weight_packed"):
                    assert tensors.get_slice(key).get_dtype() == code_dtype, key
                assert leaf != "weight_g_idx"  # static act order needs no column permutation on disk
    bytes_per_weight = stored / sum(targeted.values())
    expected_bytes = 0.5 if step.get("weights", {}).get("bits") == 4 else 1.0
    assert expected_bytes < bytes_per_weight < expected_bytes + 0.2  # codes plus float32 scales (and zero points)


def test_pipeline_report_matches_the_artifact_in_a_clean_process(tiny_model_dir, text_dataset, tmp_path):
    from tests.utils.checks import perplexities_in_clean_process
    from tests.utils.factories import run_engine_job

    reports, folders = [], []
    for name in ("smoothquant", "gptq-act-order"):  # W8A8 with dynamic activations, and int4 GPTQ
        report, folder = run_engine_job(
            tiny_model_dir,
            [{"type": "quantize", **SCHEMES[name][0]}],
            tmp_path / name,
            calibration=(text_dataset, {"samples": 4, "seq_len": 64}),
            evaluation=(text_dataset, {"seq_len": 64, "max_windows": 6}),
        )
        (quant,) = report["steps"]
        assert all(0 < layer["output_error"] < 0.2 for layer in quant["layers"]), name
        reports.append(report)
        folders.append(folder)
    measured = perplexities_in_clean_process(folders, text_dataset, 64, 6)
    for report, folder in zip(reports, folders, strict=True):
        assert measured[folder]["perplexity"] == pytest.approx(report["optimized"]["perplexity"], rel=0.01)
