"""Every refused upload answers a 4xx whose detail says what to fix, and leaves no row and no file behind."""

from __future__ import annotations

import json
import socket
import tarfile
import zipfile
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest

from tests.api import builders
from tests.utils.factories import tar_folder

pytestmark = pytest.mark.usefixtures("nothing_stored")


def post(client: httpx.Client, path: Path, route: str = "/v1/models") -> httpx.Response:
    with path.open("rb") as handle:
        return client.post(route, files={"file": (path.name, handle)})


def refused(response: httpx.Response, status: int, *fragments: str) -> None:
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str)
    for fragment in fragments:
        assert fragment in detail, detail


def test_not_an_archive(client: httpx.Client, tmp_path: Path) -> None:
    path = tmp_path / "model.tar.gz"
    path.write_text("just some text, not an archive\n" * 50)
    refused(post(client, path), 422, "not a supported file", ".zip, .tar, .tar.gz")


def test_archive_without_config(client: httpx.Client, tmp_path: Path) -> None:
    path = builders.tar_with(tmp_path / "weights.tar", None, [builders.file_member("README.md", b"hello")])
    refused(post(client, path), 422, "no config.json")


def test_damaged_gzip(client: httpx.Client, tmp_path: Path, tiny_model_dir: Path) -> None:
    archive = tar_folder(tiny_model_dir, tmp_path / "m.tar.gz", gzip=True)
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2])
    refused(post(client, archive), 422, "damaged")


@pytest.mark.parametrize(
    ("member", "fragment"),
    [
        (builders.file_member("../escaped.txt", b"x"), "outside the archive"),
        (builders.file_member("sub/../../escaped.txt", b"x"), "outside the archive"),
        (builders.file_member("/tmp/modelpress-absolute.txt", b"x"), "absolute path"),
        (builders.link_member("tokenizer.model", "/etc/passwd"), "is a link"),
        (builders.link_member("vocab.txt", "config.json", hard=True), "is a link"),
        (builders.device_member("zero"), "device or special file"),
    ],
    ids=["dotdot", "nested-dotdot", "absolute", "symlink", "hardlink", "device"],
)
def test_unsafe_tar_members(client, tmp_path, tiny_model_dir, member, fragment) -> None:
    path = builders.tar_with(tmp_path / "evil.tar", tiny_model_dir, [member])
    refused(post(client, path), 422, fragment)
    assert not (tmp_path / "escaped.txt").exists() and not Path("/tmp/modelpress-absolute.txt").exists()


def test_zip_symlink(client: httpx.Client, tmp_path: Path, tiny_model_dir: Path) -> None:
    path = builders.zip_with_symlink(tmp_path / "evil.zip", tiny_model_dir)
    refused(post(client, path), 422, "is a link")


def test_pickle_weights_are_refused_never_loaded(client: httpx.Client, tmp_path: Path, tiny_model_dir: Path) -> None:
    marker = tmp_path / "pickle-ran"
    member = builders.file_member("pytorch_model.bin", builders.malicious_pickle(marker))
    path = builders.tar_with(tmp_path / "pickled.tar", tiny_model_dir, [member])
    refused(post(client, path), 422, "pickle", "pytorch_model.bin", "safetensors")
    assert not marker.exists()


def test_python_files_are_refused(client: httpx.Client, tmp_path: Path, tiny_model_dir: Path) -> None:
    member = builders.file_member("modeling_evil.py", b"import os\nos.system('touch /tmp/x')\n")
    refused(post(client, builders.tar_with(tmp_path / "code.tar", tiny_model_dir, [member])), 422, "code")


@pytest.mark.parametrize(
    ("changes", "fragments"),
    [
        ({"auto_map": {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}}, ("auto_map", "custom code")),
        ({"architectures": None}, ("architectures",)),
        ({"architectures": ["EvilForCausalLM"]}, ("EvilForCausalLM", "not supported")),
        ({"model_type": "bert", "architectures": ["BertModel"]}, ("'bert'", "not supported", "llama")),
        ({"vocab_size": 999}, ("embed_tokens", "vocab_size")),
        ({"hidden_size": None}, ("hidden_size",)),
    ],
    ids=["auto_map", "no-architectures", "unknown-architecture", "unknown-model-type", "embed-mismatch", "no-hidden"],
)
def test_bad_config(client, tmp_path, tiny_model_dir, changes, fragments) -> None:
    folder = builders.copy_with_config(tiny_model_dir, tmp_path / "m", **changes)
    refused(post(client, tar_folder(folder, tmp_path / "m.tar")), 422, *fragments)


