"""The project's text describes the product as it is: no work periods, no machine lending, no issue numbers, no
who-did-what. History belongs in git; a page, a comment or a file name that tells it goes stale the day it lands.

Every git-tracked text file is read (binary files are skipped) and each line is matched against precise patterns.
"session" alone is legitimate here (SQLAlchemy's Session, `requests.Session`, a test session, a process session),
so only its history senses are matched, and its technical senses are allow-listed explicitly (LEGITIMATE). Only
tracked files are read: a new file counts once it is added.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
THIS_FILE = Path(__file__).resolve().relative_to(ROOT).as_posix()

# (what it is, pattern) — each names one sense of history-telling precisely
FORBIDDEN = [
    ("a numbered work period", re.compile(r"\b[Ss]essions? \d")),
    ("a numbered work period", re.compile(r"\b[Rr]ounds? \d")),
    ("a work period", re.compile(r"\bwork periods?\b", re.IGNORECASE)),
    (
        "a work period",
        re.compile(r"\b(?:this|that|previous|next|last|earlier|later|same) session\b", re.IGNORECASE),
    ),
    ("a work period", re.compile(r"\bin session\b", re.IGNORECASE)),
    ("how a machine was borrowed", re.compile(r"\b(?:lent|lending|borrowed)\b", re.IGNORECASE)),
    ("how a machine was borrowed", re.compile(r"\bdevice (?:time|tool|calls?|minutes|budget)\b", re.IGNORECASE)),
    ("how a machine was borrowed", re.compile(r"\bbudget_left")),
    ("an issue number", re.compile(r"\b[Ii]ssues? #?\d+")),
    ("an issue number", re.compile(r"(?<![\w/&-])#\d+\b")),
    ("an issue of this project", re.compile(r"\bthe issue's\b|\bfrom the issue\b", re.IGNORECASE)),
    (
        "who did what",
        re.compile(r"\b(?:[Ww]e|I) (?:tried|measured|ran|found|built|decided|saw|wrote|tested|checked)\b"),
    ),
    ("who did what", re.compile(r"\ba helper's\b", re.IGNORECASE)),
]

# technical senses of the same words, removed from a line before it is matched
LEGITIMATE = re.compile(
    r"\b(?:test|pytest|browser|database|SQLAlchemy|HTTP|requests|process|its own|a new) session\b"
    r"|\bsession_scope\b|scope=\"session\"|\bstart_new_session\b|\bsession\.\w+",
    re.IGNORECASE,
)

VENDORED = "app/dashboard/static/vendor/"  # third-party files copied verbatim from their package (not our prose)

BAD_NAME = re.compile(r"(?:^|[_\-.])(?:s\d+|sessions?_?\d+|rounds?_?\d+)(?:[_\-.]|$)", re.IGNORECASE)


def tracked_files() -> list[str]:
    listing = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
    return [name for name in listing.stdout.decode().split("\0") if name]


def text_of(path: Path) -> str | None:
    """The file's text, or None for a binary (a NUL byte or not UTF-8) or a file missing from the work tree."""
    try:
        data = path.read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        return None
    if b"\0" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def history_hits(name: str, text: str) -> list[str]:
    """`file:line: what — the line` for every forbidden pattern on every line that is not allow-listed."""
    hits = []
    for number, line in enumerate(text.splitlines(), start=1):
        prose = LEGITIMATE.sub("", line)
        for what, pattern in FORBIDDEN:
            if pattern.search(prose):
                hits.append(f"{name}:{number}: {what} — {line.strip()[:160]}")
                break
    return hits


def test_no_tracked_text_tells_history():
    hits = []
    for name in tracked_files():
        if name == THIS_FILE or name.startswith(VENDORED):
            continue
        text = text_of(ROOT / name)
        if text is not None:
            hits += history_hits(name, text)
    assert not hits, "describe the product as it is (history stays in git):\n" + "\n".join(hits)


def test_no_file_name_tells_history():
    bad = [name for name in tracked_files() if BAD_NAME.search(Path(name).name)]
    assert not bad, "name files by what they hold and the date, not a work period:\n" + "\n".join(bad)


@pytest.mark.parametrize(
    "line",
    [
        "## Session 6 (2026-11-29)",
        "sessions 3 to 6",
        "measured in round 2",
        "Not re-measured this session.",
        "on the lent H200",
        "the device time ran out",
        "budget_left_s was 240",
        "see issue 4",
        "closes #12",
        "the issue's targets",
        "We measured it twice",
        "a helper's one-off probe",
    ],
)
def test_each_history_sense_is_caught(line):
    hits = history_hits("README.md", f"intro\n{line}\nthe end\n")
    assert len(hits) == 1 and hits[0].startswith("README.md:2: ") and hits[0].endswith(f" — {line}")


@pytest.mark.parametrize(
    "line",
    [
        "with session_scope() as session:",
        "SessionDep = Annotated[Session, Depends(get_session)]",
        '@pytest.fixture(scope="session")',
        "in this test session's database",
        "requests.Session() keeps the connection",
        "start_new_session=True",
        "the child led its own session",
        "the same browser session keeps the cookie",
        "for job in session.scalars(stale):",
        "the job is added in session.add(job) before the commit",
        "round(0.5 * 45)",
        "triton-lang/triton#11584",
        "https://github.com/vllm-project/llm-compressor/issues/1618",
        "one NVIDIA H200, 141 GB",
        "a known issue of transformers 5.24",
    ],
)
def test_technical_uses_pass(line):
    assert history_hits("README.md", line) == []


@pytest.mark.parametrize("name", ["gpu_speed_s6_b1.json", "notes_session4.md", "round2.txt", "x_s5_.json"])
def test_work_period_file_names_are_caught(name):
    assert BAD_NAME.search(name)


@pytest.mark.parametrize("name", ["gpu_speed_b1_2026-11-29.json", "sessions.py", "gpu_speed_b16_2026-11-29.json"])
def test_content_file_names_pass(name):
    assert not BAD_NAME.search(name)
