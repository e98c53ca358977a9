"""The whole service on one GPU machine: upload an 8B-shaped checkpoint, run a GPTQ and an fp8 job, take the
artifacts home, and time every part.

    python3 benchmarks/service_gpu.py [--stages prepare,gptq,fp8] [--work /tmp/modelpress-service-gpu]
        [--out DIR] [--budget-s 540] [--calibration 128] [--seq-len 2048] [--eval-windows 8] [--fp8-rtn]
    python3 benchmarks/service_gpu.py --tiny          # a tiny Llama on a CPU worker: the same path in minutes

It starts the service as `modelpress dev` does (embedded Redis, SQLite, the API on loopback, one worker, on CUDA
when there is one) with its data under `--work`, creates an API key, and then, by stage:
- `prepare`: builds a Llama-3-8B-shaped bf16 checkpoint with random weights (sharded safetensors, config and a
  small locally trained tokenizer, written straight into a .tar: benchmarks/service_gpu_inputs.py) and
  generated calibration and evaluation text; uploads the model with `modelpress upload model` (resumable parts)
  and the two texts with `modelpress upload dataset`;
- `gptq`: submits GPTQ W4 g128 (`modelpress submit`) with calibration and evaluation, follows its event stream,
  downloads its artifacts (`modelpress download --extract`), reloads the model with transformers alone in a clean
  interpreter on the GPU and runs a forward pass;
- `fp8`: the same for fp8 E4M3 with GPTQ rounding (`--fp8-rtn`: rounding to nearest, calibration unused).
A stage list that omits `prepare` continues from the state a previous call left in `--work` (the same machine):
a call limited to 10 minutes can run `prepare` and then each job separately.

Written to `--out` (default `$OUT`, else `--work`): `service_gpu_<shape>_<date>.json` with each job's timeline
(queue, each stage and its phases, from the job's events), the memory sampled meanwhile (nvidia-smi for the GPU,
/proc for the worker's processes), the report's speed, baseline and optimized sections, the artifact's tensor
bytes by dtype, and the reload check; the same figures as markdown tables on stdout; and the tail of the
service's log. Every wait is bounded by `--budget-s`; at the end the service is stopped and nothing is left.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import struct
import subprocess
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.service_gpu_stack import (  # noqa: E402
    CommandFailed,
    Sampler,
    Service,
    gpu_description,
    printed_id,
    say,
)
from benchmarks.service_gpu_timeline import (  # noqa: E402
    JobFollower,
    epoch,
    event_rows,
    phase_lines,
    tables,
    timeline,
)

GPTQ_TARGET_S = 8 * 60  # the GPTQ job, upload excluded
STOP_RESERVE_S = 45.0  # kept from the budget to stop the service and write the results
INT4_G128 = {"bits": 4, "group_size": 128, "symmetric": True}
STAGES = ("prepare", "gptq", "fp8")

RELOAD_SCRIPT = r"""
import json, math, sys, time
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, text_path, seq_len, device = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
started = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype="auto", device_map=device).eval()
if device == "cuda":
    torch.cuda.synchronize()
load_s = time.perf_counter() - started
tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
ids = tokenizer(open(text_path).read(), add_special_tokens=False, return_tensors="pt").input_ids[:, :seq_len].to(device)
started = time.perf_counter()
with torch.no_grad():
    loss = model(ids, labels=ids).loss.item()
if device == "cuda":
    torch.cuda.synchronize()
forward_s = time.perf_counter() - started
dtypes = {}
for tensor in [*model.parameters(), *model.buffers()]:
    dtypes[str(tensor.dtype)] = dtypes.get(str(tensor.dtype), 0) + tensor.numel() * tensor.element_size()
quantization = getattr(model.config, "quantization_config", None)
if quantization is not None and not isinstance(quantization, dict):
    quantization = quantization.to_dict()
