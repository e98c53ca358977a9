"""`modelpress`: the command line. Database commands (keys, migrate), the HTTP client commands, `dev`.

Heavy imports (SQLAlchemy, Alembic, the dev runner) happen inside the commands that need them, so the client
starts fast; nothing here imports torch.
"""

from __future__ import annotations

import tarfile
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from modelpress.cli import render, resumable
from modelpress.cli import search as search_command
from modelpress.cli import watch as watching
from modelpress.cli.client import DEFAULT_URL, ApiError, Client
from modelpress.cli.recipe import RecipeError, build_job_body

FINAL = frozenset({"succeeded", "failed", "cancelled"})

app = typer.Typer(
    name="modelpress",
    help="Prune and quantize language models on a modelpress server, and run one locally (`modelpress dev`).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
keys_app = typer.Typer(help="API keys (talks to the database directly: run it where the server runs).")
upload_app = typer.Typer(help="Upload a model or a dataset.", no_args_is_help=True)
models_app = typer.Typer(help="Uploaded models.", no_args_is_help=True)
datasets_app = typer.Typer(help="Uploaded datasets.", no_args_is_help=True)
jobs_app = typer.Typer(help="Optimization jobs.", no_args_is_help=True)
workers_app = typer.Typer(
    help="The workers that registered with the server (needs the admin key).", invoke_without_command=True
)
app.add_typer(keys_app, name="keys", no_args_is_help=True)
app.add_typer(upload_app, name="upload")
app.add_typer(models_app, name="models")
app.add_typer(datasets_app, name="datasets")
app.add_typer(jobs_app, name="jobs")
app.add_typer(workers_app, name="workers")

console = render.make_console()
err = render.make_console(stderr=True)

Url = Annotated[str, typer.Option("--url", envvar="MODELPRESS_URL", help="Server address.")]
ApiKey = Annotated[
    str | None, typer.Option("--api-key", envvar="MODELPRESS_API_KEY", help="API key.", show_default=False)
]
AdminKey = Annotated[
    str | None,
    typer.Option("--admin-key", envvar="MODELPRESS_ADMIN_KEY", help="The server's admin key.", show_default=False),
]


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print an error a person can act on (no traceback) and return the exit to raise."""
    err.print(Text("error: ", style="bold red") + Text(message))
    return typer.Exit(code)


@contextmanager
def api(url: str, api_key: str | None) -> Iterator[Client]:
    """A client whose failures end the command with the server's detail and exit status 1."""
    try:
        with Client(url, api_key) as client:
            yield client
    except ApiError as exc:
        message = str(exc)
        if exc.status_code == 401 and not api_key:
            message += "\nset MODELPRESS_API_KEY or pass --api-key (create one: modelpress keys create --tenant NAME)"
        raise fail(message) from None


# database commands ---------------------------------------------------------------------------------------------


def _database_errors() -> tuple[type[BaseException], ...]:
    from sqlalchemy.exc import SQLAlchemyError

    return (SQLAlchemyError, OSError)


@app.command()
def migrate() -> None:
    """Bring the database schema (DATABASE_URL, or the SQLite file in DATA_DIR) up to date."""
    from modelpress.migrate import upgrade
    from modelpress.settings import get_settings

    try:
        upgrade()
    except _database_errors() as exc:
        raise fail(f"migration failed: {exc}") from None
    url = get_settings().database_url or ""
    console.print(f"database schema is up to date ({url.split('@')[-1]})")


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="Tenant the key acts for; tenants never see each other's data.")],
) -> None:
    """Create an API key: printed once, alone on the last line; only its sha256 is stored."""
    tenant = tenant.strip()
    if not tenant or len(tenant) > 64:
        raise fail("--tenant must be 1 to 64 characters")
    from modelpress.db import session_scope
    from modelpress.keys import create_key
    from modelpress.migrate import upgrade

    try:
        upgrade()
        with session_scope() as session:
            row, secret = create_key(session, tenant)
    except _database_errors() as exc:
        raise fail(f"could not store the key: {exc}") from None
    console.print(
        f"Created API key {row.prefix}… for tenant '{tenant}'. Only its hash is stored: copy it now, "
        "it cannot be shown again.\nSend it as 'Authorization: Bearer <key>', or export MODELPRESS_API_KEY=<key>.",
        markup=False,
        highlight=False,
    )
    typer.echo(secret)


