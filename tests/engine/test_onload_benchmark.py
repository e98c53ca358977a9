"""benchmarks/onload_scale.py on tiny shapes on the CPU: the capped case runs onloaded and measures the
perplexity the uncapped one measures whole, and each case writes its JSON."""

from __future__ import annotations

import json

from benchmarks import onload_scale


def test_capped_case_runs_onloaded_with_the_uncapped_perplexity(tmp_path):
    args = ["--tiny", "--samples", "2", "--seq-len", "16", "--layers", "2", "--out", str(tmp_path)]
    (whole,) = onload_scale.main(["--case", "llama8b-uncapped", *args])
    (capped,) = onload_scale.main(["--case", "llama8b-capped12", *args])
    assert whole["execution"]["mode"] == "whole" and capped["execution"]["mode"] == "onloaded"
    assert capped["perplexity"] == whole["perplexity"]
    assert capped["layers_run"] == 2 and capped["layers_full"] == 3 and capped["projected_s"] > capped["step_s"]
    written = json.loads((tmp_path / "llama8b-capped12.json").read_text())
    assert written["summary"]["bits"] == 4 and written["peak_host_bytes"] > written["model_bytes"]
