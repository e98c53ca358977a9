"""The quality columns the quantization and pruning benchmarks add to each row, measured as a job's report
measures them: perplexity with the KL divergence to the dense model on the same evaluation windows (mean and
top-1 agreement; worker/engine/evaluate/divergence.py, the dense model's top-64 kept on disk) and accuracy on a
cloze task built from wikitext2-test (modelpress/cloze_task.py, scored with lm-eval-harness as
`evaluation.tasks` is scored; worker/engine/evaluate/tasks.py).
"""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Any

import torch

from modelpress.cloze_task import ClozeOptions, build_cloze_task
from modelpress.specs import TaskSpec
from worker.engine.evaluate.divergence import ReferenceReader, ReferenceWriter
from worker.engine.evaluate.evaluation import perplexity
from worker.engine.evaluate.tasks import TaskSource, score_task


def _quiet(fraction: float, message: str) -> None:
    return None


class QualityColumns:
    """Measures each row against the dense row, which must be measured first (`dense`)."""

    def __init__(self, folder: Path, cloze_text: Path | None, documents: int, context_words: int = 120) -> None:
        self.folder = folder
        self.reference = folder / "dense-top-k.safetensors"
        self.cloze: TaskSource | None = None
        self.documents = 0
        if cloze_text is not None and documents > 0:
            archive = folder / "cloze.tar"
            options = ClozeOptions(max_documents=documents, max_context_words=context_words)
            self.documents = build_cloze_task(cloze_text, archive, options)
            with tarfile.open(archive) as tar:
                tar.extractall(folder / "cloze", filter="data")
            self.cloze = TaskSource(TaskSpec(dataset_id="cloze"), folder / "cloze")

    def dense(self, model: torch.nn.Module, tokenizer: Any, windows: torch.Tensor, device: torch.device) -> dict:
        writer = ReferenceWriter(self.reference)
        result = {"perplexity": perplexity(model, windows, device, _quiet, writer)["perplexity"]}
        writer.save()
        return {**result, "kl_mean": 0.0, "top1_agreement": 1.0, **self.task(model, tokenizer)}

    def measure(self, model: torch.nn.Module, tokenizer: Any, windows: torch.Tensor, device: torch.device) -> dict:
        reader = ReferenceReader(self.reference)
        result = {"perplexity": perplexity(model, windows, device, _quiet, reader)["perplexity"]}
        kl = reader.result()
        return {**result, "kl_mean": kl["mean"], "top1_agreement": kl["top1_agreement"], **self.task(model, tokenizer)}

    def task(self, model: torch.nn.Module, tokenizer: Any) -> dict:
        if self.cloze is None:
            return {}
        model.eval()
        scores = score_task(model, tokenizer, self.cloze, self.folder)
        return {"cloze": scores["accuracy"], "cloze_stderr": scores["stderr"], "cloze_n": scores["n"]}


def columns(row: dict) -> str:
    """`| KL mean | top-1 | cloze acc |` cells of a row (blank where not measured)."""
    kl = "" if row.get("kl_mean") is None else f"{row['kl_mean']:.4f}"
    top1 = "" if row.get("top1_agreement") is None else f"{row['top1_agreement']:.1%}"
    cloze = "" if row.get("cloze") is None else f"{row['cloze']:.1%} ± {row['cloze_stderr']:.1%}"
    return f" {kl} | {top1} | {cloze} |"