# uploads -------------------------------------------------------------------------------------------------------


def _transfer_progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=err,
        transient=True,
    )


def _pack_folder(folder: Path, archive: Path) -> Path:
    """A model folder as an uncompressed .tar with its files at the root (safetensors barely compress)."""
    if not (folder / "config.json").is_file():
        raise fail(f"{folder} is not a Hugging Face model folder: it has no config.json")
    with err.status(f"packing {folder} …"), tarfile.open(archive, "w") as tar:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and not path.is_symlink():
                tar.add(path, arcname=str(path.relative_to(folder)))
    return archive


def _upload(
    kind: str, path: Path, name: str | None, url: str, api_key: str | None, parts: PartOptions
) -> dict[str, Any]:
    if not path.exists():
        raise fail(f"{path} does not exist")
    key = resumable.source_key(url, path)
    with tempfile.TemporaryDirectory(prefix="modelpress-upload-") as tmp:
        filename = None
        if path.is_dir():
            if kind != "models":
                raise fail(f"{path} is a folder; a dataset is one .txt or .jsonl file, or an lm-eval task archive")
            name = name or path.resolve().name
            filename = f"{path.resolve().name}.tar"
            path = _pack_folder(path, Path(tmp) / filename)
        with api(url, api_key) as client, _transfer_progress() as progress:
            task = progress.add_task(f"uploading {filename or path.name}", total=path.stat().st_size)

            def advance(count: int) -> None:
                progress.advance(task, count)

            if path.stat().st_size <= parts.above:
                return client.upload(kind, path, name=name, filename=filename, on_read=advance)
            return resumable.upload_in_parts(
                client, kind[:-1], path, key=key, name=name, filename=filename, part_size=parts.size, on_read=advance
            )


@dataclass(frozen=True)
class PartOptions:
    above: int
    size: int | None


ResumableAbove = Annotated[
    int,
    typer.Option(
        "--resumable-above",
        envvar="MODELPRESS_RESUMABLE_ABOVE",
        help="Files larger than this (bytes) go up in parts, and a rerun after an interruption resumes.",
    ),
]
PartSize = Annotated[
    int | None,
    typer.Option("--part-size", envvar="MODELPRESS_PART_SIZE", help="Bytes per part (default: the server's)."),
]


def _show_uploaded(noun: str, table: Callable[[list[dict[str, Any]]], Table], row: dict[str, Any]) -> None:
    console.print(table([row]))
    console.print(f"{noun} id: {row.get('id')}", highlight=False)


def _add_upload_command(
    path: str, noun: str, table: Callable[[list[dict[str, Any]]], Table], helps: tuple[str, str, str]
) -> None:
    """`upload <noun>` for one resource (`path` under /v1/); `helps`: the command's, the file's and the name's."""

    def upload_row(
        path_: Path = typer.Argument(..., metavar="path", help=helps[1], show_default=False),
        name: str | None = typer.Option(None, help=helps[2]),
        url: Url = DEFAULT_URL,
        api_key: ApiKey = None,
        resumable_above: ResumableAbove = resumable.DEFAULT_THRESHOLD,
        part_size: PartSize = None,
    ) -> None:
        parts = PartOptions(resumable_above, part_size)
        _show_uploaded(noun, table, _upload(path, path_, name, url, api_key, parts))

    upload_app.command(noun, help=helps[0])(upload_row)


_add_upload_command(
    "models",
    "model",
    render.models_table,
    (
        "Upload a model checkpoint; a folder is packed into a .tar first (in a temporary folder).",
        "A model folder, a .zip/.tar/.tar.gz of one, or a .gguf file.",
        "Display name (default: the file or folder name).",
    ),
)
_add_upload_command(
    "datasets",
    "dataset",
    render.datasets_table,
    (
        "Upload text for calibration and evaluation, or an lm-eval task for the report's task accuracy.",
        'A .txt file, .jsonl with a "text" field, or a .tar/.zip of an lm-eval task (YAML + .jsonl).',
        "Display name (default: the file name).",
    ),
)