print(json.dumps({
    "load_s": load_s, "forward_s": forward_s, "tokens": ids.shape[1], "loss": loss, "perplexity": math.exp(loss),
    "finite": math.isfinite(loss), "device": device,
    "peak_gpu_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None,
    "memory_bytes_by_dtype": dtypes,
    "quantization": None if quantization is None else {
        k: quantization.get(k) for k in ("quant_method", "format", "quantization_status")
    },
    "torch": torch.__version__, "transformers": __import__("transformers").__version__,
    "project_modules": sorted(m for m in sys.modules if m.split(".")[0] in ("modelpress", "worker", "app")),
}))
"""


class OutOfTime(RuntimeError):
    """The budget ran out before a stage finished."""


class Run:
    """One call: the service, the sampler, the state kept in `--work`, and the clock."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.deadline = time.monotonic() + args.budget_s - STOP_RESERVE_S
        self.work: Path = args.work
        self.state_path = self.work / "state.json"
        self.state: dict[str, Any] = json.loads(self.state_path.read_text()) if self.state_path.exists() else {}
        self.service = Service(self.work, "cpu" if args.tiny else None)
        self.sampler = Sampler(self.service)

    def remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise OutOfTime(f"the budget of {self.args.budget_s:.0f} s ran out")
        return left

    def save(self) -> None:
        self.state_path.write_text(json.dumps(self.state, indent=1))

    # --- prepare --------------------------------------------------------------------------------------------

    def prepare(self) -> None:
        args, inputs = self.args, self.work / "inputs"
        say("building the checkpoint archive and the texts")
        command = [sys.executable, "-m", "benchmarks.service_gpu_inputs", "--folder", str(inputs)]
        command += ["--calibration-tokens", str(args.calibration * args.seq_len)]
        command += ["--evaluation-tokens", str(args.eval_windows * args.seq_len)]
        command += ["--tiny"] if args.tiny else []
        done = subprocess.run(
            command, env=self.service.env, capture_output=True, text=True, timeout=self.remaining(), cwd=ROOT
        )
        if done.returncode != 0:
            raise CommandFailed(f"building the inputs failed:\n{done.stderr[-3000:]}")
        built = json.loads(done.stdout.strip().splitlines()[-1])
        checkpoint = built["checkpoint"]
        say(
            f"archive: {checkpoint['archive_bytes'] / 1e9:.2f} GB, {checkpoint['shards']} shards, "
            f"{checkpoint['parameters'] / 1e9:.2f} B parameters, made on {checkpoint['made_on']} in "
            f"{checkpoint['build_s']:.0f} s"
        )
        archive = inputs / "model.tar"
        parts = ["--resumable-above", "0", "--part-size", str(256 * 1024)] if args.tiny else []
        parts += ["--part-size", str(args.part_mb * 2**20)] if args.part_mb else []
        started = time.time()
        output = self.service.cli(
            "upload", "model", str(archive), "--name", "llama-3-8b-shape", *parts, timeout=self.remaining()
        )
        upload = {"model_s": time.time() - started, "model_bytes": archive.stat().st_size}
        upload["model_mb_per_s"] = upload["model_bytes"] / 1e6 / upload["model_s"]
        upload["peaks"] = self.sampler.peaks(started, time.time())
        model_id = printed_id(output, "model")
        archive.unlink()
        say(f"model {model_id} uploaded in {upload['model_s']:.0f} s ({upload['model_mb_per_s']:.0f} MB/s)")
        started = time.time()
        datasets = {}
        for name in ("calibration", "evaluation"):
            output = self.service.cli("upload", "dataset", str(inputs / f"{name}.txt"), timeout=self.remaining())
            datasets[name] = printed_id(output, "dataset")
        upload["datasets_s"] = time.time() - started
        self.state.update(model_id=model_id, datasets=datasets, text=built["text"])
        self.state["prepare"] = {"checkpoint": checkpoint, "upload": upload}
        self.save()

    # --- jobs -----------------------------------------------------------------------------------------------

    def recipe(self, name: str) -> list[dict[str, Any]]:
        if name == "gptq":
            return [{"type": "quantize", "method": "gptq", "weights": INT4_G128}]
        return [{"type": "quantize", "method": "fp8", "gptq": not self.args.fp8_rtn}]

    def job(self, name: str) -> None:
        if "model_id" not in self.state:
            raise CommandFailed(f"no uploaded model in {self.work}: run the `prepare` stage first")
        args, datasets = self.args, self.state["datasets"]
        recipe_path = self.work / f"recipe-{name}.json"
        recipe_path.write_text(json.dumps(self.recipe(name)))
        submit = ["submit", "--model", self.state["model_id"], "--recipe", str(recipe_path)]
        submit += ["--calibration", datasets["calibration"], "--samples", str(args.calibration)]
        submit += ["--seq-len", str(args.seq_len), "--evaluation", datasets["evaluation"]]
        submit += ["--eval-seq-len", str(args.seq_len), "--max-windows", str(args.eval_windows)]
        job_id = printed_id(self.service.cli(*submit, timeout=self.remaining()), "job")
        result: dict[str, Any] = {"id": job_id, "recipe": self.recipe(name)}
        self.state.setdefault("jobs", {})[name] = result
        say(f"{name}: job {job_id} submitted")
        follower = JobFollower(self.service.url, self.service.key, job_id, name, say)
        follower.start()
        follower.join(timeout=self.remaining())
        with self.service.client() as client:
            out_of_time = follower.is_alive()
            if out_of_time:
                client.cancel(job_id)
            job = client.job(job_id)
            result.update(status=job["status"], error=job.get("error"), follower_error=follower.error)
            result["timeline"] = timeline(job, list(follower.events))
            result["events"] = event_rows(list(follower.events), epoch(job.get("created_at")))
            started, finished = epoch(job.get("started_at")), epoch(job.get("finished_at"))
            result["peaks"] = self.sampler.peaks(started or 0.0, finished or time.time())
            if out_of_time:
                result["status"] = "cancelled: the budget ran out"
                raise OutOfTime(f"{name}: the job had not ended when the budget ran out; it was cancelled")
            if job["status"] != "succeeded":
                raise CommandFailed(f"{name}: job {job_id} {job['status']}: {job.get('error')}")
            result["report"] = trimmed_report(client.report(job_id))
        device = (result["report"].get("environment") or {}).get("device")
        say(f"{name}: succeeded on {device}, {result['timeline']['total_s']:.0f} s from submission to the end")
        for line in phase_lines(result["timeline"]):
            say(line)
        if name == "gptq":
            total = result["timeline"]["total_s"]
            result["target"] = {"total_s_max": GPTQ_TARGET_S, "total_s": total, "met": total <= GPTQ_TARGET_S}
        self.save()
        self.take_home(name, job_id, result)
        self.save()

    def take_home(self, name: str, job_id: str, result: dict[str, Any]) -> None:
        """Download the artifacts with the CLI, read the tensors' dtypes, reload with transformers, clean up."""
        folder = self.work / "downloads" / name
        shutil.rmtree(folder, ignore_errors=True)
        started = time.time()
        self.service.cli("download", job_id, "--out", str(folder), "--extract", timeout=self.remaining())
        archive = folder / "model.tar"
        result["artifact"] = {"download_s": time.time() - started, "archive_bytes": archive.stat().st_size}
        archive.unlink()
        model = folder / "model"
        result["artifact"]["tensor_bytes_by_dtype"] = safetensors_dtypes(model)
        say(f"{name}: downloaded {result['artifact']['archive_bytes'] / 1e9:.2f} GB; reloading with transformers")
        device = "cpu" if self.args.tiny else "cuda"
        argv = [sys.executable, "-c", RELOAD_SCRIPT, str(model), str(self.work / "inputs" / "evaluation.txt")]
        argv += [str(self.args.seq_len), device]
        env = {k: v for k, v in self.service.env.items() if k != "PYTHONPATH"}
        outside = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != ROOT]
        env["PYTHONPATH"] = os.pathsep.join(outside)  # the carried wheels, never this source tree
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=self.remaining(), cwd=model)
        if done.returncode != 0:
            result["reload"] = {"error": done.stderr[-3000:]}
            raise CommandFailed(f"{name}: transformers could not reload the artifact:\n{done.stderr[-3000:]}")
        result["reload"] = json.loads(done.stdout.strip().splitlines()[-1])
        reload = result["reload"]
        say(f"{name}: reloaded in {reload['load_s']:.1f} s, forward perplexity {reload['perplexity']:.1f}")
        shutil.rmtree(folder, ignore_errors=True)

    # --- the call -------------------------------------------------------------------------------------------

    def stage(self, stage: str) -> None:
        """Run one stage; a failure is recorded under `errors` and the next stage still runs (OutOfTime ends all)."""
        self.state.setdefault("errors", {}).pop(stage, None)
        try:
            if stage == "prepare":
                self.prepare()
            else:
                self.job(stage)
        except (CommandFailed, subprocess.TimeoutExpired, OSError) as exc:
            self.state["errors"][stage] = str(exc)
            say(f"{stage} failed: {exc}")

    def run(self) -> dict[str, Any]:
        self.state.setdefault("calls", []).append({"argv": sys.argv[1:], "started": time.time()})
        say(f"work folder {self.work}: {shutil.disk_usage(self.work).free / 1e9:.0f} GB free")
        self.service.start()
        self.sampler.start()
        say(f"service up at {self.service.url} (log: {self.work / 'logs' / 'service.log'})")
        try:
            if self.state.get("key"):
                self.service.key = self.state["key"]
            else:
                self.state["key"] = self.service.create_key("gpu-benchmark")
            self.save()
            for stage in self.args.stages:
                self.stage(stage)
        except OutOfTime as exc:
            self.state.setdefault("errors", {})["budget"] = str(exc)
            say(f"stopped: {exc}")
        finally:
            self.sampler.stop()
            self.service.stop()
            self.state["calls"][-1]["ended"] = time.time()
            self.save()
        return self.result()

    def result(self) -> dict[str, Any]:
        state = {k: v for k, v in self.state.items() if k != "key"}
        return {
            **state,
            "shape": "tiny" if self.args.tiny else "llama-3-8b",
            "date": date.today().isoformat(),
            "settings": {
                "calibration": f"{self.args.calibration} x {self.args.seq_len} tokens",
                "evaluation": f"{self.args.eval_windows} x {self.args.seq_len} tokens",
                "fp8_rounding": "nearest" if self.args.fp8_rtn else "gptq",
            },
            "machine": {
                "gpu": gpu_description(),
                "cpus": os.cpu_count(),
                "host_memory_gb": _host_memory() / 1e9,
                "python": platform.python_version(),
            },
        }


