"""Parquet -> Ray Data -> a training worker: decode where the CPUs are, uint8 on the wire.

A worker asks ParquetBatches for an epoch's batches (epoch, rank, world). Its rows come from
the epoch plan of ccpcsa.data.parquet (a seeded permutation of all row groups, cut into equal
per-worker ranges: reproducible, different every epoch, every worker the same number of steps).
Ray Data reads and decodes them in `map_batches` tasks (one CPU each, `decode_cpus`) scheduled
on the CPUs the training workers leave free, not on the worker's own thread: on the worker's
node while it has a CPU free, on any node otherwise (see *Where decode tasks run* below);
the tasks send N x S x S x 3 uint8 pixels (a quarter of float32's bytes) and the worker
normalises them on its device (ccpcsa.data.Uint8Normalizer). For training, each decode task
takes `mix_pieces` pieces (row groups) and shuffles their rows together, in an order the
pieces' seeds fix; `iter_torch_batches` then only slices batches, prefetches, pins host memory
on CUDA and moves them to the device. The shuffle is done there, on the decode CPUs, rather
than in Ray Data's local shuffle buffer (still available: `shuffle_buffer`), because the
consumer shares its process, and its GIL, with the training loop: on the GPU machine the full
path reached half of a plain loop's speed while the input path alone reached 0.9 of it
(docs/benchmarks.md). `preserve_order` keeps the stream in plan order, so the same seed gives
the same batches.

The datasets are built inside each worker, one per epoch, rather than passed to the
TorchTrainer: Train's `streaming_split` hands blocks to whichever worker asks first, which is not
reproducible, and a worker loop that also scores channels between epochs (or runs a whole
trial) can ask for any epoch's batches here without a new TorchTrainer.

Where decode tasks run: each task asks for the worker's node by its default label
(`label_selector={"ray.io/node-id": <the worker's node>}`) with an empty label selector as its
`fallback_strategy`. Ray runs it there while that node has `decode_cpus` free and spills it to
any node when the node is busy, too small or gone, so a stream never waits for a busy node while
another has CPUs (and the pixels skip the network whenever they can). What Ray 2.60 offers
otherwise, and why not:
- the worker group's placement group (`ray.util.get_current_placement_group()` in a worker):
  Train builds it from the worker bundles alone and each worker actor holds all of its bundle,
  so a decode task placed there would wait forever; there is no public way to add a bundle;
- a placement group of our own for the decode CPUs (or a decode bundle in the trial's plan):
  guaranteed and local, but it caps decoding at the reserved CPUs, where the tasks would
  otherwise use every CPU the workers leave free;
- `NodeAffinitySchedulingStrategy(soft=True)`: waits while the node is busy (spilling is the
  private `_spill_on_unavailable`); the "DEFAULT" strategy: Ray's hybrid policy keeps CPU-only
  tasks off GPU nodes (on a two-node test cluster it sent every task away from the node that
  declared a GPU);
  `DataContext.scheduling_strategy` is deprecated and `locality_with_output` gone.
What stays with Ray: which node a spilled task lands on (Ray Data's "SPREAD"), and that a
trial's decode CPUs are checked in its plan (capacity.py), not reserved.

Ray is imported lazily: the rest of ccpcsa works without it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ccpcsa.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Piece,
    ShardIndex,
    Uint8Normalizer,
    calibration_pieces,
    decode_task,
    eval_pieces,
    steps_per_epoch,
    train_pieces,
)
from ccpcsa.data.jpegdecode import check_decode, decode_on_device
from ccpcsa.distributed.capacity import StarvationWatch
from ccpcsa.distributed.hostcopy import DEFAULT_HOST_COPY, HostCopy, check_host_copy

DECODE_CPUS = 1.0  # CPUs per decode task: PIL decodes one image at a time
NODE_LABEL = "ray.io/node-id"  # the label Ray gives every node: its id


def near_this_node() -> dict[str, Any]:
    """Ray task options: on this process's node while it has the task's resources free, on
    any node otherwise (busy, too small or gone). Needs a connected Ray."""
    import ray

    return {"label_selector": {NODE_LABEL: ray.get_runtime_context().get_node_id()},
            "fallback_strategy": [{"label_selector": {}}]}


@dataclass(frozen=True)
class IngestConfig:
    image_size: int
    batch_size: int  # per worker
    seed: int = 0
    augment: bool = True
    decode_cpus: float = DECODE_CPUS
    prefetch_batches: int = 2
    # Training rows are shuffled across this many pieces (row groups) inside each decode
    # task; the consumer, which shares its process with the training loop, then only slices.
    mix_pieces: int = 4
    shuffle_buffer: int = 0  # rows of Ray Data's local shuffle buffer in the consumer; 0: none
    # True: decoded pieces reach the consumer in plan order, so a seed fixes every batch;
    # False: in the order the decode tasks finish (the same rows per epoch, batches not
    # reproducible), which lets Ray Data run ahead of a slow task.
    preserve_order: bool = True
    # Ray Data's per-operator resource reservation (its default: on) held the decode tasks to
    # a fraction of the free CPUs in benchmarks/ingest_scaling.py; with one map operator
    # there is nothing to reserve against, so it is off unless asked for.
    op_reservation: bool = False
    # How batches reach the device (ccpcsa.distributed.hostcopy): "ring" (reused pinned
    # buffers, non_blocking copies on a side stream), "ray_pin" (Ray Data pins every batch
    # afresh) or "pageable"; without CUDA all three are a plain copy.
    host_copy: str = DEFAULT_HOST_COPY
    # "cpu": decode tasks ship N x S x S x 3 uint8 pixels; "gpu": they ship the JPEG bytes and
    # the crop draws, and the worker decodes the batch on its device (ccpcsa.data.jpegdecode).
    decode: str = "cpu"
    # True: decode tasks prefer the consumer's node and spill elsewhere when it is busy
    # (near_this_node); False: Ray Data spreads them over the cluster.
    near_consumer: bool = True

    def __post_init__(self) -> None:
        check_host_copy(self.host_copy)
        check_decode(self.decode)
        if self.prefetch_batches < 0:
            raise ValueError(f"prefetch_batches must be >= 0; got {self.prefetch_batches}")


@dataclass(frozen=True)
class Segment:
    """A run of rows in a stream: an epoch's share, an evaluation or a calibration draw."""

    pieces: list[Piece]
    train: bool  # augment (and, with mix, shuffle rows across pieces in the decode tasks)
    mix: bool = False

    @property
    def rows(self) -> int:
        return sum(p.rows for p in self.pieces)


