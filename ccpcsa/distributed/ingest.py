"""Parquet -> Ray Data -> a training worker: decode where the CPUs are, uint8 on the wire.

A worker asks ParquetBatches for an epoch's batches (epoch, rank, world). Its rows come from
the epoch plan of ccpcsa.data.parquet (a seeded permutation of all row groups, cut into equal
per-worker ranges: reproducible, different every epoch, every worker the same number of steps).
Ray Data reads and decodes them in `map_batches` tasks (one CPU each, `decode_cpus`) scheduled
on whatever CPUs of the cluster the training workers leave free, not on the worker's own thread;
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

Ray is imported lazily: the rest of ccpcsa works without it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ccpcsa.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Piece,
    ShardIndex,
    Uint8Normalizer,
    calibration_pieces,
    decode_pieces,
    eval_pieces,
    steps_per_epoch,
    train_pieces,
)
from ccpcsa.distributed.capacity import StarvationWatch

DECODE_CPUS = 1.0  # CPUs per decode task: PIL decodes one image at a time


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
    # CUDA only: Ray Data pins each batch (a fresh pinned copy, in its collate thread) before
    # the copy to the device; False copies from pageable memory instead. Which one slows the
    # training step less is a benchmarks/gpu_datapath.py question (its `inproc` step).
    pin_memory: bool = True


class ParquetBatches:
    """A worker's uint8 batches of a Parquet data set, streamed through Ray Data."""

    def __init__(self, train: ShardIndex | None, val: ShardIndex | None, cfg: IngestConfig,
                 device: torch.device) -> None:
        self.train, self.val, self.cfg, self.device = train, val, cfg, device
        self.normalize = Uint8Normalizer(IMAGENET_MEAN, IMAGENET_STD, device)
        self.checksum = torch.zeros((), dtype=torch.int64, device=device)

    def steps_per_epoch(self, world: int) -> int:
        assert self.train is not None
        return steps_per_epoch(self.train, world, self.cfg.batch_size)

    def epoch(self, epoch: int, rank: int, world: int
              ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(uint8 N x S x S x 3, int64 labels) on the device: exactly steps_per_epoch(world)
        batches of batch_size. Afterwards `checksum` (a device tensor) holds the sum of the
        crc32 of the epoch's encoded images: an order-free fingerprint of what was seen."""
        assert self.train is not None
        pieces = train_pieces(self.train, self.cfg.seed, epoch, rank, world,
                              self.cfg.batch_size)
        shuffle_seed = int(np.random.SeedSequence(
            [self.cfg.seed % 2**63, epoch, rank]).generate_state(1)[0])
        self.checksum = torch.zeros((), dtype=torch.int64, device=self.device)
        for images, labels, checksums in self._stream(pieces, self.cfg.augment,
                                                      self.cfg.batch_size, shuffle_seed):
            self.checksum += checksums.sum()  # on the device: no host sync per step
            yield images, labels

    def evaluation(self, rank: int, world: int, batch_size: int | None = None
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This worker's even share of the val split (counts differ by at most one), uint8."""
        assert self.val is not None
        for images, labels, _ in self._stream(eval_pieces(self.val, rank, world), False,
                                              batch_size or self.cfg.batch_size, None):
            yield images, labels

    def calibration(self, rows: int, batch_size: int, rank: int = 0, world: int = 1
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """`rows` unaugmented training rows drawn at random across the whole split (the same
        every call), this worker's share, in batches of batch_size, uint8."""
        assert self.train is not None
        pieces = calibration_pieces(self.train, rows, self.cfg.seed, rank, world)
        for images, labels, _ in self._stream(pieces, False, batch_size, None):
            yield images, labels

    def _stream(self, pieces: list[Piece], train: bool, batch_size: int,
                shuffle_seed: int | None
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        if not pieces:
            return
        import ray.data

        logging.getLogger("ray.data").setLevel(logging.WARNING)  # 3 INFO lines per epoch
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the epoch log line says what happened
        context.execution_options.preserve_order = self.cfg.preserve_order
        context.op_resource_reservation_enabled = self.cfg.op_reservation
        ds = ray.data.from_items([dataclasses.asdict(p) for p in pieces],
                                 override_num_blocks=len(pieces))
        mix = shuffle_seed is not None and self.cfg.mix_pieces > 1
        ds = ds.map_batches(decode_pieces, fn_kwargs={"image_size": self.cfg.image_size,
                                                      "train": train, "mix": mix},
                            batch_size=self.cfg.mix_pieces if mix else 1, batch_format="numpy",
                            num_cpus=self.cfg.decode_cpus)
        options: dict = {"batch_size": batch_size, "prefetch_batches": self.cfg.prefetch_batches,
                         "device": self.device,
                         "pin_memory": self.cfg.pin_memory and self.device.type == "cuda"}
        if shuffle_seed is not None and self.cfg.shuffle_buffer != 0:
            options["local_shuffle_buffer_size"] = max(self.cfg.shuffle_buffer, batch_size)
            options["local_shuffle_seed"] = shuffle_seed
        with StarvationWatch(f"a stream of {len(pieces)} row groups",
                             self.cfg.decode_cpus) as watch:
            for batch in ds.iter_torch_batches(**options):
                watch.seen()
                yield batch["image"], batch["label"], batch["checksum"]
