"""ImageFolder split -> Parquet shards (`python -m ccpcsa.data to-parquet`), in parallel,
resumable per shard, and splittable across machines.

The export is a plan fixed by (source, seed, rows per shard, rows per group): the seeded row
order across classes and so the rows of every shard. The plan is written first, to
DST/_export.json; every shard is then an independent job (a process of `workers` reads its
image files and writes part-NNNNN.parquet). So an export stopped half-way runs again with the
same command and writes only the shards that are missing or unreadable, and `part=(I, N)`
lets N machines share one export: each writes the shards whose number is I modulo N, all
computing the same plan from the same source listing. A folder whose shards came from a
different plan (or from an export without a plan file) is refused rather than mixed.

Local shards are written under a temporary name and renamed, so a killed export leaves no
half shard under a shard's name; object stores publish an upload only once it completes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ccpcsa.data.common import DataError
from ccpcsa.data.imagefolder import scan_imagefolder
from ccpcsa.data.parquet import (
    CLASSES_FILE,
    CLASSES_META_KEY,
    DEFAULT_ROWS_PER_GROUP,
    DEFAULT_ROWS_PER_SHARD,
    ROW_ORDER_META_KEY,
    SHARD_PATTERN,
    _join,
    _nonnegative,
    _resolve_dst,
)

PLAN_FILE = "_export.json"


@dataclass(frozen=True)
class ExportPlan:
    """What fixes every shard's rows; equal plans write equal shards."""

    source: str  # the ImageFolder split, as an absolute path
    seed: int
    rows_per_shard: int
    rows_per_group: int
    rows: int
    classes: tuple[str, ...]

    @property
    def shards(self) -> int:
        return -(-self.rows // self.rows_per_shard)

    def shard_rows(self, shard: int) -> int:
        return min(self.rows_per_shard, self.rows - shard * self.rows_per_shard)


@dataclass(frozen=True)
class ShardJob:
    dst: str
    name: str
    files: tuple[str, ...]
    labels: tuple[int, ...]
    classes: tuple[str, ...]
    seed: int
    rows_per_group: int


def parse_part(text: str) -> tuple[int, int]:
    """"I/N" -> (I, N) with 0 <= I < N; DataError naming the text otherwise."""
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError:
        raise DataError(f"--part must be I/N (this machine's number I of N, from 0), got "
                        f"{text!r}") from None
    if not 0 <= index < count:
        raise DataError(f"--part {text}: I must be in 0..N-1")
    return index, count


def iter_shards(
    src: str, dst: str, rows_per_shard: int = DEFAULT_ROWS_PER_SHARD, split: str | None = None,
    seed: int = 0, rows_per_group: int = DEFAULT_ROWS_PER_GROUP, workers: int = 1,
    part: tuple[int, int] = (0, 1),
) -> Iterator[tuple[str, int, list[str], bool]]:
    """Writes this part's shards (`workers` processes), yielding (shard path, rows, classes,
    written) as each is done; written is False for a shard a previous run already wrote."""
    _check_count("rows_per_shard", rows_per_shard)
    _check_count("rows_per_group", rows_per_group)
    _check_count("workers", workers)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise DataError(f"seed must be an int; got {seed!r}")
    folder = os.path.abspath(os.path.join(src, split) if split else src)
    classes, samples = scan_imagefolder(folder)
    order = np.random.default_rng(_nonnegative(seed)).permutation(len(samples))
    samples = [samples[i] for i in order]
    plan = ExportPlan(folder, seed, rows_per_shard, rows_per_group, len(samples),
                      tuple(classes))
    fs, base = _resolve_dst(dst)
    _start(fs, base, dst, plan)
    jobs, done = [], []
    for shard in range(part[0], plan.shards, part[1]):
        name = SHARD_PATTERN.format(shard)
        if _is_whole(fs, _join(base, name), plan.shard_rows(shard)):
            done.append((_join(dst, name), plan.shard_rows(shard), classes, False))
            continue
        chunk = samples[shard * rows_per_shard:(shard + 1) * rows_per_shard]
        jobs.append(ShardJob(dst, name, tuple(p for p, _ in chunk), tuple(y for _, y in chunk),
                             plan.classes, seed, rows_per_group))
    yield from done
    if workers == 1 or len(jobs) < 2:
        for job in jobs:
            yield _join(dst, job.name), write_shard(job), classes, True
        return
    with ProcessPoolExecutor(min(workers, len(jobs))) as pool:
        futures = {pool.submit(write_shard, job): job for job in jobs}
        for future in as_completed(futures):
            yield _join(dst, futures[future].name), future.result(), classes, True


def imagefolder_to_parquet(
    src: str, dst: str, rows_per_shard: int = DEFAULT_ROWS_PER_SHARD, split: str | None = None,
    seed: int = 0, rows_per_group: int = DEFAULT_ROWS_PER_GROUP, workers: int = 1,
) -> list[str]:
    """ImageFolder split -> Parquet shards (image: encoded bytes, label: int64) under dst, rows
    in a random order across classes drawn from `seed`, row groups of `rows_per_group` rows.

    Class names go to the schema metadata key b"classes" and to dst/_classes.json (JSON lists);
    the row order to b"row_order". Returned paths, in shard order, use dst's form (local path
    or URI).
    """
    return sorted(path for path, _, _, _ in iter_shards(
        src, dst, rows_per_shard, split, seed, rows_per_group, workers))


def write_shard(job: ShardJob) -> int:
    """Reads the job's image files and writes its shard; returns its rows."""
    fs, base = _resolve_dst(job.dst)
    table = pa.table({"image": pa.array([_read_bytes(p) for p in job.files], pa.binary()),
                      "label": pa.array(job.labels, pa.int64())},
                     schema=_shard_schema(list(job.classes), job.seed))
    final = _join(base, job.name)
    local = isinstance(fs, pafs.LocalFileSystem)
    target = _join(base, f".{job.name}.{os.getpid()}.tmp") if local else final
    pq.write_table(table, target, filesystem=fs, row_group_size=job.rows_per_group)
    if local:
        fs.move(target, final)
    return table.num_rows


def _start(fs: pafs.FileSystem, base: str, dst: str, plan: ExportPlan) -> None:
    """Writes the plan and the class list, or checks that the folder holds this plan's."""
    info = fs.get_file_info(base)
    if info.type == pafs.FileType.File:
        raise DataError(f"{dst}: is a file; expected a folder (new, or one this export began)")
    wanted = {**asdict(plan), "classes": list(plan.classes)}
    if info.type == pafs.FileType.Directory:
        names = {e.base_name for e in fs.get_file_info(pafs.FileSelector(base))}
        if PLAN_FILE in names:
            found = _read_json(fs, _join(base, PLAN_FILE), dst)
            if found != wanted:
                changed = sorted(k for k in wanted if found.get(k) != wanted[k]) or ["format"]
                raise DataError(f"{dst}: already holds an export with another "
                                f"{', '.join(changed)}; expected a folder without shards or "
                                "one begun by this same command")
            return
        stale = sorted(n for n in names if n.endswith(".parquet") or n == CLASSES_FILE)
        if stale:  # refuse rather than mix or silently delete an earlier export's shards
            raise DataError(f"{dst}: already holds {stale[0]}; expected a folder without "
                            "shards")
    fs.create_dir(base, recursive=True)
    with fs.open_output_stream(_join(base, PLAN_FILE)) as out:  # first: other parts check it
        out.write(json.dumps(wanted, indent=1).encode())
    with fs.open_output_stream(_join(base, CLASSES_FILE)) as out:
        out.write(json.dumps(list(plan.classes)).encode())


def _is_whole(fs: pafs.FileSystem, path: str, rows: int) -> bool:
    """A shard already written in full by an earlier run: its footer reads and counts `rows`."""
    if fs.get_file_info(path).type != pafs.FileType.File:
        return False
    try:
        with fs.open_input_file(path) as f:
            return pq.ParquetFile(f).metadata.num_rows == rows
    except (OSError, pa.ArrowInvalid):
        return False


def _read_json(fs: pafs.FileSystem, path: str, dst: str) -> dict:
    try:
        with fs.open_input_stream(path) as f:
            return dict(json.loads(f.read()))
    except (OSError, ValueError, TypeError) as exc:
        raise DataError(f"{dst}/{PLAN_FILE}: unreadable ({exc}); delete the folder and export "
                        "again") from None


def _shard_schema(classes: list[str], seed: int) -> pa.Schema:
    fields = [pa.field("image", pa.binary()), pa.field("label", pa.int64())]
    return pa.schema(fields, metadata={
        CLASSES_META_KEY: json.dumps(classes).encode(),
        ROW_ORDER_META_KEY: json.dumps({"shuffled": True, "seed": seed}).encode()})


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DataError(f"{name} must be an int >= 1; got {value!r}")
