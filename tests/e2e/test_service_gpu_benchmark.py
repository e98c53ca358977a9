"""The GPU service benchmark's harness at its tiny size on the CPU: the same path the 8B run takes on a GPU machine
(`modelpress dev`, CLI upload in resumable parts, a GPTQ job followed over its events, CLI download, a reload with
transformers alone), checked for a whole, consistent timeline and for leaving no process behind; and the sharded
checkpoint archive it uploads, checked with transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

STAGES = ["load", "evaluate baseline", "quantize:gptq", "export", "evaluate optimized"]


def processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                command = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in command:
                found.append(command)
    return found


@pytest.mark.slow
def test_tiny_run_times_a_gptq_job_end_to_end(tmp_path: Path) -> None:
    work, out = tmp_path / "work", tmp_path / "out"
    argv = [sys.executable, "benchmarks/service_gpu.py", "--tiny", "--stages", "prepare,gptq", "--calibration", "4"]
    argv += ["--seq-len", "64", "--eval-windows", "2", "--work", str(work), "--out", str(out), "--budget-s", "1200"]
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    result = json.loads(next(out.glob("service_gpu_tiny_*.json")).read_text())
    assert result["errors"] == {}
    job = result["jobs"]["gptq"]
    assert job["status"] == "succeeded"

    timeline = job["timeline"]
    assert [stage["stage"] for stage in timeline["stages"]] == STAGES
    assert all(stage["seconds"] >= 0 for stage in timeline["stages"])
    # the stages tile the run: from the claim (the row) through the events to the end (the row)
    covered = timeline["claim_to_first_stage_s"] + sum(stage["seconds"] for stage in timeline["stages"])
    assert covered == pytest.approx(timeline["run_s"], abs=1.0)
    assert timeline["total_s"] == pytest.approx(timeline["queue_s"] + timeline["run_s"], abs=0.01)

    upload = result["prepare"]["upload"]
    assert upload["model_bytes"] == result["prepare"]["checkpoint"]["archive_bytes"]
    assert "/parts/" in (work / "logs" / "service.log").read_text()  # the resumable path, as at the 8B size

    assert "I32" in job["artifact"]["tensor_bytes_by_dtype"]["bytes"]  # int4 codes packed eight to an int32
    reload = job["reload"]
    assert reload["finite"] and reload["tokens"] == 64
    assert reload["project_modules"] == []
    assert reload["quantization"]["format"] == "pack-quantized"
    assert {"baseline", "optimized"} <= set(job["report"]["speed"])
    assert job["peaks"]["samples"] > 0 and job["peaks"]["worker_peak_rss_mib"] > 0
    assert "| **job total, upload excluded** |" in done.stdout
    assert processes_mentioning(str(work)) == []


def test_the_checkpoint_archive_loads_with_transformers_from_its_shards(tmp_path: Path) -> None:
    """The archive the 8B run uploads (several shards and their index), made at the tiny shape with small shards."""
    import tarfile

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.service_gpu_inputs import write_checkpoint

    written = write_checkpoint(tmp_path / "model.tar", tiny=True, shard_bytes=256 * 1024)
    assert written["shards"] >= 4
    with tarfile.open(tmp_path / "model.tar") as tar:
        tar.extractall(tmp_path / "model", filter="data")
    index = json.loads((tmp_path / "model" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == written["shards"]
    assert index["metadata"]["total_size"] == written["tensor_bytes"] == 2 * written["parameters"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype="auto")
    assert model.dtype == torch.bfloat16
    assert sum(p.numel() for p in model.parameters()) == written["parameters"]
    assert torch.equal(model.model.norm.weight, torch.ones_like(model.model.norm.weight))
    assert 0.015 < model.lm_head.weight.float().std().item() < 0.025  # drawn, not left empty
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")
    ids = tokenizer("the model prunes weights", return_tensors="pt").input_ids
    assert int(ids.max()) < model.config.vocab_size
    assert torch.isfinite(model(ids).logits).all()
