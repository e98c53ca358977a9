"""Checking an uploaded lm-eval-harness task: an archive (.tar, .tar.gz or .zip) holding one YAML task config and
the .jsonl files its `dataset_kwargs.data_files` names.

The task must run on the worker with no hub access and without running anything from the upload, so only a
data-only subset of lm-eval's task keys is accepted: the data is local JSON (`dataset_path: json`), prompts are
column names or Jinja templates (rendered in Jinja's sandbox, here and on the worker), and the YAML is read with
`yaml.safe_load`, so `!function` hooks (Python from the upload) and every other tag are refused. What is stored
is the YAML and its data files, nothing else from the archive.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path, PurePosixPath
from typing import Any

import yaml
from jinja2 import BaseLoader, StrictUndefined, TemplateError
from jinja2.sandbox import SandboxedEnvironment

from app.archives import ArchiveError, Kind, Limits, detect_kind, extract
from app.text_datasets import MAX_JSONL_LINE, DatasetError, dataset_format

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
TASK_FILE = "task.yaml"
"""The stored config's name, whatever the upload called it."""
ALLOWED_KEYS = frozenset(
    {
        "task",
        "task_alias",
        "dataset_path",
        "dataset_kwargs",
        "training_split",
        "validation_split",
        "test_split",
        "fewshot_split",
        "doc_to_text",
        "doc_to_target",
        "doc_to_choice",
        "description",
        "target_delimiter",
        "fewshot_delimiter",
        "num_fewshot",
        "metric_list",
        "output_type",
        "metadata",
    }
)
"""lm-eval task keys that are data; the rest (`process_docs`, `custom_dataset`, `include`, `filter_list`, ...)
name code or other files."""
OUTPUT_TYPES = ("multiple_choice", "loglikelihood")
METRICS = ("acc", "acc_norm")
METRIC_KEYS = frozenset({"metric", "aggregation", "higher_is_better"})
TEMPLATE_KEYS = ("doc_to_text", "doc_to_target", "doc_to_choice")
TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


def sandboxed_templates() -> SandboxedEnvironment:
    """Jinja as lm-eval configures it (strict undefined, trailing newlines kept), inside Jinja's sandbox."""
    return SandboxedEnvironment(loader=BaseLoader(), undefined=StrictUndefined, keep_trailing_newline=True)


class _DataOnlyLoader(yaml.SafeLoader):
    """`yaml.safe_load`'s loader: any tag it does not know (`!function`, `!!python/...`) is an error."""


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        config = yaml.load(path.read_text(encoding="utf-8"), Loader=_DataOnlyLoader)  # noqa: S506 (a SafeLoader)
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path.name} is not UTF-8; save it as UTF-8") from exc
    except yaml.constructor.ConstructorError as exc:
        if "!function" in str(exc):
            raise DatasetError(
                f"{path.name} uses a `!function` hook, which would run Python code from the upload on the worker; "
                "write the prompt as a column name or a Jinja template instead"
            ) from exc
        raise DatasetError(f"{path.name} uses a YAML tag that is not plain data ({exc.problem}); remove it") from exc
    except yaml.YAMLError as exc:
        raise DatasetError(f"{path.name} is not valid YAML ({exc})") from exc
    if not isinstance(config, dict):
        raise DatasetError(f"{path.name} must be a YAML mapping of lm-eval task keys (task, dataset_path, ...)")
    return config


def _task_yaml(root: Path) -> Path:
    """The one .yaml/.yml file in the archive (at its root or in a single top folder)."""
    found = [p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in (".yaml", ".yml")]
    found = [p for p in found if "__MACOSX" not in p.parts]
    if len(found) != 1:
        raise DatasetError(
            f"an lm-eval task archive holds exactly one .yaml task config; this one holds {len(found)}"
            + (f" ({', '.join(sorted(p.name for p in found)[:5])})" if found else "")
        )
    return found[0]


def _data_files(config: dict[str, Any]) -> dict[str, list[str]]:
    """`dataset_kwargs.data_files` as {split: [relative file names]}."""
    if config.get("dataset_path") != "json":
        raise DatasetError(
            "an uploaded task reads its data from the archive: set `dataset_path: json` and list the .jsonl files "
            "under `dataset_kwargs: {data_files: {test: test.jsonl}}` (tasks on the hub: use evaluation.tasks[].name)"
        )
    kwargs = config.get("dataset_kwargs")
    if not isinstance(kwargs, dict) or set(kwargs) != {"data_files"}:
        raise DatasetError("`dataset_kwargs` must hold only `data_files`, a mapping of split name to .jsonl file(s)")
    files = kwargs["data_files"]
    if not isinstance(files, dict) or not files:
        raise DatasetError("`dataset_kwargs.data_files` must map each split name to a .jsonl file or a list of them")
    result = {}
    for split, names in files.items():
        names = [names] if isinstance(names, str) else names
        if not isinstance(split, str) or not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise DatasetError(f"`data_files.{split}` must be a file name or a list of file names")
        result[split] = names
    return result