def test_truncated_safetensors(client: httpx.Client, tmp_path: Path, tiny_model_dir: Path) -> None:
    folder = builders.copy_with_config(tiny_model_dir, tmp_path / "m")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    refused(post(client, tar_folder(folder, tmp_path / "m.tar")), 422, "model.safetensors", "truncated")


def test_safetensors_huge_header(client: httpx.Client, tmp_path: Path, tiny_model_dir: Path) -> None:
    folder = builders.copy_with_config(tiny_model_dir, tmp_path / "m")
    (folder / "model.safetensors").write_bytes((2**40).to_bytes(8, "little") + b"{}")
    refused(post(client, tar_folder(folder, tmp_path / "m.tar")), 422, "not a valid safetensors file")


def test_no_safetensors(client: httpx.Client, tmp_path: Path, tiny_model_dir: Path) -> None:
    folder = builders.copy_with_config(tiny_model_dir, tmp_path / "m")
    (folder / "model.safetensors").unlink()
    refused(post(client, tar_folder(folder, tmp_path / "m.tar")), 422, "safetensors")


def test_compression_ratio_bomb(client: httpx.Client, tmp_path: Path) -> None:
    member = builders.file_member("config.json", b" " * (20 * 1024 * 1024))
    path = builders.tar_with(tmp_path / "bomb.tar.gz", None, [member], gz=True)
    refused(post(client, path), 413, "decompression bomb")


def test_expanded_size_bound(degraded: httpx.Client, tmp_path: Path) -> None:
    member = builders.file_member("model.safetensors", b"\0" * (2 * 1024 * 1024))
    path = builders.tar_with(tmp_path / "big.tar.gz", None, [member], gz=True)
    refused(post(degraded, path), 413, "MODELPRESS_MAX_EXTRACTED_BYTES")


def test_many_members_bomb(degraded: httpx.Client, tmp_path: Path) -> None:
    members = [builders.file_member(f"f{i}.txt", b"") for i in range(50)]
    refused(post(degraded, builders.tar_with(tmp_path / "many.tar", None, members)), 413, "more than 20 members")


def test_oversize_upload(degraded: httpx.Client, tmp_path: Path) -> None:
    path = tmp_path / "big.gguf"
    path.write_bytes(b"GGUF" + b"\0" * (1024 * 1024))
    refused(post(degraded, path), 413, "MODELPRESS_MAX_UPLOAD_BYTES")
    refused(post(degraded, path, "/v1/datasets"), 413, "MODELPRESS_MAX_UPLOAD_BYTES")


