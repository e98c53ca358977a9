"""KL divergence of the optimized model to the baseline on the evaluation windows, as llama.cpp's
`--kl-divergence` reports it (mean, median, 99th percentile, top-1 agreement), without holding both models.

The baseline's evaluation keeps, per position, its top-k log-probabilities and their token ids plus the log of
the probability left over ("rest"), in a safetensors file (`ReferenceWriter`). The artifact's evaluation reads
it back (`ReferenceReader`) and sums its own probabilities over the same k + 1 buckets, so the KL is computed
over a partition of the vocabulary: exact when k covers it, otherwise a lower bound of the full-vocabulary KL
(merging outcomes never raises a KL), close to it because the rest bucket holds little mass. Top-1 agreement is
exact either way: the baseline's most likely token is the first of its top k.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

DEFAULT_TOP_K = 64


# --- The math: tensors in, tensors out ------------------------------------------------------------------------


def top_k_reference(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(top-k log-probabilities, their token ids, log of the remaining mass) per row of `logits` (positions,
    vocabulary); the rest is -inf when k covers the vocabulary."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    values, indices = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
    rest = logprobs.scatter_(-1, indices, float("-inf")).logsumexp(dim=-1)
    return values, indices, rest


def bucket_kl(
    values: torch.Tensor, indices: torch.Tensor, rest: torch.Tensor, logits: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(reference ‖ model) per position over the reference's top-k tokens plus one rest bucket, and whether
    the model's most likely token is the reference's. `values, indices, rest` come from `top_k_reference`."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    agree = logprobs.topk(1, dim=-1).indices[:, 0] == indices[:, 0]
    q_top = logprobs.gather(-1, indices)
    q_rest = logprobs.scatter_(-1, indices, float("-inf")).logsumexp(dim=-1)
    kl = (values.exp() * (values - q_top)).sum(dim=-1)
    p_rest = rest.exp()  # 0 where k covers the vocabulary: that bucket then adds nothing (0 · log 0 = 0)
    kl = kl + torch.where(p_rest > 0, p_rest * (rest - q_rest), torch.zeros_like(kl))
    return kl.clamp(min=0), agree


def full_kl(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(reference ‖ model) per position over the whole vocabulary (what `bucket_kl` estimates)."""
    p = torch.log_softmax(reference_logits.float(), dim=-1)
    q = torch.log_softmax(logits.float(), dim=-1)
    return (p.exp() * (p - q)).sum(dim=-1).clamp(min=0)


def quantile(sorted_values: torch.Tensor, q: float) -> float:
    """The q-quantile of sorted values, interpolated linearly between neighbours (numpy's default)."""
    position = q * (sorted_values.numel() - 1)
    low = int(position)
    high = min(low + 1, sorted_values.numel() - 1)
    weight = position - low
    return float(sorted_values[low] * (1 - weight) + sorted_values[high] * weight)


def summarize_kl(kl: torch.Tensor, agree: torch.Tensor, k: int, vocabulary: int) -> dict:
    """The report's `quality.kl_divergence`: mean, median, 99th percentile (nats), top-1 agreement, method."""
    ordered = kl.double().sort().values
    exact = k >= vocabulary
    return {
        "mean": float(ordered.mean()),
        "median": quantile(ordered, 0.5),
        "p99": quantile(ordered, 0.99),
        "top1_agreement": float(agree.double().mean()),
        "positions": int(kl.numel()),
        "top_k": min(k, vocabulary),
        "exact": exact,
        "method": (
            "KL(baseline ‖ optimized) in nats at every scored position of the evaluation windows (each window on its "
            "own, the positions perplexity scores); "
            + (
                f"over the full vocabulary (k = {vocabulary} covers it)"
                if exact
                else f"over the baseline's top-{k} tokens plus one bucket for the rest of the {vocabulary}-token "
                "vocabulary (the baseline kept as top-k log-probabilities; a lower bound of the full-vocabulary KL)"
            )
            + "; median and p99 interpolated linearly between sorted positions; top-1 agreement: share of positions "
            "where both models' most likely next token is the same"
        ),
    }


# --- The file between the two evaluations ---------------------------------------------------------------------


class ReferenceWriter:
    """Collects the baseline's top-k per window during its evaluation; `save()` writes them to `path`."""

    def __init__(self, path: Path, k: int = DEFAULT_TOP_K) -> None:
        if k < 1:
            raise ValueError(f"top-k must be at least 1, got {k}")
        self.path, self.k = Path(path), k
        self.tensors: dict[str, torch.Tensor] = {}
        self.vocabulary = 0

    def observe(self, index: int, logits: torch.Tensor) -> None:
        """`logits`: (positions, vocabulary) of window `index`."""
        values, indices, rest = top_k_reference(logits, self.k)
        self.vocabulary = logits.shape[-1]
        self.tensors[f"{index}.values"] = values.cpu()
        self.tensors[f"{index}.indices"] = indices.to(torch.int32).cpu()
        self.tensors[f"{index}.rest"] = rest.cpu()

    def save(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        save_file(self.tensors, str(self.path), metadata={"k": str(self.k), "vocabulary": str(self.vocabulary)})
        self.tensors.clear()
        return self.path


class ReferenceReader:
    """Reads the baseline's top-k window by window and compares the evaluated model's logits to it."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.kl: list[torch.Tensor] = []
        self.agree: list[torch.Tensor] = []
        with safe_open(str(self.path), framework="pt") as stored:
            metadata = stored.metadata()
        self.k, self.vocabulary = int(metadata["k"]), int(metadata["vocabulary"])

    def observe(self, index: int, logits: torch.Tensor) -> None:
        if logits.shape[-1] != self.vocabulary:
            raise ValueError(
                f"the model scores {logits.shape[-1]} tokens, the baseline {self.vocabulary}: "
                "the KL divergence needs the same vocabulary"
            )
        with safe_open(str(self.path), framework="pt", device=str(logits.device)) as stored:
            values, indices, rest = (stored.get_tensor(f"{index}.{name}") for name in ("values", "indices", "rest"))
        kl, agree = bucket_kl(values, indices.long(), rest, logits)
        self.kl.append(kl.cpu())
        self.agree.append(agree.cpu())

    def result(self) -> dict | None:
        if not self.kl:
            return None
        return summarize_kl(torch.cat(self.kl), torch.cat(self.agree), self.k, self.vocabulary)
