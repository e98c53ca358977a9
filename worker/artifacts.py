"""Move a job's finished output files into storage and describe them as Artifact rows.

Files are checksummed, then renamed into place under a fresh key; the rows are committed by the caller
only after every file is in place, so a download can never see a half-written artifact.
"""

from __future__ import annotations

from pathlib import Path

from modelpress.models import Artifact, Job, new_id
from modelpress.storage import Storage
from worker.engine.export.archive import sha256_file

OUTPUTS = (
    # file the engine writes, artifact kind, media type
    ("model.tar", "model", "application/x-tar"),
    ("report.json", "report", "application/json"),
)


def store_outputs(storage: Storage, job: Job, output_dir: Path, model_required: bool = True) -> list[Artifact]:
    """Place the engine's outputs in storage; returns the (not yet added) rows describing them. A search that
    chose no candidate writes no model.tar (`model_required=False`)."""
    artifacts: list[Artifact] = []
    try:
        for name, kind, media_type in OUTPUTS:
            source = output_dir / name
            if not source.is_file():
                if kind == "model" and not model_required:
                    continue
                raise FileNotFoundError(f"the engine did not write {name}")
            artifact_id = new_id()
            key = f"artifacts/{job.id}/{artifact_id}/{name}"
            size, digest = source.stat().st_size, sha256_file(source)
            storage.put_file(key, source)
            artifacts.append(
                Artifact(
                    id=artifact_id,
                    tenant=job.tenant,
                    job_id=job.id,
                    name=name,
                    kind=kind,
                    media_type=media_type,
                    size_bytes=size,
                    sha256=digest,
                    storage_key=key,
                )
            )
    except BaseException:
        remove(storage, artifacts)
        raise
    return artifacts


def remove(storage: Storage, artifacts: list[Artifact]) -> None:
    """Delete the stored files of artifacts whose rows will not be committed (each has a folder of its own)."""
    for artifact in artifacts:
        storage.delete(artifact.storage_key.rsplit("/", 1)[0])
