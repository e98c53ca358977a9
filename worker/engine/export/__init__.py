"""Export: the optimized model as a compressed-tensors checkpoint (or plain safetensors), its manifest and
the tar the user downloads."""

from worker.engine.export.archive import folder_files, sha256_file, tar_folder, write_manifest
from worker.engine.export.compressed import (
    require_compressed_tensors,
    save_compressed_,
    storage_format,
    stored_weight_bytes,
)
from worker.engine.export.sharded import MAX_SHARD_BYTES, write_layerwise_

__all__ = [
    "MAX_SHARD_BYTES",
    "folder_files",
    "require_compressed_tensors",
    "save_compressed_",
    "sha256_file",
    "storage_format",
    "stored_weight_bytes",
    "tar_folder",
    "write_layerwise_",
    "write_manifest",
]
