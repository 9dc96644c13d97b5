"""Every setting of `ccpcsa prune` and of the search, declared once.

A setting is a dataclass field made by `setting()`: its name, type (the annotation), default,
help, flag group and check. The prune command line, the search's command line and their YAML
`--config` files are generated from these fields (ccpcsa.command), and every value, whatever
it came from (a flag, a YAML file, the configuration saved with a run), goes through the same
`from_dict` and `validate`. Settings both tools have live in `TrainingSettings`, so a flag
means the same everywhere and is turned into the loop's settings (DataConfig, TrainConfig,
PrepareConfig, LoopConfig) in one place.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import yaml

from ccpcsa import validation
from ccpcsa.data import DATASETS, NEEDS_ROOT, DataConfig, DatasetInfo
from ccpcsa.data.common import MIN_IMAGE_SIZE
from ccpcsa.data.jpegdecode import DECODES
from ccpcsa.distributed.hostcopy import HOST_COPIES
from ccpcsa.importance import DEFAULT_IMPORTANCE, IMPORTANCES
from ccpcsa.latency import BATCH
from ccpcsa.loop import REFERENCES, LoopConfig, PrepareConfig
from ccpcsa.models import MODELS, ModelError, check_model_name
from ccpcsa.prune import ALLOCATIONS, PruneLimits
from ccpcsa.train import TrainConfig

SettingError = validation.SettingError
Check = Callable[[str, Any], Any]


@dataclass(frozen=True)
class Meta:
    """What the command lines need of a setting beyond its name, type and default."""

    help: str
    group: str
    check: Check | None = None
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    default_text: str | None = None  # the help's "(default ...)" when the default is computed
    short: str | None = None


def setting(default: Any, help: str, group: str, **meta: Any) -> Any:
    """A dataclass field that is a setting (see Meta for the keywords)."""
    info = {"setting": Meta(help, group, **meta)}
    if isinstance(default, list):
        return field(default_factory=functools.partial(list, default), metadata=info)
    return field(default=default, metadata=info)


# checks: (name, value) -> raises SettingError naming both
def whole(low: int | None = None) -> Check:
    return lambda name, value: validation.whole(name, value, low)


def number(**bounds: float) -> Check:
    return lambda name, value: validation.number(name, value, **bounds)


def choice(options: tuple[str, ...]) -> Check:
    return lambda name, value: validation.choice(name, value, options)


def optional(check: Check) -> Check:
    return lambda name, value: None if value is None else check(name, value)


def _model(name: str, value: Any) -> None:
    validation.text(name, value)
    try:
        check_model_name(value)
    except ModelError as exc:
        raise SettingError(str(exc)) from None


MODEL, DATA, LOOP, STAGE0, RESOURCES, FINAL, RESULTS = (
    "model and data", "each round (steps 3-11 of Algorithm 1)",
    "the pruning loop", "stage 0: training before pruning (steps 1-2)", "resources",
    "final fine-tune", "results")


@dataclass
class TrainingSettings:
    """The settings `ccpcsa prune` and the search share: the model, its data, stage 0, the
    pruning loop, the final fine-tune and the training resources."""

    model: str = setting(
        "resnet20", f"architecture to prune: {', '.join(MODELS)}; any torchvision "
        "classification CNN as torchvision:NAME (e.g. torchvision:resnet34, "
        "torchvision:regnet_y_800mf); or your own as MODULE:CALLABLE, a function (num_classes) "
        "-> nn.Module importable on every node. BAM placement and stages of models outside the "
        "registry are traced from the input size", MODEL, check=_model)
    weights: str | None = setting(
        None, "start from trained weights instead of training step 1: a file or URI (a "
        "state_dict, a training checkpoint with a 'state_dict' or 'model' key, or a ccpcsa "
        "checkpoint without BAM) or a torchvision weights name such as "
        "ResNet50_Weights.IMAGENET1K_V2 from the local torch hub cache ($TORCH_HOME; never "
        "downloaded). Evaluated once: its accuracy is the reference; the classifier must have "
        "the data set's number of classes", MODEL, check=optional(validation.location))
    dataset: str = setting(
        "digits", "digits = the embedded scikit-learn digits, no download; fashion-mnist = the "
        "four idx .gz files (apt-get install dataset-fashion-mnist); cifar10, cifar100 "
        "(torchvision layout); imagefolder (ImageNet-style train/ and val/); parquet (shards "
        "of `ccpcsa to-parquet`, streamed by Ray Data)", MODEL, choices=DATASETS,
        check=choice(DATASETS))
    data_root: str | None = setting(
        None, "dataset folder or URI (cifar, imagefolder, parquet; fashion-mnist: default "
        "/usr/share/datasets/fashion-mnist)", MODEL, check=optional(validation.location))
    image_size: int | None = setting(
        None, "input side in pixels", MODEL, check=optional(whole(MIN_IMAGE_SIZE)),
        default_text="the dataset's: digits 16, fashion-mnist 28, cifar 32, imagefolder 224")
    train_subset: int = setting(
        0, "train, score channels and re-estimate BatchNorm on a fixed random N images of the "
        "training split (the test split stays whole; not for parquet); 0 = all", MODEL,
        metavar="N", check=whole(0))
    decode: str = setting(
        "cpu", "parquet: decode JPEGs in Ray Data tasks on the CPUs, or on each worker's GPU "
        "(nvJPEG; CPU fallback)", MODEL, choices=DECODES, check=choice(DECODES))
    host_copy: str = setting(
        "ring", "parquet on GPUs: batches reach the GPU from a ring of reused pinned buffers, "
        "from Ray Data's fresh pinned copies, or from pageable memory", MODEL,
        choices=HOST_COPIES, check=choice(HOST_COPIES))
    prefetch_batches: int = setting(
        2, "parquet: batches Ray Data prefetches per worker", MODEL, metavar="N",
        check=whole(0))

    baseline_epochs: int | None = setting(
        None, "step 1: epochs to train the model without BAM (0 with --weights: only "
        "evaluated; more fine-tunes them)", STAGE0, check=optional(whole(0)),
        default_text="10, or 0 with --weights")
    attention_epochs: int = setting(5, "step 2: epochs to train the model with BAM", STAGE0,
                                    check=whole(0))
    lr: float = setting(0.05, "SGD learning rate of steps 1-2, cosine-annealed", STAGE0,
                        check=number(above=0))
    batch_size: int = setting(64, "global batch size, split over the training workers",
                              STAGE0, check=whole(2))

    tolerance: float = setting(
        0.5, "stop when top-1 falls more than this many percentage points below the "
        "reference; the last model within it is the result", LOOP, check=number(low=0))
    max_rounds: int = setting(
        6, "at most this many prune + fine-tune rounds; with --target-flops the pace m is set "
        "to reach the target in about this many, and the rounds it takes are allowed", LOOP,
        check=whole(1))
    target_flops: float | None = setting(
        None, "fraction of the baseline's FLOPs to reach, in (0, 1): 0.33 = -67 %% FLOPs. "
        "Rounds go on past --tolerance (reported, marked over the tolerance: not deployable "
        "at it) until the model has at most this many FLOPs; refused when the ratio caps "
        "cannot reach it", LOOP, metavar="FRACTION",
        check=optional(number(above=0, below=1)), default_text="none: stop at the tolerance")
    epochs: int = setting(1, "fine-tune epochs after each pruning round", LOOP, check=whole(0))
    finetune_lr: float = setting(0.01, "SGD learning rate of each round's fine-tune", LOOP,
                                 check=number(above=0))
    importance: str = setting(
        DEFAULT_IMPORTANCE, f"channel criterion, one of {', '.join(IMPORTANCES)}: ccpcsa = "
        "the paper's strength x (1 - mean |correlation|) on attention-weighted maps; "
        "strength, maxcorr, dedup = its variants; attention = PCAS-style mean attention; l1, "
        "bn_scale, taylor, lamp, fpgm, random = Torch-Pruning's importances. The search also "
        "takes a comma list (e.g. l1,ccpcsa,taylor): a categorical parameter, each frontier "
        "point naming its criterion", LOOP, metavar="NAME[,NAME...]")
    allocation: str = setting(
        "uniform", "how many channels each layer gives per round: uniform = every layer the "
        "same fraction of its original width (relative to its cap), the criterion ranks "
        "within a layer; global = the lowest scores over all layers; flops = global ranking "
        "of score per MAC saved", LOOP, choices=ALLOCATIONS, check=choice(ALLOCATIONS))
    calibration_batches: int = setting(
        4, "training batches (random, unaugmented) streamed to score channels each round",
        LOOP, check=whole(1))
    bn_batches: int = setting(
        16, "after each surgery, re-estimate BatchNorm statistics on this many training "
        "batches before the accuracy right after pruning is measured; 0 = off", LOOP,
        check=whole(0))
    min_channels: int = setting(4, "never shrink a layer below this many channels", LOOP,
                                check=whole(1))
    round_to: int | None = setting(
        None, "every pruned width a multiple of N (tensor cores work on multiples of 8), "
        "within the caps and floor", LOOP, metavar="N", check=optional(whole(1)),
        default_text="8 when training on CUDA, else 1")
    reference: str = setting(
        "baseline", "accuracy the tolerance is measured from: baseline = step 1's model "
        "(Algorithm 1), attention = the model with BAM", LOOP, choices=REFERENCES,
        check=choice(REFERENCES))
    seed: int = setting(0, "seed of training, sampling and data order", LOOP, check=whole(0))

    final_epochs: int = setting(
        0, "after pruning, fine-tune the result N more epochs (prune: the final model, and "
        "the one that reached --target-flops; search: the chosen frontier points); the "
        "accuracy before is kept as accuracy_before_final. Costs N epochs per model", FINAL,
        metavar="N", check=whole(0))
    final_lr: float | None = setting(
        None, "learning rate of the final fine-tune, cosine-annealed", FINAL,
        check=optional(number(above=0)), default_text="--finetune-lr")
    distill: bool = setting(
        False, "knowledge distillation from the unpruned model (step 1's) in the final "
        "fine-tune: loss = (1 - w) x cross-entropy + w x T^2 x KL of the "
        "temperature-softened outputs; needs --final-epochs", FINAL, check=validation.flag)
    distill_rounds: bool = setting(
        False, "also distil in every round's fine-tune (one more forward pass of the "
        "unpruned model per batch)", FINAL, check=validation.flag)
    distill_weight: float = setting(0.5, "w, the weight of the soft-target term, in [0, 1]",
                                    FINAL, metavar="W", check=number(low=0, high=1))
    distill_temperature: float = setting(4.0, "T, the softmax temperature of the soft targets",
                                         FINAL, metavar="T", check=number(above=0))

    gpus_per_worker: float | None = setting(
        None, "GPUs per training worker", RESOURCES, check=validation.gpus,
        default_text="1 when the Ray cluster (any node type, the autoscaler's included) has "
        "GPUs, else 0")
    cpus_per_worker: float = setting(1.0, "CPUs per training worker", RESOURCES,
                                     check=number(above=0))
    loader_workers: int | None = setting(
        None, "DataLoader processes that decode map-style images per training process",
        RESOURCES, check=optional(whole(0)),
        default_text="one per CPU the process may use, minus one, at most 8; 0 for digits")
    latency_batch: int = setting(
        BATCH, "measure inference latency at batch 1 and this batch at the end (median of "
        "repeats after warm-up, on the training device); 0 skips it", RESULTS, check=whole(0))

    # the training workers' count: --workers (prune) or --workers-per-trial (search)
    WORKERS: ClassVar[str] = ""

    def __post_init__(self) -> None:
        if isinstance(self.importance, list | tuple):  # YAML: importance: [l1, ccpcsa]
            self.importance = ",".join(map(str, self.importance))
        if self.baseline_epochs is None:
            self.baseline_epochs = 0 if self.weights else 10

    @property
    def training_workers(self) -> int:
        return getattr(self, self.WORKERS)

    @property
    def importances(self) -> tuple[str, ...]:
        """The criteria: one, or a comma list that the search samples from."""
        return tuple(part.strip() for part in str(self.importance).split(","))

    def validate(self) -> None:
        """Each setting's own check, then the rules between settings; SettingError names the
        bad one. Nothing is touched (a user's model module is imported)."""
        for spec in dataclasses.fields(self):
            meta = spec.metadata.get("setting")
            if meta is not None and meta.check is not None:
                meta.check(spec.name, getattr(self, spec.name))
        self.check_together()

    def check_together(self) -> None:
        validation.text("importance", self.importance)
        for name in self.importances:
            validation.choice("importance", name, IMPORTANCES)
        if len(set(self.importances)) != len(self.importances):
            raise SettingError(f"importance {self.importance!r} names a criterion twice")
        if self.dataset in NEEDS_ROOT and self.data_root is None:
            raise SettingError(f"dataset {self.dataset!r} needs data_root (--data-root)")
        if self.train_subset and self.dataset == "parquet":
            raise SettingError("train_subset is not supported for dataset 'parquet' (Ray Data "
                               "streams the shards)")
        validation.per_worker_batch(self.batch_size, self.training_workers)
        if self.distill and not self.final_epochs:
            raise SettingError("distill needs final_epochs >= 1: it distils in the final "
                               "fine-tune (--final-epochs N; --distill-rounds for every round)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # the one conversion into the loop's settings
    def data_config(self, test_subset: int = 0) -> DataConfig:
        return DataConfig(self.dataset, self.data_root, self.image_size,
                          train_subset=self.train_subset, test_subset=test_subset,
                          decode=self.decode, host_copy=self.host_copy,
                          prefetch_batches=self.prefetch_batches)

    def train_config(self, teacher: str | None = None, device: str | None = None
                     ) -> TrainConfig:
        """Training settings; with `teacher` (a checkpoint) fine-tunes distil from it."""
        return TrainConfig(batch_size=self.batch_size, lr=self.lr, seed=self.seed,
                           device=device, loader_workers=self.loader_workers, teacher=teacher,
                           teacher_model=self.model if teacher else None,
                           distill_weight=self.distill_weight,
                           distill_temperature=self.distill_temperature)

    def prepare_config(self, info: DatasetInfo, sync_bn: bool = False) -> PrepareConfig:
        return PrepareConfig(self.model, info.num_classes,
                             (info.channels, info.image_size, info.image_size), self.dataset,
                             self.baseline_epochs, self.attention_epochs, self.lr, self.seed,
                             data_root=self.data_root, batch_size=self.batch_size,
                             workers=self.training_workers, sync_bn=sync_bn,
                             train_subset=self.train_subset, weights=self.weights)

    def loop_config(self, groups_per_round: int, max_rounds: int, limits: PruneLimits, *,
                    importance: str | None = None, finetune_epochs: int | None = None,
                    finetune_lr: float | None = None, screen: bool = False,
                    target_flops: int | None = None) -> LoopConfig:
        """One schedule's loop; the search passes what its trial sampled."""
        cfg = LoopConfig(
            groups_per_round=groups_per_round, tolerance=self.tolerance, max_rounds=max_rounds,
            finetune_epochs=self.epochs if finetune_epochs is None else finetune_epochs,
            finetune_lr=self.finetune_lr if finetune_lr is None else finetune_lr,
            importance=importance or self.importance,
            calibration_batches=self.calibration_batches, allocation=self.allocation,
            bn_batches=self.bn_batches, round_to=self.round_to, limits=limits,
            reference=self.reference, seed=self.seed, screen=screen,
            target_flops=target_flops)
        cfg.validate()
        return cfg


PRUNE = "one schedule"


@dataclass
class PruneConfig(TrainingSettings):
    """`ccpcsa prune`: one model, one schedule, no search."""

    groups_per_round: int | None = setting(
        None, "m: channel groups removed per round", PRUNE, short="-m",
        check=optional(whole(1)),
        default_text="8; with --target-flops, the channels the target takes over --max-rounds")
    max_ratio: float = setting(
        0.9, "default cap on the fraction of a layer's original channels that may be "
        "removed, in [0, 1)", PRUNE, check=number(low=0, below=1))
    stage_cap: list[str] = setting(
        [], "cap for one stage, e.g. layer1=0.5 (repeatable)", PRUNE, metavar="STAGE=RATIO")
    layer_cap: list[str] = setting(
        [], "cap for one channel group, named by its root layer (repeatable)", PRUNE,
        metavar="LAYER=RATIO")
    residual_cap: float | None = setting(
        None, "cap for every residual-stream group (channels summed by skip connections), "
        "instead of its stage's, in [0, 1)", PRUNE, metavar="RATIO",
        check=optional(number(low=0, below=1)), default_text="the stage's")
    strip_bam: bool = setting(
        False, "also write final_nobam.pt: the final model without BAM, fine-tuned", PRUNE,
        check=validation.flag)
    device: str | None = setting(None, "cpu, cuda or cuda:N", RESOURCES,
                                 default_text="cuda when available, else cpu")
    workers: int = setting(
        1, "data-parallel training workers under Ray Train; 1 = one process, no Ray",
        RESOURCES, check=whole(1))
    sync_bn: bool = setting(
        False, "BatchNorm statistics over the global batch of all Ray Train workers "
        "(SyncBatchNorm on GPUs, an all-reduce BatchNorm on CPUs)", RESOURCES,
        check=validation.flag)
    out: str = setting(
        "runs/prune", "output folder or URI; one prune run at a time uses it (a lock file)",
        RESULTS, check=validation.location)
    overwrite: bool = setting(
        False, "replace the results of an earlier run in --out (rounds.parquet, checkpoints/, "
        "final*.pt); without it such an --out is refused. The stage-0 models in "
        "--out/prepared/ are reused when their settings match", RESULTS, check=validation.flag)

    WORKERS: ClassVar[str] = "workers"

    def check_together(self) -> None:
        super().check_together()
        if len(self.importances) > 1:
            raise SettingError(f"importance {self.importance!r}: prune takes one criterion (a "
                               "comma list is for the search)")
        self.caps("stage_cap")
        self.caps("layer_cap")

    def caps(self, name: str) -> dict[str, float]:
        """--stage-cap / --layer-cap NAME=RATIO items as {name: ratio}."""
        caps = {}
        for item in getattr(self, name) or []:
            key, sep, value = str(item).partition("=")
            try:
                caps[key] = validation.number(f"{name} {key}", float(value), low=0, below=1)
            except ValueError as exc:
                if sep and key and isinstance(exc, SettingError):
                    raise
                raise SettingError(f"{name} expects NAME=RATIO, got {item!r}") from None
        return caps

    def limits(self) -> PruneLimits:
        return PruneLimits(self.max_ratio, self.caps("stage_cap"), self.caps("layer_cap"),
                           self.min_channels, self.residual_cap)


def setting_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if "setting" in f.metadata]


def load_yaml(path: str, cls: type) -> dict[str, Any]:
    """The settings of a YAML file (keys are setting names, dashes or underscores)."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except OSError as exc:
        raise SettingError(f"cannot read config file {path!r}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise SettingError(f"config file {path!r} is not valid YAML: {exc}".splitlines()[0]
                           ) from None
    if not isinstance(data, dict):
        raise SettingError(f"config file {path!r} must hold a mapping of settings")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


T = typing.TypeVar("T", bound=TrainingSettings)


def from_dict(cls: type[T], values: Any, source: str = "") -> T:
    """A validated configuration from plain values: the one way in for flags, a YAML file and
    the configuration saved with a run. SettingError names the bad setting (and `source`)."""
    where = f" in {source}" if source else ""
    if not isinstance(values, dict):
        raise SettingError(f"the configuration{where} must be a mapping of settings")
    values = cls.upgrade(dict(values)) if hasattr(cls, "upgrade") else dict(values)
    names = setting_names(cls)
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise SettingError(f"unknown setting(s){where}: {', '.join(map(str, unknown))}; valid "
                           f"settings: {', '.join(names)}")
    try:
        cfg = cls(**values)
        cfg.validate()
    except SettingError as exc:
        raise SettingError(f"{exc}{where}") from None
    return cfg