# listings ------------------------------------------------------------------------------------------------------


def _add_listing_commands(
    group: typer.Typer, path: str, noun: str, table: Callable[[list[dict[str, Any]]], Table], helps: tuple[str, str]
) -> None:
    """`list` and `delete` for one uploaded resource (`path` under /v1/), with their help texts `helps`."""

    def list_rows(url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
        with api(url, api_key) as client:
            console.print(table(client.list(path)))

    def delete_row(
        row_id: str = typer.Argument(..., metavar=f"{noun}_id", show_default=False),
        url: Url = DEFAULT_URL,
        api_key: ApiKey = None,
    ) -> None:
        with api(url, api_key) as client:
            client.request("DELETE", f"/v1/{path}/{row_id}")
        console.print(f"deleted {noun} {row_id}", highlight=False)

    group.command("list", help=helps[0])(list_rows)
    group.command("delete", help=helps[1])(delete_row)


_add_listing_commands(
    models_app,
    "models",
    "model",
    render.models_table,
    ("Your uploaded models.", "Delete a model and its stored checkpoint."),
)
_add_listing_commands(
    datasets_app, "datasets", "dataset", render.datasets_table, ("Your uploaded datasets.", "Delete a dataset.")
)


@datasets_app.command("cloze")
def datasets_cloze(
    text: Annotated[Path, typer.Argument(help="UTF-8 text, one paragraph per line.", show_default=False)],
    out: Annotated[Path, typer.Option(help="The task archive to write (.tar).", show_default=False)],
    name: Annotated[str, typer.Option(help="The task's name in the report.")] = "cloze",
    choices: Annotated[int, typer.Option(help="Choices per document (chance accuracy is 1/choices).")] = 4,
    max_documents: Annotated[int, typer.Option(help="At most this many documents.")] = 500,
    min_words: Annotated[int, typer.Option(help="Skip paragraphs shorter than this.")] = 30,
    seed: Annotated[int, typer.Option(help="Seed for the distractors and their order.")] = 0,
) -> None:
    """Build a cloze task from text (each paragraph's last word among words of the same paragraph), as an lm-eval
    task archive for `upload dataset` and the job's evaluation.tasks."""
    from modelpress.cloze_task import ClozeOptions, build_cloze_task

    options = ClozeOptions(name=name, choices=choices, min_words=min_words, max_documents=max_documents, seed=seed)
    try:
        documents = build_cloze_task(text, out, options)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise fail(str(exc)) from None
    console.print(f"wrote {out}: task {name!r}, {documents} documents, {choices} choices each", highlight=False)


@jobs_app.command("list")
def jobs_list(
    status: Annotated[str | None, typer.Option(help="queued, running, succeeded, failed or cancelled.")] = None,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Your jobs, newest first."""
    with api(url, api_key) as client:
        console.print(render.jobs_table(client.list("jobs", status=status)))


@jobs_app.command("show")
def jobs_show(job_id: str, url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """One job as the server returns it (JSON)."""
    with api(url, api_key) as client:
        console.print_json(data=client.job(job_id))


@workers_app.callback()
def workers(ctx: typer.Context, url: Url = DEFAULT_URL, admin_key: AdminKey = None) -> None:
    """Every registered worker: its GPUs, memory classes, free disk, state and current job."""
    if ctx.invoked_subcommand is None:
        with api(url, admin_key) as client:
            console.print(render.workers_table(client.list("workers")))


@workers_app.command("drain")
def workers_drain(name: str, url: Url = DEFAULT_URL, admin_key: AdminKey = None) -> None:
    """Ask a worker to stop taking jobs, finish the one it runs and exit (then upgrade or remove it)."""
    with api(url, admin_key) as client:
        row = client.request("POST", f"/v1/workers/{name}/drain").json()
    console.print(f"worker {row['name']} is draining; it exits once its current job ends", highlight=False)


# jobs ----------------------------------------------------------------------------------------------------------


@app.command()
def submit(
    model: Annotated[str | None, typer.Option(help="Model id (overrides model_id in the recipe file).")] = None,
    recipe: Annotated[
        Path, typer.Option(help="YAML or JSON: a list of steps, or a whole job body.", show_default=False)
    ] = ...,
    calibration: Annotated[str | None, typer.Option(help="Dataset id for calibration.")] = None,
    samples: Annotated[int | None, typer.Option(help="Calibration windows.")] = None,
    seq_len: Annotated[int | None, typer.Option(help="Calibration window length in tokens.")] = None,
    evaluation: Annotated[str | None, typer.Option(help="Dataset id to measure perplexity on.")] = None,
    eval_seq_len: Annotated[int | None, typer.Option(help="Evaluation window length in tokens.")] = None,
    max_windows: Annotated[int | None, typer.Option(help="At most this many evaluation windows.")] = None,
    idempotency_key: Annotated[
        str | None, typer.Option(help="Retrying with the same key and body returns the same job.")
    ] = None,
    watch_job: Annotated[bool, typer.Option("--watch", help="Follow the job until it ends.")] = False,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Submit a job: a recipe of prune/quantize steps run on a GPU worker."""
    try:
        body = build_job_body(
            recipe,
            model=model,
            calibration=calibration,
            samples=samples,
            seq_len=seq_len,
            evaluation=evaluation,
            eval_seq_len=eval_seq_len,
            max_windows=max_windows,
        )
    except RecipeError as exc:
        raise fail(str(exc)) from None
    with api(url, api_key) as client:
        job = client.submit(body, idempotency_key)
        console.print(f"job {job.get('id')} {job.get('status', 'queued')}", highlight=False)
        if watch_job:
            raise typer.Exit(follow(client, str(job["id"])))


@app.command()
def search(
    model: Annotated[str, typer.Option(help="Model id.", show_default=False)] = ...,
    budget: Annotated[
        list[str],
        typer.Option(
            help="ppl=2% (perplexity increase), kl=0.01 (mean KL, nats) and/or task=2% (accuracy points each --task "
            "may lose).",
            show_default=False,
        ),
    ] = ...,
    calibration: Annotated[str, typer.Option(help="Dataset id for the sensitivity pass and GPTQ.")] = ...,
    evaluation: Annotated[str, typer.Option(help="Dataset id every candidate is measured on.")] = ...,
    objective: Annotated[str, typer.Option(help="size (bytes on disk) or decode_speed.")] = "size",
    formats: Annotated[list[str] | None, typer.Option("--format", help="Allowed layer format (repeat).")] = None,
    methods: Annotated[list[str] | None, typer.Option("--method", help="rtn, gptq or awq (repeat).")] = None,
    max_candidates: Annotated[int | None, typer.Option(help="Most candidates built and measured per family.")] = None,
    tasks: Annotated[
        list[str] | None,
        typer.Option("--task", help="Uploaded lm-eval task dataset id the task budget limits (repeat)."),
    ] = None,
    task_limit: Annotated[int | None, typer.Option(help="Score each task on at most this many documents.")] = None,
    idempotency_key: Annotated[
        str | None, typer.Option(help="Retrying with the same key and body returns the same search.")
    ] = None,
    watch_search: Annotated[bool, typer.Option("--watch", help="Follow it, then print the front.")] = False,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Search per-layer formats for the smallest (or fastest) model within a quality budget."""
    try:
        body = search_command.search_body(
            model, budget, objective, calibration, evaluation, formats, methods, max_candidates, tasks, task_limit
        )
    except search_command.BudgetError as exc:
        raise fail(str(exc)) from None
    with api(url, api_key) as client:
        created = client.submit_search(body, idempotency_key)
        console.print(f"search {created.get('id')} {created.get('status', 'queued')}", highlight=False)
        if watch_search:
            code = follow(client, str(created["id"]))
            finished = client.search(str(created["id"]))
            if finished.get("result"):
                console.print(search_command.front_table(finished))
            raise typer.Exit(code)


def follow(client: Client, job_id: str, interval: float = 1.0) -> int:
    """Follow a job to its end over its event stream (polling when the stream fails); 0 only if it succeeded."""
    return watching.follow(client, job_id, console, err, interval)


@app.command()
def watch(
    job_id: Annotated[str, typer.Argument(metavar="JOB")],
    interval: Annotated[
        float, typer.Option(help="Seconds between polls, when the event stream is unavailable.", min=0.1)
    ] = 1.0,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Follow a job with a progress bar; exits non-zero unless it succeeds."""
    with api(url, api_key) as client:
        code = follow(client, job_id, interval)
    raise typer.Exit(code)


@app.command()
def cancel(
    job_id: Annotated[str, typer.Argument(metavar="JOB")], url: Url = DEFAULT_URL, api_key: ApiKey = None
) -> None:
    """Cancel a queued or running job."""
    with api(url, api_key) as client:
        job = client.cancel(job_id)
    console.print(f"job {job_id}: {job.get('status', 'cancel requested')}", highlight=False)


def _extract(archive: Path, out: Path) -> Path:
    """Unpack a .tar artifact beside it, refusing members that would escape the folder."""
    name = archive.name
    for suffix in (".tar.gz", ".tgz", ".tar"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    target = out / name
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        tar.extractall(target, filter="data")
    return target


@app.command()
def download(
    job_id: Annotated[str, typer.Argument(metavar="JOB")],
    out: Annotated[Path | None, typer.Option(help="Folder to write to (default: ./<job id>).")] = None,
    extract: Annotated[bool, typer.Option(help="Unpack .tar artifacts (the optimized model) after download.")] = False,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Download a job's artifacts, streamed to disk and checked against their sha256."""
    out = out or Path(job_id)
    out.mkdir(parents=True, exist_ok=True)
    with api(url, api_key) as client:
        artifacts = client.artifacts(job_id)
        if not artifacts:
            raise fail(f"job {job_id} has no artifacts (yet): see `modelpress watch {job_id}`")
        for artifact in artifacts:
            target = out / Path(str(artifact.get("name") or artifact["id"])).name
            with _transfer_progress() as progress:
                task = progress.add_task(f"downloading {target.name}", total=artifact.get("size_bytes"))
                client.download(artifact, target, on_bytes=lambda n, t=task: progress.advance(t, n))
            console.print(f"{target}  sha256 ok", highlight=False)
            if extract and tarfile.is_tarfile(target):
                try:
                    folder = _extract(target, out)
                except (tarfile.TarError, OSError) as exc:
                    raise fail(f"could not unpack {target}: {exc}") from None
                console.print(f"unpacked into {folder}/", highlight=False)


@app.command()
def report(
    job_id: Annotated[str, typer.Argument(metavar="JOB")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw JSON report.")] = False,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Show a job's metric report: baseline vs optimized, per step, generations, environment."""
    with api(url, api_key) as client:
        data = client.report(job_id)
    if as_json:
        console.print_json(data=data)
    else:
        console.print(render.report_group(data))


# the embedded default ------------------------------------------------------------------------------------------


@app.command()
def dev(
    host: Annotated[str, typer.Option(help="Address the API listens on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port the API listens on.")] = 8000,
    worker: Annotated[bool, typer.Option("--worker/--no-worker", help="Start one worker.")] = True,
    stop_timeout: Annotated[float, typer.Option(help="Seconds to wait for each process to stop.")] = 15.0,
) -> None:
    """Run everything on this machine: embedded Redis (if REDIS_URL is unset), SQLite, the API and a worker."""
    from modelpress.cli.dev import DevError, run

    try:
        code = run(host=host, port=port, with_worker=worker, stop_timeout=stop_timeout, console=console)
    except DevError as exc:
        raise fail(str(exc)) from None
    raise typer.Exit(code)
