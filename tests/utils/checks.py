"""Independent checks on downloaded artifacts: run in a clean interpreter with transformers alone.

These deliberately share no code with the engine, so an engine bug cannot hide in its own yardstick.
"""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
import tarfile
from pathlib import Path


def transformers_perplexity(folder, text_path, seq_len, max_windows):
    """Perplexity of a model folder on a text's first non-overlapping windows, with torch and transformers alone
    (its source is also the script the clean-process check runs, so it imports nothing else). A tokenizer that
    starts every text with <bos> gets it at the head of every window, as a model trained so expects."""
    import math

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    with open(text_path, encoding="utf-8") as text:
        ids = tokenizer(text.read(), add_special_tokens=False).input_ids
    bos = tokenizer.bos_token_id
    lead = [bos] if bos is not None and tokenizer("a").input_ids[:1] == [bos] else []
    step = seq_len - len(lead)
    windows = [torch.tensor(lead + ids[i : i + step]) for i in range(0, len(ids) - step + 1, step)][:max_windows]
    nll, count = 0.0, 0
    with torch.no_grad():
        for window in windows:
            out = model(window[None], labels=window[None])
            nll += out.loss.item() * (len(window) - 1)
            count += len(window) - 1
    return {"perplexity": math.exp(nll / count), "windows": len(windows)}


PERPLEXITY_SCRIPT = (
    inspect.getsource(transformers_perplexity)
    + r"""
import json, sys
folder, text_path, seq_len, max_windows = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
assert "modelpress" not in sys.modules and "worker" not in sys.modules
result = transformers_perplexity(folder, text_path, seq_len, max_windows)
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("modelpress", "worker", "app"))
print(json.dumps({**result, "leaked": leaked}))
"""
)


def unpack(archive: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        tar.extractall(folder, filter="data")
    return folder


def perplexity_in_clean_process(folder: Path, text: Path, seq_len: int, max_windows: int) -> dict:
    """Perplexity of an artifact folder measured by transformers in a fresh interpreter."""
    result = subprocess.run(
        [sys.executable, "-c", PERPLEXITY_SCRIPT, str(folder), str(text), str(seq_len), str(max_windows)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=folder,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(result.stdout.strip().splitlines()[-1])
    assert data["leaked"] == [], f"the check imported project code: {data['leaked']}"
    return data


def perplexities_in_clean_process(folders: list[Path], text: Path, seq_len: int, max_windows: int) -> dict:
    """`perplexity_in_clean_process` for several artifact folders, measured one after the other in a single fresh
    interpreter (one start-up instead of one per folder); folder -> its result."""
    loop = f"import sys\nfor folder in sys.argv[5:]:\n    sys.argv[1] = folder\n    exec({PERPLEXITY_SCRIPT!r}, {{}})\n"
    args = [str(text), str(seq_len), str(max_windows), *map(str, folders)]
    result = subprocess.run(
        [sys.executable, "-c", loop, "-", *args], capture_output=True, text=True, timeout=900, cwd=folders[0]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()[-len(folders) :]
    measured = dict(zip(folders, map(json.loads, lines), strict=True))
    leaked = {str(f): m["leaked"] for f, m in measured.items() if m["leaked"]}
    assert not leaked, f"the check imported project code: {leaked}"
    return measured


def quantized_bytes_ratio(folder: Path, targeted) -> tuple[int, int]:
    """(bytes stored for the targeted quantized layers, bytes the same weights take in float32).

    A compressed-tensors layer stores `weight_packed` (or an integer `weight`), `weight_scale`, maybe
    `weight_zero_point`, and `weight_shape` (the original shape), all counted; float32 is 4 bytes per weight.
    """
    from safetensors.numpy import load_file

    stored = float32 = 0
    for path in sorted(folder.glob("*.safetensors")):
        tensors = load_file(path)
        for name, array in tensors.items():
            if not targeted(name):
                continue
            stored += array.nbytes
            if name.endswith(".weight_shape"):
                float32 += 4 * int(array.prod())
            elif name.endswith(".weight") and array.dtype.kind == "i":
                float32 += 4 * array.size
    return stored, float32
