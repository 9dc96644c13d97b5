"""Read and write files on a local path or a URI (s3://, gs://, file://) through pyarrow.fs.

Every write is atomic: a reader sees the old file or the new one, never a part of either.
On a local disk (plain paths and file:// URIs) the bytes go to a temporary file in the same
folder, are flushed to disk and renamed over the target; a failed write (a full disk, a
kill) leaves the old file as it was and no temporary file behind. On object stores a file is
one object, which appears only when its upload completes.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import posixpath
import secrets
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

# What pyarrow.fs.FileSystem.from_uri understands (and Ray's storage with it).
URI_SCHEMES = ("file", "s3", "gs", "gcs", "hdfs", "viewfs")


class CorruptFileError(ValueError):
    """A file that exists but cannot be parsed; the message names it."""


def is_uri(path: str) -> bool:
    return "://" in path


def scheme_of(path: str) -> str:
    return path.split("://", 1)[0].lower() if is_uri(path) else ""


def resolve(path: str) -> tuple[pafs.FileSystem, str]:
    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


def local_path(path: str) -> str | None:
    """The path on this machine's file system of a local path or file:// URI, else None."""
    if not is_uri(path):
        return os.path.abspath(path)
    if scheme_of(path) == "file":
        return resolve(path)[1]
    return None


def join(base: str, *parts: str) -> str:
    if is_uri(base):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def makedirs(path: str) -> None:
    fs, p = resolve(path)
    fs.create_dir(p, recursive=True)


def exists(path: str) -> bool:
    fs, p = resolve(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def is_file(path: str) -> bool:
    fs, p = resolve(path)
    return fs.get_file_info(p).type == pafs.FileType.File


def write_bytes(path: str, data: bytes) -> None:
    """Atomically replace (or create) the file at path with data; OSError names the path."""
    local = local_path(path)
    try:
        if local is not None:
            _replace_local(local, data)
            return
        fs, p = resolve(path)
        fs.create_dir(posixpath.dirname(p), recursive=True)
        # One write of the whole buffer: the object store commits it on close.
        with fs.open_output_stream(p) as f:
            f.write(data)
    except OSError as exc:
        message = f"cannot write {path}: {exc.strerror or exc}"
        raise (OSError(exc.errno, message) if exc.errno else OSError(message)) from None


def _replace_local(target: str, data: bytes) -> None:
    folder = os.path.dirname(target)
    os.makedirs(folder, exist_ok=True)
    temporary = os.path.join(folder, f".{os.path.basename(target)}.{secrets.token_hex(4)}.tmp")
    # os.open with 0o666 honours the umask, as a plain open() would (mkstemp would give 0600)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def read_bytes(path: str) -> bytes:
    fs, p = resolve(path)
    with fs.open_input_stream(p) as f:
        return f.read()


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode())


def read_text(path: str) -> str:
    return read_bytes(path).decode()


def write_json(path: str, value: Any) -> None:
    write_text(path, json.dumps(value, indent=2, sort_keys=True, default=str))


def read_json(path: str) -> Any:
    """The parsed JSON file; CorruptFileError naming the file if it is empty or not JSON."""
    raw = read_bytes(path)
    try:
        return json.loads(raw.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        what = "empty" if not raw.strip() else f"not valid JSON ({exc})"
        raise CorruptFileError(f"{path} is {what}") from None


def parquet_bytes(table: pa.Table) -> bytes:
    """The table as a Parquet file in memory, for an atomic write_bytes."""
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def remove(path: str) -> None:
    """Delete a file; a missing file is not an error."""
    fs, p = resolve(path)
    with contextlib.suppress(FileNotFoundError):
        fs.delete_file(p)


def remove_tree(path: str) -> None:
    """Delete a folder and everything under it; a missing folder is not an error."""
    fs, p = resolve(path)
    with contextlib.suppress(FileNotFoundError):
        fs.delete_dir(p)


def move(source: str, destination: str) -> None:
    """Rename a file (atomic on a local disk; copy + delete on object stores)."""
    fs, src = resolve(source)
    _, dest = resolve(destination)
    fs.create_dir(posixpath.dirname(dest), recursive=True)
    fs.move(src, dest)


def list_dir(path: str) -> list[pafs.FileInfo]:
    """Entries directly under path (empty if it does not exist); FileInfo.base_name names
    each."""
    fs, p = resolve(path)
    return fs.get_file_info(pafs.FileSelector(p, allow_not_found=True))


def list_files(path: str) -> list[str]:
    """Every file under path, recursively, as paths relative to it with "/" separators; empty
    if path does not exist."""
    fs, root = resolve(path)
    selector = pafs.FileSelector(root, allow_not_found=True, recursive=True)
    return sorted(posixpath.relpath(info.path, root) for info in fs.get_file_info(selector)
                  if info.type == pafs.FileType.File)


def fingerprint(path: str | None, depth: int = 2) -> str:
    """A cheap digest of a data folder; no file is read. On this machine's disk (plain paths,
    file://): the name, kind, size and modification time of every entry up to `depth` levels
    down, since a folder's mtime changes when entries are added to or removed from it (an
    image added to root/train/CLASS/ changes CLASS's), so a folder of a million images costs a
    few listings. Object stores (s3://, gs://) have no folders, let alone their mtimes: there
    it is the name, size and modification time of every object under the root, one recursive
    listing (1,000 objects per request on S3)."""
    if not path:
        return ""
    fs, root = resolve(path)
    digest = hashlib.sha256()
    top = fs.get_file_info(root)
    if top.type == pafs.FileType.NotFound:
        return "missing"
    if top.type == pafs.FileType.File:
        digest.update(f"{top.size}:{top.mtime_ns}".encode())
    elif top.type == pafs.FileType.Directory and local_path(path) is None:
        selector = pafs.FileSelector(root, recursive=True)
        for info in sorted(fs.get_file_info(selector), key=lambda i: i.path):
            if info.type == pafs.FileType.File:
                relative = posixpath.relpath(info.path, root)
                digest.update(f"{relative}|{info.size}|{info.mtime_ns}\n".encode())
    elif top.type == pafs.FileType.Directory:
        todo = [(root, 0)]
        while todo:
            folder, level = todo.pop()
            for info in sorted(fs.get_file_info(pafs.FileSelector(folder)),
                               key=lambda i: i.path):
                relative = posixpath.relpath(info.path, root)
                digest.update(f"{relative}|{info.type}|{info.size}|{info.mtime_ns}\n".encode())
                if info.type == pafs.FileType.Directory and level + 1 < depth:
                    todo.append((info.path, level + 1))
    return digest.hexdigest()[:16]


def check_writable(path: str) -> None:
    """Create the folder and write+delete a probe file; raise OSError naming the path if not."""
    probe = join(path, ".ccpcsa-write-probe")
    try:
        makedirs(path)
        write_bytes(probe, b"ok")
        fs, p = resolve(probe)
        fs.delete_file(p)
    except (OSError, ValueError) as exc:
        raise OSError(f"cannot write to {path!r}: {exc}") from None


def buffer() -> io.BytesIO:
    return io.BytesIO()
