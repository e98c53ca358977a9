"""Rich tables for what the server returns. Missing numbers are shown as missing, never as zero."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from modelpress.task_scores import task_scores

NOT_MEASURED = Text("not measured", style="dim")


def human_bytes(value: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{value:.2f} TiB"  # pragma: no cover - loop always returns


def format_value(key: str, value: Any) -> str | Text:
    """A metric as a person reads it, chosen from its name (`*_bytes`, `*_ms`, counts, ratios)."""
    if value is None:
        return NOT_MEASURED
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            return str(value)
        name = key.lower()
        if "bytes" in name or name.endswith("memory"):
            return human_bytes(value)
        if name.endswith("_ms") or "_ms_" in name or name.startswith("ms_"):
            return f"{value:,.2f} ms"
        if name.endswith("_s") or name.endswith("seconds"):
            return f"{value:,.2f} s"
        if isinstance(value, int):
            return f"{value:,}"
        if "sparsity" in name or "fraction" in name:
            return f"{value:.4f}"
        return f"{value:.4g}"
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value)
    return str(value)


def flatten(data: dict[str, Any] | None, prefix: str = "") -> dict[str, Any]:
    """One level of dotted keys, so nested metrics (`latency.prefill_ms`) still line up in a table."""
    flat: dict[str, Any] = {}
    for key, value in (data or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, list):
            continue  # lists (per-layer details, samples) get their own tables
        else:
            flat[name] = value
    return flat


def _ratio(base: Any, optimized: Any) -> str | Text:
    numbers = (int, float)
    if isinstance(base, bool) or isinstance(optimized, bool):
        return ""
    if isinstance(base, numbers) and isinstance(optimized, numbers) and base:
        return f"{optimized / base:.3f}×"
    return ""


SPEED_METRICS = ("prefill_ms", "decode_ms_per_token")
NOT_COMPARABLE = Text("not comparable (see note)", style="dim")


def _when(value: Any) -> str:
    return str(value).replace("T", " ")[:19] if value else ""


def _table(
    title: str, columns: tuple[str, ...], rows: list[dict[str, Any]], cells: Callable[[dict[str, Any]], tuple]
) -> Table:
    """A listing: one folding column per name, one line per row with the cells `cells` gives it."""
    table = Table(title=title)
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*cells(row))
    return table


def _text(row: dict[str, Any], key: str) -> str:
    return str(row.get(key, ""))


def models_table(rows: list[dict[str, Any]]) -> Table:
    return _table(
        "models",
        ("id", "name", "format", "architecture", "parameters", "size", "created"),
        rows,
        lambda row: (
            _text(row, "id"),
            _text(row, "name"),
            _text(row, "format"),
            _text(row, "architecture"),
            format_value("parameters", row.get("parameters")),
            format_value("size_bytes", row.get("size_bytes")),
            _when(row.get("created_at")),
        ),
    )


def datasets_table(rows: list[dict[str, Any]]) -> Table:
    return _table(
        "datasets",
        ("id", "name", "records", "size", "created"),
        rows,
        lambda row: (
            _text(row, "id"),
            _text(row, "name"),
            format_value("records", row.get("records")),
            format_value("size_bytes", row.get("size_bytes")),
            _when(row.get("created_at")),
        ),
    )


STATUS_STYLE = {"queued": "yellow", "running": "cyan", "succeeded": "green", "failed": "red", "cancelled": "magenta"}


def progress_text(job: dict[str, Any]) -> str:
    if job.get("status") == "queued" and job.get("waiting_reason"):
        return str(job["waiting_reason"])
    progress = job.get("progress") or {}
    if not progress:
        return ""
    parts = []
    if progress.get("total_steps"):
        parts.append(f"step {int(progress.get('step_index') or 0) + 1}/{progress['total_steps']}")
    if progress.get("step"):
        parts.append(str(progress["step"]))
    if progress.get("fraction") is not None:
        parts.append(f"{100 * float(progress['fraction']):.0f}%")
    return " · ".join(parts)


def jobs_table(rows: list[dict[str, Any]]) -> Table:
    def cells(row: dict[str, Any]) -> tuple:
        status = _text(row, "status")
        return (
            _text(row, "id"),
            Text(status, style=STATUS_STYLE.get(status, "")),
            str(row.get("model_id") or (row.get("spec") or {}).get("model_id") or ""),
            progress_text(row),
            _when(row.get("created_at")),
            _when(row.get("finished_at")),
        )

    return _table("jobs", ("id", "status", "model", "progress", "created", "finished"), rows, cells)


WORKER_STYLE = {"idle": "green", "busy": "cyan", "draining": "yellow"}


def _gpus_text(gpus: list[dict[str, Any]]) -> str:
    if not gpus:
        return "none (CPU)"
    lines = []
    for gpu in gpus:
        used = gpu.get("memory_used_bytes")
        memory = (
            human_bytes(gpu["memory_bytes"])
            if used is None
            else f"{human_bytes(used)} / {human_bytes(gpu['memory_bytes'])}"
        )
        lines.append(f"{gpu['index']}: {gpu['name']} ({memory})")
    return "\n".join(lines)


def workers_table(rows: list[dict[str, Any]]) -> Table:
    def cells(row: dict[str, Any]) -> tuple:
        state = _text(row, "state") if row.get("live") else "stopped"
        return (
            _text(row, "name"),
            Text(state, style=WORKER_STYLE.get(state, "red")),
            _gpus_text(row.get("gpus") or []),
            ", ".join(row.get("memory_classes") or []),
            format_value("free_disk_bytes", row.get("free_disk_bytes")),
            _text(row, "version"),
            str(row.get("current_job_id") or ""),
            _when(row.get("heartbeat_at")),
        )

    columns = ("name", "state", "GPUs (used / total)", "classes", "free disk", "version", "job", "heartbeat")
    return _table("workers", columns, rows, cells)


def artifacts_table(rows: list[dict[str, Any]]) -> Table:
    return _table(
        "artifacts",
        ("name", "kind", "size", "sha256"),
        rows,
        lambda row: (
            _text(row, "name"),
            _text(row, "kind"),
            format_value("size_bytes", row.get("size_bytes")),
            _text(row, "sha256")[:16] + "…",
        ),
    )


def metrics_table(report: dict[str, Any]) -> Table:
    """Baseline against optimized, with optimized/baseline for every number both sides measured."""
    baseline, optimized = report.get("baseline"), report.get("optimized")
    flat_base, flat_opt = flatten(baseline), flatten(optimized)
    table = Table(title="baseline vs optimized")
    table.add_column("metric")
    table.add_column("baseline", justify="right")
    table.add_column("optimized", justify="right")
    table.add_column("optimized / baseline", justify="right")
    keys = list(dict.fromkeys([*flat_base, *flat_opt]))
    speed_note = (report.get("ratios") or {}).get("speed_note")
    for key in keys:
        base, opt = flat_base.get(key), flat_opt.get(key)
        ratio = NOT_COMPARABLE if speed_note and key.split(".")[-1] in SPEED_METRICS else _ratio(base, opt)
        table.add_row(key, format_value(key, base), format_value(key, opt), ratio)
    if not keys:
        table.add_row("(nothing measured)", NOT_MEASURED, NOT_MEASURED, "")
    return table


def quality_table(report: dict[str, Any]) -> Table:
    """Perplexity of both models beside the optimized model's KL divergence to the baseline (null: not measured)."""
    baseline, optimized = report.get("baseline") or {}, report.get("optimized") or {}
    quality = report.get("quality") if isinstance(report.get("quality"), dict) else {}
    kl = quality.get("kl_divergence") if isinstance(quality.get("kl_divergence"), dict) else None
    table = Table(title="quality: optimized against baseline")
    table.add_column("measure")
    table.add_column("value", justify="right", overflow="fold")
    base_ppl, opt_ppl = baseline.get("perplexity"), optimized.get("perplexity")
    table.add_row("perplexity, baseline", format_value("perplexity", base_ppl))
    table.add_row("perplexity, optimized", format_value("perplexity", opt_ppl))
    table.add_row("perplexity, optimized / baseline", _ratio(base_ppl, opt_ppl))
    if kl is None:
        table.add_row("KL divergence to the baseline", NOT_MEASURED)
        if quality.get("note"):
            table.add_row("", Text(str(quality["note"]), style="dim"))
        return table
    for key, label in (("mean", "mean"), ("median", "median"), ("p99", "99th percentile")):
        value = kl.get(key)
        table.add_row(f"KL divergence, {label} (nats)", NOT_MEASURED if value is None else f"{value:.6f}")
    agreement = kl.get("top1_agreement")
    table.add_row("top-1 agreement", NOT_MEASURED if agreement is None else f"{100 * agreement:.2f}%")
    table.add_row("positions", format_value("positions", kl.get("positions")))
    if kl.get("method"):
        table.add_row("method", Text(str(kl["method"]), style="dim"))
    return table


