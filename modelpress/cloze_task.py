"""A cloze task built from plain text, packed as an lm-eval task archive (`task.yaml` + `test.jsonl` in a .tar)
that `POST /v1/datasets` accepts and `evaluation.tasks` scores with no hub access.

Each paragraph (a line of at least `min_words` words, headings skipped) becomes one document: its text up to the
last word is the context, and that word must be picked among `choices` words drawn from the same paragraph
(lm-eval's multiple_choice: the choice with the highest log-likelihood after the context wins, so a model that
reads the paragraph beats the 1/`choices` chance rate, and accuracy has a standard error). The same text, seed
and options always give the same archive.
"""

from __future__ import annotations

import io
import json
import random
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import yaml

WORD = re.compile(r"^[A-Za-z][A-Za-z'-]*[A-Za-z]$")
"""A candidate answer: letters (inner apostrophes and hyphens allowed), no digits or punctuation."""
UNKNOWN = ("<unk>",)


@dataclass(frozen=True)
class ClozeOptions:
    name: str = "cloze"
    choices: int = 4
    min_words: int = 30
    max_context_words: int = 120
    max_documents: int | None = 500
    seed: int = 0


def _is_word(token: str) -> bool:
    return token not in UNKNOWN and len(token) >= 3 and WORD.match(token) is not None


def cloze_document(paragraph: str, options: ClozeOptions, rng: random.Random) -> dict | None:
    """{context, choices, label} for one paragraph, or None when it is too short or has too few distinct words."""
    tokens = paragraph.split()
    if len(tokens) < options.min_words or tokens[0] == "=":
        return None
    answer_at = next((i for i in range(len(tokens) - 1, -1, -1) if _is_word(tokens[i])), None)
    if answer_at is None or answer_at < options.min_words // 2:
        return None
    answer = tokens[answer_at]
    pool = sorted({t for t in tokens[:answer_at] if _is_word(t) and t.lower() != answer.lower()})
    if len(pool) < options.choices - 1:
        return None
    choices = [answer, *rng.sample(pool, options.choices - 1)]
    rng.shuffle(choices)
    context = " ".join(tokens[max(0, answer_at - options.max_context_words) : answer_at])
    return {"context": context, "choices": choices, "label": choices.index(answer)}


def cloze_documents(text: str, options: ClozeOptions) -> list[dict]:
    """One document per usable paragraph of `text`, in order, at most `options.max_documents`."""
    rng = random.Random(options.seed)
    documents = []
    for line in text.splitlines():
        document = cloze_document(line.strip(), options, rng)
        if document is not None:
            documents.append(document)
            if options.max_documents is not None and len(documents) >= options.max_documents:
                break
    return documents


def task_config(options: ClozeOptions) -> dict:
    """The lm-eval task config: multiple choice over `choices`, the context as the prompt, accuracy."""
    return {
        "task": options.name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": "test.jsonl"}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{context}}",
        "doc_to_choice": "choices",
        "doc_to_target": "label",
        "target_delimiter": " ",
        "metric_list": [{"metric": "acc"}],
        "metadata": {"version": 1},
    }


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    tar.addfile(info, io.BytesIO(data))


def build_cloze_task(text_path: Path, archive: Path, options: ClozeOptions | None = None) -> int:
    """Write the task archive built from the UTF-8 text at `text_path`; returns how many documents it holds."""
    options = options or ClozeOptions()
    if options.choices < 2:
        raise ValueError("a cloze task needs at least 2 choices")
    documents = cloze_documents(Path(text_path).read_text(encoding="utf-8"), options)
    if not documents:
        raise ValueError(
            f"{text_path} has no paragraph of at least {options.min_words} words with {options.choices} distinct "
            "words to choose from; use longer paragraphs (one per line) or lower --min-words"
        )
    lines = "".join(json.dumps(document, ensure_ascii=False) + "\n" for document in documents)
    with tarfile.open(archive, "w") as tar:
        _add(tar, "task.yaml", yaml.safe_dump(task_config(options), sort_keys=False).encode())
        _add(tar, "test.jsonl", lines.encode())
    return len(documents)
