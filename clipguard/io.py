"""Small file helpers: atomic writes, hashing and safe safetensors reading.

Every file clipguard writes goes through :func:`atomic_write_bytes`: the bytes are written to
a temporary file in the destination folder, flushed to disk, then renamed over the
destination, so an interrupted run never leaves a half-written file behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from clipguard.errors import InputError

if TYPE_CHECKING:  # torch is imported where tensors are read or written, not with this module
    import torch

#: a safetensors header larger than this is refused before it is parsed
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024
#: tensor dtypes clipguard reads from safetensors files (real numbers only: no float8, complex
#: or bool, which the checks downstream cannot all handle)
SAFETENSORS_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8"})


def _default_file_mode() -> int:
    """``0o666`` less the process umask: the mode ``open()`` would give a new file."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, then rename).

    The file gets the mode a plain ``open()`` would give it (not ``mkstemp``'s private 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temporary, _default_file_mode())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, payload: object) -> None:
    """Write ``payload`` as indented JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=False) + "\n")


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_files(paths: Iterable[Path], root: Path | None = None) -> str:
    """One hex sha256 over several files: each file's name and content hash, in order.

    With ``root`` the names are taken relative to it (POSIX form), so the hash does not depend
    on where the folder lives.
    """
    digest = hashlib.sha256()
    for path in paths:
        name = Path(path).relative_to(root).as_posix() if root is not None else str(path)
        digest.update(name.encode("utf-8", "surrogateescape"))
        digest.update(b"\0")
        digest.update(sha256_file(path).encode("ascii"))
    return digest.hexdigest()


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """Serialise ``tensors`` with string ``metadata`` in the safetensors format, canonically.

    The safetensors library writes its JSON header in hash-map order, so equal inputs could give
    different bytes; the header is rewritten with sorted keys (and padded to 8 bytes, as the
    format asks), so equal inputs give byte-identical files.
    """
    from safetensors.torch import save as safetensors_save

    raw = safetensors_save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + length])
    canonical = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    canonical += b" " * (-len(canonical) % 8)
    return len(canonical).to_bytes(8, "little") + canonical + raw[8 + length :]


def read_safetensors_header(data: bytes, what: str, path: Path) -> dict:
    """Parse and check the JSON header of safetensors ``data``; :class:`InputError` if malformed."""
    if len(data) < 8:
        raise InputError(f"{path}: {what} is truncated (only {len(data)} bytes)")
    header_length = int.from_bytes(data[:8], "little")
    if header_length > MAX_SAFETENSORS_HEADER:
        raise InputError(f"{path}: {what} has a header of {header_length} bytes, too large")
    if 8 + header_length > len(data):
        raise InputError(f"{path}: {what} is truncated (header runs past the end of the file)")
    try:
        header = json.loads(data[8 : 8 + header_length].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise InputError(f"{path}: {what} has a corrupt safetensors header") from None
    if not isinstance(header, dict):
        raise InputError(f"{path}: {what} has a corrupt safetensors header")
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise InputError(f"{path}: {what} has a corrupt safetensors header")
        dtype = entry.get("dtype")
        if dtype not in SAFETENSORS_DTYPES:
            raise InputError(
                f"{path}: {what}: tensor {name[:80]!r} has unsupported dtype {str(dtype)[:20]}"
            )
    return header


def read_safetensors_file(path: Path, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file into CPU tensors and its metadata.

    Raises :class:`InputError` with a one-line reason for a missing, truncated or corrupt file.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: {what} not found")
    if path.is_dir():
        raise InputError(f"{path}: {what} is a directory, expected a file")
    if not path.is_file():
        raise InputError(f"{path}: {what} is not a regular file")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise InputError(f"{path}: cannot read {what} ({error.strerror or error})") from None
    return read_safetensors_bytes(data, what, path)


def read_safetensors_bytes(
    data: bytes, what: str, path: Path
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Parse safetensors ``data`` (read from ``path``) into CPU tensors and string metadata.

    The header is checked before the safetensors library sees the bytes; the library then
    checks offsets (overlaps, out-of-range, gaps) and dtypes. Any failure is an
    :class:`InputError` with a one-line reason.
    """
    if not data:
        raise InputError(f"{path}: {what} is empty")
    header = read_safetensors_header(data, what, path)
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise InputError(f"{path}: {what} has malformed metadata")
    from safetensors.torch import load as safetensors_load

    try:
        tensors = safetensors_load(data)
    except Exception as error:  # SafetensorError and friends: the file is corrupt
        reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        raise InputError(f"{path}: {what} is corrupt ({reason})") from None
    return tensors, metadata