def _accuracy(value: float | None, stderr: float | None) -> str:
    if value is None:
        return NOT_MEASURED
    return f"{100 * value:.1f}%" + ("" if stderr is None else f" ± {100 * stderr:.1f}")


def tasks_table(report: dict[str, Any]) -> Table | None:
    """Task accuracy (lm-eval-harness) before and after, with standard errors; a task that could not run, why."""
    scores = task_scores(report)
    if not scores:
        return None
    table = Table(title="task accuracy (lm-eval-harness)")
    for column in ("task", "baseline", "optimized", "drop (points)", "documents"):
        table.add_column(column, overflow="fold")
    for score in scores.values():
        if score.error is not None:
            table.add_row(score.task, Text(score.error, style="yellow"), "", "", "")
            continue
        drop = NOT_MEASURED if score.drop is None else f"{100 * score.drop:+.1f}"
        table.add_row(
            score.task,
            _accuracy(score.baseline, score.baseline_stderr),
            _accuracy(score.optimized, score.optimized_stderr),
            drop,
            str(score.n),
        )
    return table


def damage_table(damage: dict[str, Any] | None) -> Table | None:
    """The layers the recipe damaged most, with what each figure rests on."""
    worst = (damage or {}).get("worst")
    if not worst:
        return None
    table = Table(title="most damaged layers")
    for column in ("step", "layer", "error", "measured as"):
        table.add_column(column, overflow="fold")
    for entry in worst:
        step = f"{entry.get('step', '?')} {entry.get('key', '')}".strip()
        error = entry.get("error")
        table.add_row(
            step,
            str(entry.get("layer")),
            NOT_MEASURED if error is None else f"{error:.4g}",
            str(entry.get("measure", "")),
        )
    return table