def trimmed_report(report: dict[str, Any]) -> dict[str, Any]:
    """The report without its per-layer records (224 Linears at the 8B shape); `damage` keeps the worst five."""
    steps = [{k: v for k, v in step.items() if k != "layers"} for step in report.get("steps", [])]
    return {**report, "steps": steps}


def safetensors_dtypes(folder: Path) -> dict[str, Any]:
    """Bytes of the artifact's tensors by dtype, from the safetensors headers, and which float32 tensors there are
    (names with their layer numbers masked)."""
    by_dtype: dict[str, int] = {}
    float32: set[str] = set()
    for path in sorted(folder.glob("*.safetensors")):
        with path.open("rb") as handle:
            header = json.loads(handle.read(struct.unpack("<Q", handle.read(8))[0]))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, end = info["data_offsets"]
            by_dtype[info["dtype"]] = by_dtype.get(info["dtype"], 0) + end - start
            if info["dtype"] == "F32":
                float32.add(re.sub(r"\.\d+\.", ".#.", name))
    return {"bytes": by_dtype, "float32_tensors": sorted(float32)}


def _host_memory() -> int:
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny Llama, CPU worker: the whole path in minutes")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, in order, of {STAGES}")
    parser.add_argument("--work", type=Path, default=Path("/tmp/modelpress-service-gpu"))
    parser.add_argument("--out", type=Path, default=None, help="results folder (default: $OUT, else --work)")
    parser.add_argument("--budget-s", type=float, default=540.0, help="everything, stopping included")
    parser.add_argument("--calibration", type=int, default=None, help="windows (8B: 128, tiny: 16)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per window (8B: 2048, tiny: 128)")
    parser.add_argument("--eval-windows", type=int, default=None, help="evaluation windows (8B: 8, tiny: 4)")
    parser.add_argument("--fp8-rtn", action="store_true", help="fp8 rounded to nearest instead of with GPTQ")
    parser.add_argument("--part-mb", type=int, default=None, help="upload part size (default: the server's)")
    args = parser.parse_args(argv)
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in args.stages if s not in STAGES]
    if unknown:
        parser.error(f"unknown stage(s) {unknown}: choose from {STAGES}")
    small = args.tiny
    args.calibration = args.calibration or (16 if small else 128)
    args.seq_len = args.seq_len or (128 if small else 2048)
    args.eval_windows = args.eval_windows or (4 if small else 8)
    args.out = args.out or Path(os.environ.get("OUT") or args.work)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if "prepare" in args.stages:
        shutil.rmtree(args.work, ignore_errors=True)  # a fresh service: new data folder, database and key
    args.work.mkdir(parents=True, exist_ok=True)
    result = Run(args).run()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"service_gpu_{result['shape']}_{result['date']}.json"
    path.write_text(json.dumps(result, indent=1))
    log = args.work / "logs" / "service.log"
    if log.exists() and args.out.resolve() != args.work.resolve():
        (args.out / "service_gpu_service.log").write_text(log.read_text(errors="replace")[-200_000:])
    print(tables(result), flush=True)
    say(f"results: {path}")
    jobs = result.get("jobs", {})
    failed = any(jobs.get(s, {}).get("status") != "succeeded" for s in args.stages if s != "prepare")
    return 1 if failed or result.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
