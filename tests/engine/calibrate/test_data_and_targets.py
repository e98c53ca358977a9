import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modelpress.specs import MagnitudePrune, RTNQuantize
from worker.engine.calibrate.targets import fitted_linears, matches, select_linears
from worker.engine.calibrate.windows import leading_special_ids, read_text, split_windows, token_windows
from worker.engine.steps import EngineError

REPO = Path(__file__).resolve().parents[3]


def test_windows_are_non_overlapping_and_limited():
    ids = torch.arange(10)
    assert split_windows(ids, 3, None).tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert split_windows(ids, 3, 2).tolist() == [[0, 1, 2], [3, 4, 5]]


def test_windows_led_by_bos_hold_the_text_in_order():
    ids = torch.arange(10, 17)
    assert split_windows(ids, 3, None, (2,)).tolist() == [[2, 10, 11], [2, 12, 13], [2, 14, 15]]
    assert split_windows(ids, 3, 1, (2,)).tolist() == [[2, 10, 11]]


def test_windows_start_with_bos_where_the_tokenizer_adds_it(tiny, text_dataset):
    """Gemma-style tokenizers put <bos> before every text; the tiny model's tokenizer adds nothing."""
    from tokenizers.processors import TemplateProcessing

    plain = token_windows(tiny.tokenizer, text_dataset, "txt", 32, 3, "evaluation")
    assert leading_special_ids(tiny.tokenizer) == ()
    bos = tiny.tokenizer.bos_token_id
    tiny.tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{tiny.tokenizer.bos_token} $A", special_tokens=[(tiny.tokenizer.bos_token, bos)]
    )
    assert leading_special_ids(tiny.tokenizer) == (bos,)
    led = token_windows(tiny.tokenizer, text_dataset, "txt", 32, 3, "evaluation")
    assert led.shape == (3, 32) and (led[:, 0] == bos).all()
    assert led[:, 1:].flatten().tolist() == plain.flatten()[: 3 * 31].tolist()  # the same text, 31 tokens a window


def test_jsonl_and_txt_datasets(tiny, jsonl_dataset, text_dataset):
    assert "\n\n" in read_text(jsonl_dataset, "jsonl")
    windows = token_windows(tiny.tokenizer, text_dataset, "txt", 32, 5, "calibration")
    assert windows.shape == (5, 32) and windows.dtype == torch.long
    with pytest.raises(EngineError) as info:
        token_windows(tiny.tokenizer, jsonl_dataset, "jsonl", 10**6, None, "evaluation")
    assert info.value.code == "dataset_too_short"


def test_bad_jsonl_line_is_reported(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"body": "no text"}\n')
    with pytest.raises(EngineError, match="line 2"):
        read_text(path, "jsonl")


def test_patterns(tiny):
    linear = tiny.model.model.layers[0].self_attn.q_proj
    assert matches("model.layers.0.self_attn.q_proj", linear, "Linear")
    assert matches("model.layers.0.self_attn.q_proj", linear, "re:.*q_proj")
    assert not matches("model.layers.0.self_attn.q_proj", linear, "re:q_proj")  # re.match anchors at the start
    assert matches("model.layers.0.self_attn.q_proj", linear, "model.layers.0.self_attn.q_proj")
    names = set(select_linears(tiny.model))
    assert len(names) == 14 and "lm_head" not in names
    assert "lm_head" in select_linears(tiny.model, ignore=())
    assert not select_linears(tiny.model, targets=("Embedding",), ignore=())


def test_tied_lm_head_is_never_selected(tiny):
    model = tiny.model
    model.lm_head.weight = model.model.embed_tokens.weight
    assert "lm_head" not in select_linears(model, ignore=())


def test_fitted_linears_refuses_what_does_not_fit_the_loaded_model(tiny):
    """The engine runs the API's check_fit on the model it holds (the tiny model's widths are 64 and 128)."""
    assert list(fitted_linears(tiny.model, RTNQuantize())) == list(select_linears(tiny.model))
    cases = [
        (RTNQuantize(targets=["re:.*no_such_proj"]), "no_targets", "quantize:rtn matched no Linear layer"),
        (RTNQuantize(weights={"bits": 4, "group_size": 128}), "bad_group_size", "group_size 128 does not divide"),
    ]
    for spec, code, text in cases:
        with pytest.raises(EngineError) as info:
            fitted_linears(tiny.model, spec)
        assert info.value.code == code and text in info.value.message
    linear = tiny.model.model.layers[0].mlp.down_proj
    tiny.model.model.layers[0].mlp.down_proj = torch.nn.Linear(36, linear.out_features, bias=False)
    with pytest.raises(EngineError, match="pattern 4:8 .M=8. does not divide the input width 36"):
        fitted_linears(tiny.model, MagnitudePrune(pattern="4:8"))


def test_engine_imports_no_service_code():
    """The engine's only service import is the specs module (pydantic, no torch): its input types."""
    code = (
        "import sys, worker.engine; "
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('fastapi', 'celery', 'sqlalchemy', 'compressed_tensors') "
        "or (m.startswith('modelpress.') and m != 'modelpress.specs')]; print(bad)"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == "[]"