def _member(root: Path, name: str) -> Path:
    posix = PurePosixPath(name)
    if posix.is_absolute() or ".." in posix.parts or any(c in name for c in "*?[]\\"):
        raise DatasetError(f"data file {name!r} must be a plain path relative to the YAML file, without globs or '..'")
    if posix.suffix.lower() not in (".jsonl", ".json"):
        raise DatasetError(f"data file {name!r} must be a .jsonl file (one JSON object per line)")
    path = root / posix
    if not path.is_file():
        raise DatasetError(f"data file {name!r} named in data_files is not in the archive beside the YAML file")
    return path


def _documents(path: Path, name: str) -> list[dict[str, Any]]:
    docs = []
    with path.open("rb") as handle:
        for number, raw in enumerate(iter(lambda: handle.readline(MAX_JSONL_LINE + 1), b""), start=1):
            if not raw.strip():
                continue
            try:
                value = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError, RecursionError) as exc:
                raise DatasetError(f"{name} line {number} is not a UTF-8 JSON object ({exc})") from exc
            if not isinstance(value, dict):
                raise DatasetError(f"{name} line {number} must be a JSON object (one document)")
            docs.append(value)
    if not docs:
        raise DatasetError(f"{name} holds no documents")
    return docs


def _check_keys(config: dict[str, Any]) -> None:
    unknown = sorted(set(map(str, config)) - ALLOWED_KEYS)
    if unknown:
        raise DatasetError(
            f"task key(s) {', '.join(unknown)} are not accepted in an uploaded task: they run code or read other "
            f"files; use only {', '.join(sorted(ALLOWED_KEYS))}"
        )
    name = config.get("task")
    if not isinstance(name, str) or not TASK_NAME.match(name):
        raise DatasetError("`task` must name the task: letters, digits, '_', '.', '-' (at most 128 characters)")
    if config.get("output_type") not in OUTPUT_TYPES:
        raise DatasetError(f"`output_type` must be one of {', '.join(OUTPUT_TYPES)}: the report gives accuracy")
    metrics = config.get("metric_list", [{"metric": "acc"}])
    if not isinstance(metrics, list) or not all(
        isinstance(m, dict) and m.get("metric") in METRICS and set(m) <= METRIC_KEYS for m in metrics
    ):
        raise DatasetError(f"`metric_list` entries must be {{metric: {' | '.join(METRICS)}}} (aggregation: mean)")
    for key in TEMPLATE_KEYS:
        if key in config and not isinstance(config[key], str | int | list):
            raise DatasetError(f"`{key}` must be a column name, a Jinja template, an index or a list of choices")


def _check_templates(config: dict[str, Any], doc: dict[str, Any], source: str) -> None:
    """Render each prompt template on the split's first document, in the sandbox the worker uses."""
    env = sandboxed_templates()
    for key in TEMPLATE_KEYS:
        value = config.get(key)
        if not isinstance(value, str) or value in doc:
            continue  # a column name, an index or a literal list
        try:
            env.from_string(value).render(**doc)
        except TemplateError as exc:
            raise DatasetError(f"`{key}` does not render on the first document of {source}: {exc}") from exc


def _evaluated_split(config: dict[str, Any], splits: dict[str, list[str]]) -> str:
    split = config.get("test_split") or config.get("validation_split")
    if not isinstance(split, str) or split not in splits:
        raise DatasetError(
            "set `test_split` (or `validation_split`) to a split named in `data_files`; its documents are scored"
        )
    for key in ("training_split", "fewshot_split", "validation_split", "test_split"):
        if key in config and config[key] is not None and config[key] not in splits:
            raise DatasetError(f"`{key}` is {config[key]!r}, a split that `data_files` does not name")
    return split


def check_task(root: Path) -> tuple[Path, list[Path], int]:
    """Validate the extracted archive at `root`: (its YAML, the data files it names, documents scored)."""
    config_path = _task_yaml(root)
    config = _read_yaml(config_path)
    _check_keys(config)
    splits = _data_files(config)
    split = _evaluated_split(config, splits)
    base = config_path.parent
    files = {name: _member(base, name) for names in splits.values() for name in names}
    scored = [doc for name in splits[split] for doc in _documents(files[name], name)]
    for name, path in files.items():
        _documents(path, name)
    _check_templates(config, scored[0], splits[split][0])
    return config_path, list(files.values()), len(scored)


def check_dataset_filename(filename: str) -> None:
    """Refuse, by its name, a file that is neither text nor an archive (before any byte is received)."""
    if not filename.lower().endswith(ARCHIVE_SUFFIXES):
        dataset_format(filename)


def is_task_archive(filename: str, path: Path) -> bool:
    """Whether the upload is an lm-eval task: not named as text, and an archive by its bytes."""
    if filename.lower().endswith((".txt", ".jsonl")):
        return False
    try:
        return detect_kind(path) in (Kind.zip, Kind.tar, Kind.tar_gz)
    except ArchiveError:
        return False


def unpack_task(archive: Path, folder: Path, limits: Limits) -> tuple[Path, int]:
    """Extract and check the task archive; returns a folder holding only `task.yaml` and its data files, and the
    number of documents it scores."""
    extracted = folder / "extracted"
    extract(archive, detect_kind(archive), extracted, limits)
    config_path, files, documents = check_task(extracted)
    task = folder / "task"
    task.mkdir()
    shutil.copyfile(config_path, task / TASK_FILE)
    for path in files:
        target = task / path.relative_to(config_path.parent)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    shutil.rmtree(extracted)
    return task, documents