class ParquetBatches:
    """A worker's uint8 batches of a Parquet data set, streamed through Ray Data."""

    def __init__(self, train: ShardIndex | None, val: ShardIndex | None, cfg: IngestConfig,
                 device: torch.device) -> None:
        self.train, self.val, self.cfg, self.device = train, val, cfg, device
        self.normalize = Uint8Normalizer(IMAGENET_MEAN, IMAGENET_STD, device)
        self.checksum = torch.zeros((), dtype=torch.int64, device=device)
        self.copy = HostCopy(cfg.host_copy, device)
        self.streams_started = 0  # Ray Data streams this object has started (each pays start-up)

    def steps_per_epoch(self, world: int) -> int:
        assert self.train is not None
        return steps_per_epoch(self.train, world, self.cfg.batch_size)

    def epoch(self, epoch: int, rank: int, world: int
              ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(uint8 N x S x S x 3, int64 labels) on the device: exactly steps_per_epoch(world)
        batches of batch_size. Afterwards `checksum` (a device tensor) holds the sum of the
        crc32 of the epoch's encoded images: an order-free fingerprint of what was seen."""
        yield from self.fit(range(epoch, epoch + 1), rank, world).epoch(epoch)

    def fit(self, epochs: range, rank: int, world: int, evaluate: bool = False) -> FitStream:
        """One Ray Data stream for all of `epochs` (and, with `evaluate`, this worker's share
        of the val split after them): one start-up instead of one per epoch, and the decode
        tasks run ahead across epoch boundaries. Its epochs must be taken in order."""
        assert self.train is not None
        segments = [self._epoch_segment(e, rank, world) for e in epochs]
        if evaluate:
            assert self.val is not None
            segments.append(Segment(eval_pieces(self.val, rank, world), False))
        shuffle_seed = None
        if len(epochs) == 1 and not evaluate:  # Ray Data's local shuffle: one epoch per stream
            shuffle_seed = self._shuffle_seed(epochs[0], rank)
        return FitStream(self, list(epochs), self._stream(segments, self.cfg.batch_size,
                                                          shuffle_seed), segments)

    def evaluation(self, rank: int, world: int, batch_size: int | None = None
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This worker's even share of the val split (counts differ by at most one), uint8."""
        assert self.val is not None
        segment = Segment(eval_pieces(self.val, rank, world), False)
        for images, labels, _ in self._stream([segment], batch_size or self.cfg.batch_size):
            yield images, labels

    def calibration(self, rows: int, batch_size: int, rank: int = 0, world: int = 1
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """`rows` unaugmented training rows drawn at random across the whole split (the same
        every call), this worker's share, in batches of batch_size, uint8."""
        assert self.train is not None
        segment = Segment(calibration_pieces(self.train, rows, self.cfg.seed, rank, world),
                          False)
        for images, labels, _ in self._stream([segment], batch_size):
            yield images, labels

    def _epoch_segment(self, epoch: int, rank: int, world: int) -> Segment:
        assert self.train is not None
        pieces = train_pieces(self.train, self.cfg.seed, epoch, rank, world,
                              self.cfg.batch_size)
        return Segment(pieces, self.cfg.augment, self.cfg.mix_pieces > 1)

    def _shuffle_seed(self, epoch: int, rank: int) -> int | None:
        if self.cfg.shuffle_buffer == 0:
            return None
        return int(np.random.SeedSequence([self.cfg.seed % 2**63, epoch, rank])
                   .generate_state(1)[0])

    def _stream(self, segments: list[Segment], batch_size: int,
                shuffle_seed: int | None = None
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(uint8 images, labels, crc32 checksums) on the device, in batches of batch_size,
        segment after segment; every segment but the last holds whole batches, so no batch
        straddles two (the consumer counts rows: reading a column would sync the device)."""
        for k, seg in enumerate(segments[:-1]):
            if seg.rows % batch_size:
                raise ValueError(f"segment {k} of a stream has {seg.rows} rows, not a multiple "
                                 f"of the batch ({batch_size})")
        tasks = []
        for seg in segments:
            step = self.cfg.mix_pieces if seg.mix else 1
            for i in range(0, len(seg.pieces), step):
                tasks.append({"pieces": json.dumps([dataclasses.asdict(p)
                                                    for p in seg.pieces[i:i + step]]),
                              "train": seg.train, "mix": seg.mix})
        if not tasks:
            return
        import ray.data

        logging.getLogger("ray.data").setLevel(logging.WARNING)  # 3 INFO lines per stream
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the epoch log line says what happened
        context.execution_options.preserve_order = self.cfg.preserve_order
        context.op_resource_reservation_enabled = self.cfg.op_reservation
        ds = ray.data.from_items(tasks, override_num_blocks=len(tasks))
        placement = near_this_node() if self.cfg.near_consumer else {}
        ds = ds.map_batches(decode_task, fn_kwargs={"image_size": self.cfg.image_size,
                                                    "decode": self.cfg.decode},
                            batch_size=1, batch_format="numpy", num_cpus=self.cfg.decode_cpus,
                            **placement)
        options: dict = {"batch_size": batch_size, "prefetch_batches": self.cfg.prefetch_batches}
        if shuffle_seed is not None:
            options["local_shuffle_buffer_size"] = max(self.cfg.shuffle_buffer, batch_size)
            options["local_shuffle_seed"] = shuffle_seed
        self.streams_started += 1
        with StarvationWatch(f"a stream of {len(tasks)} decode tasks",
                             self.cfg.decode_cpus) as watch:
            if self.cfg.decode == "gpu":  # variable-length bytes: numpy batches, decoded here
                batches = ahead(self._decoded(ds.iter_batches(batch_format="numpy", **options)),
                                self.device, max(self.cfg.prefetch_batches, 1))
                for batch in batches:
                    watch.seen()
                    yield batch
                return
            for batch in ds.iter_torch_batches(**options, **self.copy.ray_options()):
                watch.seen()
                if self.copy.ring is not None:
                    batch = self.copy({k: batch[k] for k in ("image", "label", "checksum")})
                yield batch["image"], batch["label"], batch["checksum"]


    def _decoded(self, batches) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for batch in batches:
            moved = self.copy({k: torch.from_numpy(np.ascontiguousarray(batch[k]))
                               for k in ("label", "checksum")})
            images = decode_on_device(batch["jpeg"], batch["crop"], self.cfg.image_size,
                                      self.device)
            yield images, moved["label"], moved["checksum"]


_END = object()


def ahead(batches: Iterator[tuple], device: torch.device, depth: int) -> Iterator[tuple]:
    """Runs `batches` (which launch device work: the GPU decode) in a thread, up to `depth`
    batches ahead of the training loop, on a side CUDA stream; the training stream waits on
    each batch's event, so decoding the next batch overlaps the step instead of preceding it."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    side = torch.cuda.Stream(device) if device.type == "cuda" else None

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
                for item in batches:
                    event = None
                    if side is not None:
                        event = torch.cuda.Event()
                        event.record(side)
                    if not put((item, event)):
                        return
            put(_END)
        except BaseException as exc:  # noqa: BLE001 - raised again in the consumer
            put(exc)

    thread = threading.Thread(target=produce, name="ccpcsa-gpu-decode", daemon=True)
    thread.start()
    main = torch.cuda.current_stream(device) if side is not None else None
    try:
        while True:
            got = q.get()
            if got is _END:
                return
            if isinstance(got, BaseException):
                raise got
            item, event = got
            if main is not None:
                main.wait_event(event)
                for t in item:
                    t.record_stream(main)  # made on the side stream, used on this one
            yield item
    finally:
        stop.set()


class FitStream:
    """The batches of one fit's stream, segment by segment: epoch(e) for each of its epochs in
    order, then evaluation() when the stream was made with one."""

    def __init__(self, source: ParquetBatches, epochs: list[int], batches: Iterator,
                 segments: list[Segment]) -> None:
        self.source, self.epochs, self.segments = source, epochs, segments
        self._batches = batches
        self._next = 0

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        k = self.epochs.index(epoch)
        self.source.checksum = torch.zeros((), dtype=torch.int64, device=self.source.device)
        for images, labels, checksums in self._segment(k):
            self.source.checksum += checksums.sum()  # on the device: no host sync per step
            yield images, labels

    def evaluation(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels, _ in self._segment(len(self.epochs)):
            yield images, labels

    def close(self) -> None:
        close = getattr(self._batches, "close", None)
        if close is not None:
            close()

    def _segment(self, k: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        if k != self._next:
            raise RuntimeError(f"segment {k} of the stream asked for before segment "
                               f"{self._next}: a fit's epochs are taken in order")
        self._next += 1
        remaining = self.segments[k].rows
        while remaining > 0:
            images, labels, checksums = next(self._batches)
            remaining -= len(labels)
            yield images, labels, checksums
