"""Read and write files on a local path or a URI (s3://, gs://, file://) through pyarrow.fs."""

from __future__ import annotations

import io
import posixpath

import pyarrow.fs as pafs


def is_uri(path: str) -> bool:
    return "://" in path


def resolve(path: str) -> tuple[pafs.FileSystem, str]:
    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    import os

    return pafs.LocalFileSystem(), os.path.abspath(path)


def join(base: str, *parts: str) -> str:
    if is_uri(base):
        return posixpath.join(base, *parts)
    import os

    return os.path.join(base, *parts)


def makedirs(path: str) -> None:
    fs, p = resolve(path)
    fs.create_dir(p, recursive=True)


def exists(path: str) -> bool:
    fs, p = resolve(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def write_bytes(path: str, data: bytes) -> None:
    fs, p = resolve(path)
    fs.create_dir(posixpath.dirname(p), recursive=True)
    with fs.open_output_stream(p) as f:
        f.write(data)


def read_bytes(path: str) -> bytes:
    fs, p = resolve(path)
    with fs.open_input_stream(p) as f:
        return f.read()


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode())


def read_text(path: str) -> str:
    return read_bytes(path).decode()


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
