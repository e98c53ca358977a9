"""`modelpress upload` sends big files in parts against the live API, and resumes an interrupted upload by sending
only the parts the server lacks."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from modelpress.cli import main as cli
from modelpress.cli.client import ApiError, Client
from tests.conftest import LiveProcess
from tests.utils.factories import build_tiny_model

runner = CliRunner()


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[tuple[str, str]]:
    """Every request the client sends, as (method, path); the upload state goes to a fresh folder."""
    monkeypatch.setenv("MODELPRESS_STATE_DIR", str(tmp_path / "state"))
    requests: list[tuple[str, str]] = []
    original = Client.request

    def recording(self: Client, method: str, path: str, **kwargs) -> httpx.Response:
        requests.append((method, path))
        return original(self, method, path, **kwargs)

    monkeypatch.setattr(Client, "request", recording)
    return requests


def upload(live_api: LiveProcess, api_key: str, folder: Path, part_size: int):
    args = ["upload", "model", str(folder), "--url", live_api.url, "--api-key", api_key]
    args += ["--resumable-above", "1000", "--part-size", str(part_size)]
    return runner.invoke(cli.app, args, env={"COLUMNS": "200"})


def parts(requests: list[tuple[str, str]]) -> list[int]:
    return [int(path.rsplit("/", 1)[1]) for method, path in requests if method == "PUT"]


def test_an_interrupted_upload_resumes_with_the_missing_parts(
    live_api: LiveProcess, api_key: str, sent: list[tuple[str, str]], tmp_path: Path, monkeypatch
) -> None:
    folder = build_tiny_model(tmp_path / "tiny-model")
    total = sum(p.stat().st_size for p in folder.iterdir())
    part_size = total // 3  # the packed tar is a little bigger: 4 parts
    recording = Client.request

    def cut_after_first_part(self: Client, method: str, path: str, **kwargs) -> httpx.Response:
        if method == "PUT" and parts(sent):
            sent.append((method, path))
            raise ApiError("connection reset by peer")
        return recording(self, method, path, **kwargs)

    monkeypatch.setattr(Client, "request", cut_after_first_part)
    first = upload(live_api, api_key, folder, part_size)
    assert first.exit_code == 1 and "connection reset" in first.output
    assert parts(sent) == [1, 2]  # the second part never arrived
    assert (tmp_path / "state" / "uploads.json").is_file()

    monkeypatch.setattr(Client, "request", recording)
    sent.clear()
    second = upload(live_api, api_key, folder, part_size)
    assert second.exit_code == 0, second.output
    assert [m for m, p in sent if p == "/v1/uploads"] == []  # no new upload was created
    assert parts(sent) == [2, 3, 4]
    assert sent[-1][0] == "POST" and sent[-1][1].endswith("/complete")
    model_id = second.output.strip().splitlines()[-1].split()[-1]
    with httpx.Client(base_url=live_api.url, headers={"Authorization": f"Bearer {api_key}"}) as client:
        model = client.get(f"/v1/models/{model_id}").json()
    assert model["name"] == "tiny-model" and model["format"] == "hf"
    assert "tiny-model" not in (tmp_path / "state" / "uploads.json").read_text()  # forgotten once complete


def test_small_files_keep_the_single_request_upload(
    live_api: LiveProcess, api_key: str, sent: list[tuple[str, str]], tmp_path: Path
) -> None:
    text = tmp_path / "small.txt"
    text.write_text("a line of text\n" * 20)
    args = ["upload", "dataset", str(text), "--url", live_api.url, "--api-key", api_key]
    result = runner.invoke(cli.app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert sent == [("POST", "/v1/datasets")]
