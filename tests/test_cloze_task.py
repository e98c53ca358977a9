"""The cloze task builder: each paragraph's last word among words of the same paragraph, as an lm-eval task
archive; the same text and seed give the same archive."""

from __future__ import annotations

import json
import tarfile

import pytest
import yaml

from modelpress.cloze_task import ClozeOptions, build_cloze_task, cloze_documents

PARAGRAPH = (
    "The river rises in the northern hills and flows south through farmland , passing three market towns before "
    "it reaches the sea near the old harbour of Westport ."
)


def test_the_answer_is_the_paragraphs_last_word_among_its_own_words() -> None:
    text = f" = Heading = \n\n {PARAGRAPH} \n short line .\n"
    (document,) = cloze_documents(text, ClozeOptions(min_words=10, choices=4))
    assert document["choices"][document["label"]] == "Westport"
    assert document["context"].endswith("near the old harbour of")
    words = set(PARAGRAPH.split())
    assert len(set(document["choices"])) == 4 and set(document["choices"]) <= words


def test_archive_is_an_lm_eval_task_and_reproducible(tmp_path) -> None:
    source = tmp_path / "text.txt"
    source.write_text(
        "\n".join(f"{PARAGRAPH} {i} more words here to vary it : Item{chr(65 + i % 26)}x ." for i in range(30))
    )
    first, second = tmp_path / "a.tar", tmp_path / "b.tar"
    assert build_cloze_task(source, first, ClozeOptions(min_words=10, max_documents=20)) == 20
    build_cloze_task(source, second, ClozeOptions(min_words=10, max_documents=20))
    assert first.read_bytes() == second.read_bytes()
    with tarfile.open(first) as tar:
        assert tar.getnames() == ["task.yaml", "test.jsonl"]
        config = yaml.safe_load(tar.extractfile("task.yaml"))
        lines = tar.extractfile("test.jsonl").read().decode().splitlines()
    assert config["output_type"] == "multiple_choice" and config["dataset_kwargs"]["data_files"] == {
        "test": "test.jsonl"
    }
    assert len(lines) == 20 and all(0 <= json.loads(line)["label"] < 4 for line in lines)


def test_text_without_usable_paragraphs_is_refused(tmp_path) -> None:
    source = tmp_path / "short.txt"
    source.write_text("too short\n")
    with pytest.raises(ValueError, match="no paragraph of at least 30 words"):
        build_cloze_task(source, tmp_path / "t.tar")