def ratios_table(ratios: dict[str, Any] | None) -> Table | None:
    if not ratios:
        return None
    speed_note = ratios.get("speed_note")
    table = Table(title="ratios (as the worker computed them)", caption=speed_note)
    table.add_column("ratio")
    table.add_column("value", justify="right")
    for key, value in flatten(ratios).items():
        if key == "speed_note":
            continue
        if value is None:
            table.add_row(key, NOT_COMPARABLE if speed_note and key.endswith("_speedup") else NOT_MEASURED)
        else:
            table.add_row(key, format_value("ratio", value))
    return table


def _layers(step: dict[str, Any]) -> list[dict[str, Any]]:
    layers = step.get("layers")
    if isinstance(layers, dict):
        return [{"name": name, **(v if isinstance(v, dict) else {"value": v})} for name, v in layers.items()]
    if isinstance(layers, list):
        return [layer for layer in layers if isinstance(layer, dict)]
    return []


def _layer_summary(layers: list[dict[str, Any]]) -> str:
    """Mean, min and max of each numeric per-layer field: enough to see a step did what it claimed."""
    if not layers:
        return ""
    numeric: dict[str, list[float]] = {}
    for layer in layers:
        for key, value in layer.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                numeric.setdefault(key, []).append(float(value))
    parts = [f"{len(layers)} layers"]
    for key, values in numeric.items():
        if key in {"index", "parameters", "numel"}:
            continue
        low, high = min(values), max(values)
        if low == high:
            parts.append(f"{key} {low:.4g}")
        else:
            parts.append(f"{key} mean {sum(values) / len(values):.4g} (min {low:.4g}, max {high:.4g})")
    return "; ".join(parts)


