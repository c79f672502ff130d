"""Files on any filesystem: local paths and `s3://`-style URIs alike, so one machine or a cluster runs the
same code; whole-or-nothing writes, JSON and bytes. Everything that reads or writes a file beside the
shards, an export or a sweep's state goes through here."""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import tempfile
import uuid
from typing import Any, Iterator

import pyarrow.fs as pafs

from trm_ray.config import UserError


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path on it) of a local path or a URI."""
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), posixpath.abspath(path)


def check_writable(path: str, flag: str) -> None:
    """`path` exists (made now if missing) and a file can be written in it; remote storage is left to its writes."""
    if "://" in path:
        return
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise UserError(f"--{flag} {path} is not writable ({e.strerror or e}): choose another --{flag}") from None


def absolute(path: str) -> str:
    """Local paths made absolute (Ray workers run in other directories); URIs kept as they are."""
    return path if "://" in path else os.path.abspath(path)


@contextlib.contextmanager
def atomic_output(path: str) -> Iterator[tuple[pafs.FileSystem, str]]:
    """(filesystem, where to write) for a file that readers must see whole or not at all: the old file or
    the whole new one. On a local disk, a temporary name of its own beside `path`, renamed into place on
    success and removed on failure: two writers of one path (two sweeps computing the same spectrum) never
    share a temporary file. An object store's single PUT is already atomic, so there it is `path` itself."""
    fs, p = filesystem(path)
    fs.create_dir(posixpath.dirname(p), recursive=True)
    if not isinstance(fs, pafs.LocalFileSystem):
        yield fs, p
        return
    tmp = posixpath.join(posixpath.dirname(p), f".{posixpath.basename(p)}.{uuid.uuid4().hex}.tmp")
    try:
        yield fs, tmp
        os.replace(tmp, p)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_bytes(path: str, data: bytes) -> None:
    with atomic_output(path) as (fs, p), fs.open_output_stream(p) as f:
        f.write(data)


def read_bytes(path: str) -> bytes:
    fs, p = filesystem(path)
    with fs.open_input_stream(p) as f:
        return f.read()


def write_json(path: str, data: Any) -> None:
    write_bytes(path, json.dumps(data, indent=2).encode())


def exists(path: str) -> bool:
    fs, p = filesystem(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def read_json(path: str) -> dict[str, Any] | None:
    return json.loads(read_bytes(path)) if exists(path) else None