def read_response(sock: socket.socket) -> str:
    """One HTTP response (headers and its Content-Length body) from a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(
        next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    )
    while len(body) < length:
        body += sock.recv(65536)
    return (head + b"\r\n\r\n" + body).decode(errors="replace")


def test_oversize_refused_while_streaming(degraded_api, api_key: str) -> None:
    """A chunked upload with no length: 413 arrives after ~the limit, while the client is still sending."""
    url = urlparse(degraded_api.url)
    boundary = "xBOUNDARYx"
    head = (
        f"POST /v1/models HTTP/1.1\r\nHost: {url.netloc}\r\nAuthorization: Bearer {api_key}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()
    part = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="m.tar"\r\n\r\n'.encode()
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall(head)
        sock.sendall(b"%x\r\n%s\r\n" % (len(part), part))
        chunk = b"\0" * 65536
        for _ in range(40):  # 2.5 MiB, five times the limit, and never the closing chunk
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        reply = read_response(sock)
    assert reply.startswith("HTTP/1.1 413"), reply[:200]
    assert "MODELPRESS_MAX_UPLOAD_BYTES" in reply


def test_declared_length_over_limit(degraded: httpx.Client) -> None:
    response = degraded.post(
        "/v1/models",
        content=b"x" * (700 * 1024),
        headers={"Content-Type": "multipart/form-data; boundary=abc"},
    )
    refused(response, 413, "MODELPRESS_MAX_UPLOAD_BYTES")


def test_malformed_multipart(client: httpx.Client) -> None:
    response = client.post(
        "/v1/models",
        content=b"garbage without boundaries",
        headers={"Content-Type": "multipart/form-data; boundary=abc"},
    )
    assert response.status_code == 400 and isinstance(response.json()["detail"], str)


def test_multipart_without_file(client: httpx.Client) -> None:
    refused(client.post("/v1/models", data={"name": "x"}, files={"other": ("a", b"b")}), 400, "'file'")


def test_not_multipart(client: httpx.Client) -> None:
    refused(client.post("/v1/models", content=b"file=x", headers={"Content-Type": "text/plain"}), 415, "multipart")


def test_json_that_names_no_stored_object(client: httpx.Client) -> None:
    refused(client.post("/v1/models", json={"file": "x"}), 422, "storage_url", "multipart/form-data")


def test_reference_on_local_storage(client: httpx.Client) -> None:
    refused(client.post("/v1/models", json={"storage_url": "s3://bucket/m.gguf"}), 422, "upload the file instead")


def test_wrong_key_uploads_nothing(anon: httpx.Client, tiny_tar: Path) -> None:
    with tiny_tar.open("rb") as handle:
        response = anon.post("/v1/models", files={"file": ("t.tar", handle)}, headers={"Authorization": "Bearer nope"})
    refused(response, 401, "API key")
    assert response.headers["www-authenticate"].startswith("Bearer")


def test_config_not_json(client: httpx.Client, tmp_path: Path, tiny_model_dir: Path) -> None:
    folder = builders.copy_with_config(tiny_model_dir, tmp_path / "m")
    (folder / "config.json").write_text("{not json")
    refused(post(client, tar_folder(folder, tmp_path / "m.tar")), 422, "config.json is not valid JSON")
    json.loads((tiny_model_dir / "config.json").read_text())


def test_member_count_is_checked_streaming(tmp_path: Path) -> None:
    """Extraction stops at the bound; it does not list the archive first (unit check of the extractor)."""
    from app.archives import Kind, Limits, TooLarge, extract

    path = builders.tar_with(tmp_path / "many.tar", None, [builders.file_member(f"f{i}", b"x") for i in range(10)])
    with pytest.raises(TooLarge):
        extract(path, Kind.tar, tmp_path / "out", Limits(max_members=3, max_bytes=10**9, max_ratio=1e9))
    assert len(list((tmp_path / "out").iterdir())) == 3
    assert tarfile.is_tarfile(path)


@pytest.mark.parametrize(
    ("name", "fragment"),
    [("../escaped.txt", "outside the archive"), ("/tmp/modelpress-zip-absolute.txt", "absolute path")],
    ids=["dotdot", "absolute"],
)
def test_unsafe_zip_members(client: httpx.Client, tmp_path: Path, tiny_model_dir: Path, name, fragment) -> None:
    path = builders.zip_with(tmp_path / "evil.zip", tiny_model_dir, {name: b"x"})
    refused(post(client, path), 422, fragment)
    assert not (tmp_path / "escaped.txt").exists() and not Path("/tmp/modelpress-zip-absolute.txt").exists()


def test_zip_compression_ratio_bomb(client: httpx.Client, tmp_path: Path) -> None:
    member = {"config.json": b" " * (20 * 1024 * 1024)}
    path = builders.zip_with(tmp_path / "bomb.zip", None, member, compression=zipfile.ZIP_DEFLATED)
    refused(post(client, path), 413, "decompression bomb")


def test_pt_pickle_in_zip_is_refused_never_loaded(client: httpx.Client, tmp_path: Path, tiny_model_dir: Path) -> None:
    marker = tmp_path / "pickle-ran"
    path = builders.zip_with(tmp_path / "p.zip", tiny_model_dir, {"weights.pt": builders.malicious_pickle(marker)})
    refused(post(client, path), 422, "pickle", "weights.pt")
    assert not marker.exists()


def test_tokenizer_auto_map(client: httpx.Client, tmp_path: Path, tiny_model_dir: Path) -> None:
    folder = builders.copy_with_config(tiny_model_dir, tmp_path / "m")
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    refused(post(client, tar_folder(folder, tmp_path / "m.tar")), 422, "tokenizer_config.json", "auto_map")


def test_multipart_without_closing_boundary(client: httpx.Client) -> None:
    body = b'--b0\r\nContent-Disposition: form-data; name="file"; filename="a.txt"\r\n\r\nsome text\n' * 1
    response = client.post("/v1/datasets", content=body, headers={"Content-Type": "multipart/form-data; boundary=b0"})
    refused(response, 400, "closing boundary")


def test_multipart_part_without_name(client: httpx.Client) -> None:
    body = b"--b0\r\nContent-Disposition: form-data\r\n\r\nx\r\n--b0--\r\n"
    response = client.post("/v1/models", content=body, headers={"Content-Type": "multipart/form-data; boundary=b0"})
    refused(response, 400, "Content-Disposition")