def steps_table(steps: list[dict[str, Any]] | None) -> Table:
    table = Table(title="steps")
    for column in ("#", "step", "duration", "details"):
        table.add_column(column, overflow="fold")
    for index, step in enumerate(steps or []):
        spec = step.get("spec") if isinstance(step.get("spec"), dict) else step
        name = step.get("name") or ":".join(str(spec[k]) for k in ("type", "method") if spec.get(k))
        duration = step.get("duration_s", step.get("seconds"))
        extra = {
            k.removeprefix("summary."): v
            for k, v in flatten(step).items()
            if k not in {"name", "type", "method", "duration_s", "seconds", "index"} and not k.startswith("spec.")
        }
        # a null here is a setting (group_size: none = per channel), not a missing measurement
        details = "; ".join(f"{k}={'none' if v is None else format_value(k, v)}" for k, v in extra.items())
        summary = _layer_summary(_layers(step))
        table.add_row(
            str(step.get("index", index)),
            name or "?",
            format_value("duration_s", duration),
            "\n".join(part for part in (details, summary) if part),
        )
    if not steps:
        table.add_row("", "(no steps reported)", "", "")
    return table


def samples_table(samples: Any) -> Table | None:
    if not samples:
        return None
    rows = samples if isinstance(samples, list) else [samples]
    rows = [row for row in rows if isinstance(row, dict)]
    if not rows:
        return None
    columns = list(dict.fromkeys(key for row in rows for key in row))
    table = Table(title="greedy generations", show_lines=True)
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(NOT_MEASURED if row.get(c) is None else str(row.get(c)) for c in columns))
    return table


def environment_table(environment: dict[str, Any] | None) -> Table | None:
    if not environment:
        return None
    table = Table(title="environment", show_header=False)
    table.add_column("key")
    table.add_column("value", overflow="fold")
    for key, value in flatten(environment).items():
        table.add_row(key, NOT_MEASURED if value is None else str(value))
    return table


def report_group(report: dict[str, Any]) -> Group:
    """The whole report: metrics, quality (perplexity and KL divergence), task accuracy, the most damaged layers,
    ratios, steps,
    generations, environment and the worker's notes."""
    parts: list[Any] = []
    if report.get("baseline") is None and report.get("optimized") is None:
        parts.append(Text("No metrics were measured for this job.", style="yellow"))
    parts.append(metrics_table(report))
    parts.append(quality_table(report))
    for table in (
        tasks_table(report),
        damage_table(report.get("damage")),
        ratios_table(report.get("ratios")),
        steps_table(report.get("steps")),
        samples_table(report.get("samples")),
        environment_table(report.get("environment")),
    ):
        if table is not None:
            parts.append(table)
    notes = report.get("notes")
    if notes:
        lines = notes if isinstance(notes, list) else [notes]
        parts.append(Text("notes:\n" + "\n".join(f"  • {line}" for line in lines), style="italic"))
    return Group(*parts)


def make_console(stderr: bool = False) -> Console:
    """A console that does not wrap long ids or keys, so they stay copy-pasteable."""
    return Console(stderr=stderr, soft_wrap=True)
