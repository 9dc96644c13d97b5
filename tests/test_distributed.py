"""Ray Train data-parallel training on a real local Ray cluster (CPU, gloo): one worker group
per runner that trains, evaluates, scores channels and re-estimates BatchNorm."""

import copy
import os
import re
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import ray
import torch
from ccpcsa_faults import KILL_WORKER, env_with_plugins
from PIL import Image

from ccpcsa.bn import batch_norms
from ccpcsa.data import DataConfig, build_datasets, dataset_info, imagefolder_to_parquet
from ccpcsa.distributed import DistributedError, RayRunner, fingerprint
from ccpcsa.loop import LoopConfig, PrepareConfig, channel_groups, prepare, prune_loop
from ccpcsa.models import build_model
from ccpcsa.prune import PruneLimits
from ccpcsa.train import LocalRunner, TrainConfig

REPO = Path(__file__).resolve().parents[1]
DIGITS = DataConfig("digits", augment=False)  # no augmentation: 1 and N workers see equal data
TRAIN = TrainConfig(batch_size=64, seed=0)


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A local Ray whose workers load the tests' fault injection; a test arms a worker kill by
    writing its spec to the file yielded (kill_worker)."""
    spec = tmp_path_factory.mktemp("faults") / "kill-worker"
    saved = dict(os.environ)
    os.environ.update(env_with_plugins({**os.environ, KILL_WORKER: f"@{spec}"}))
    try:  # the Ray processes keep the environment they start with
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert ray.nodes()[0]["NodeManagerAddress"] == "127.0.0.1"
    yield spec
    ray.shutdown()


@pytest.fixture
def kill_worker(ray_cluster):
    """kill_worker("RANK:EPOCH:BATCH:MARKER"): that Ray Train worker SIGKILLs itself there,
    once; kill_worker("") disarms it."""
    yield ray_cluster.write_text
    ray_cluster.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def prepared_model(tmp_path_factory):
    """M' (trained baseline + BAM), made once in one process and shared by the comparisons."""
    info = dataset_info(DIGITS)
    train, test = build_datasets(DIGITS)
    cfg = PrepareConfig("resnet20", info.num_classes, (3, info.image_size, info.image_size),
                        baseline_epochs=3, attention_epochs=1)
    return cfg, prepare(cfg, LocalRunner(train, test, TRAIN), str(tmp_path_factory.mktemp("p")))


@pytest.fixture(scope="class")
def two_workers(ray_cluster, tmp_path_factory):
    """One runner (one worker group) for the comparisons with one process below; closed after
    them (class scope), so its workers do not hold the 2 CPUs the later tests need."""
    runner = RayRunner(DIGITS, TRAIN, 2, str(tmp_path_factory.mktemp("ray")), sync_bn=True)
    yield runner
    runner.close()


def _local_runner():
    return LocalRunner(*build_datasets(DIGITS), TRAIN)  # DIGITS: unaugmented, as calibration


def _loop(runner, cfg, prepared, on_round=None):
    loop_cfg = LoopConfig(groups_per_round=12, tolerance=100.0, max_rounds=3,
                          finetune_epochs=1, finetune_lr=0.01, calibration_batches=2,
                          limits=PruneLimits(max_ratio=0.8))
    return prune_loop(prepared.load_attention_model(), cfg.model, cfg.input_shape,
                      prepared.baseline_accuracy, runner, loop_cfg, on_round,
                      initial_accuracy=prepared.attention_accuracy)


SCORE_TOLERANCE = 1e-4  # mean-normalised scores, worker-side vs one process (seen: ~1e-6)


class TestTwoWorkersAgainstOneProcess:
    """Scores, BatchNorm statistics and a 3-round loop on one worker group vs one process."""

    def test_worker_scores_match_one_process(self, two_workers, prepared_model):
        """Each of the 2 workers scores its half of every calibration batch (on its own device),
        the statistics (n, sum d, d d^T, sum |x|; taylor's gradients) are summed over gloo, and the
        scores equal those of one process that sees the whole batches, within SCORE_TOLERANCE.
        BatchNorm re-estimated on the workers (over the global batch with --sync-bn) equals one
        process's; the test accuracy of the same model is the same."""
        cfg, prepared = prepared_model
        model = prepared.load_attention_model()
        _graph, groups = channel_groups(model, cfg.model, cfg.input_shape)
        local = _local_runner()
        for kind in ("ccpcsa", "maxcorr", "dedup", "attention", "taylor", "l1", "random"):
            ours = two_workers.score(kind, model, groups, 3, seed=5)
            theirs = local.score(kind, model, groups, 3, seed=5)
            assert ours.keys() == theirs.keys() == {g.key for g in groups}
            worst = max(float((ours[k] - theirs[k]).abs().max()) for k in ours)
            assert worst <= SCORE_TOLERANCE, (kind, worst)
        assert two_workers.evaluate(model) == local.evaluate(copy.deepcopy(model))
        ours = two_workers.recalibrate_bn(copy.deepcopy(model), 4)
        theirs = local.recalibrate_bn(copy.deepcopy(model), 4).cpu()
        for a, b in zip(batch_norms(ours), batch_norms(theirs), strict=True):
            torch.testing.assert_close(a.running_mean, b.running_mean, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(a.running_var, b.running_var, rtol=1e-4, atol=1e-5)
        assert not torch.equal(batch_norms(ours)[0].running_mean,
                               batch_norms(model)[0].running_mean)  # re-estimated, not kept
        assert two_workers.group_starts == 1
        assert {t.op for t in two_workers.timings} >= {"score", "evaluate", "recalibrate"}


    def test_two_workers_match_one_process(self, two_workers, prepared_model):
        """Same seed, same global batch (64 = 2 x 32), BatchNorm over the global batch: the same
        samples in the same steps. fp32 training amplifies reduction-order rounding (one process
        on 1 vs 2 torch threads already ends an epoch ~1e-2 apart in its weights), so later rounds
        may swap near-tied channels between layers; the first round is decided on the same model.
        The 3 rounds run on one worker group (scoring, BatchNorm, fine-tune, evaluation); each
        round's fixed cost (the driver's wall time of its commands minus the workers' time in
        them) is printed."""
        cfg, prepared = prepared_model
        local = _loop(_local_runner(), cfg, prepared)
        runner = two_workers
        marks = []

        def on_round(record, _model):
            marks.append((time.perf_counter(), len(runner.timings)))

        ray_run = _loop(runner, cfg, prepared, on_round)
        assert runner.group_starts == 1  # one worker group for the whole loop
        for rnd in range(1, len(marks)):
            (t0, c0), (t1, c1) = marks[rnd - 1], marks[rnd]
            commands = runner.timings[c0:c1]
            overhead = sum(c.wall_s - c.worker_s for c in commands)
            print(f"round {rnd}: {t1 - t0:.1f}s wall, {len(commands)} commands "
                  f"({', '.join(c.op for c in commands)}), Ray overhead {overhead:.2f}s")
        assert len(ray_run.records) == len(local.records) == 4
        assert ray_run.records[1].widths == local.records[1].widths  # exactly the same pruning
        for ours, theirs in zip(ray_run.records, local.records, strict=True):
            assert ours.widths.keys() == theirs.widths.keys()
            assert sum(ours.widths.values()) == sum(theirs.widths.values())
            moved = sum(abs(ours.widths[k] - theirs.widths[k]) for k in ours.widths)
            assert moved <= 2 * ours.round, (ours.round, ours.widths, theirs.widths)
            assert abs(ours.flops - theirs.flops) <= 0.02 * theirs.flops
        assert abs(ray_run.records[-1].accuracy - local.records[-1].accuracy) <= 1.5
        assert local.records[-1].widths != local.records[0].widths  # something was pruned


def _write_images(root: Path, per_class: dict[str, int]) -> None:
    colours = {"red": (200, 30, 30), "blue": (30, 30, 200)}
    for cls, count in per_class.items():
        folder = root / cls
        folder.mkdir(parents=True)
        for i in range(count):
            img = Image.new("RGB", (12, 12), colours[cls])
            img.putpixel((i % 12, (3 * i) % 12), (i * 20 % 255, 255, 0))
            img.save(folder / f"{i:03d}.png")


@pytest.fixture(scope="module")
def parquet_root(tmp_path_factory):
    src, dst = tmp_path_factory.mktemp("folder"), tmp_path_factory.mktemp("shards")
    _write_images(src / "train", {"red": 12, "blue": 12})
    _write_images(src / "val", {"red": 4, "blue": 3})
    imagefolder_to_parquet(str(src / "train"), str(dst / "train"), rows_per_shard=5)
    imagefolder_to_parquet(str(src / "val"), str(dst / "val"), rows_per_shard=3)
    return src, dst


def test_parquet_shards_stream_through_ray_data(ray_cluster, parquet_root, tmp_path):
    src, dst = parquet_root
    data = DataConfig("parquet", str(dst), image_size=16)
    runner = RayRunner(data, TrainConfig(batch_size=8), 2, str(tmp_path / "ray"),
                       cpus_per_worker=0.5)  # leaves a CPU for Ray Data's read tasks
    model = build_model("resnet20", 2, with_bam=True)
    before = fingerprint(model)
    runner.fit(model, 1, 0.05, "parquet")
    metrics = runner.last_metrics
    files = sorted((src / "train").rglob("*.png"))
    expected = sum(zlib.crc32(f.read_bytes()) for f in files) % ((1 << 61) - 1)
    assert metrics["last_samples"] == len(files) == 24  # every sample once in the epoch
    assert metrics["last_sample_checksum"] == expected  # ... and no sample twice
    assert 0 < metrics["last_input_wait_s"] < metrics["last_seconds"]  # the stream's start
    assert metrics["evaluated"] == 7  # the whole val split, each image on one worker
    assert fingerprint(model) != before  # the trained weights came back
    assert runner.evaluate(model) == metrics["accuracy"]
    _graph, groups = channel_groups(model, "resnet20", (3, 16, 16))
    scores = runner.score("ccpcsa", model, groups, 2, seed=0)  # on Parquet calibration rows
    assert all(torch.isfinite(scores[g.key]).all() and scores[g.key].shape == (g.width,)
               for g in groups)
    assert runner.group_starts == 1
    runner.close()


def test_killed_worker_is_replaced_and_resumes_from_checkpoint(kill_worker, tmp_path):
    marker = tmp_path / "killed"
    kill_worker(f"1:1:3:{marker}")  # rank 1, second epoch, fourth batch
    runner = RayRunner(DIGITS, TRAIN, 2, str(tmp_path / "ray"), max_failures=1)
    model = build_model("resnet20", 10, with_bam=False)
    runner.fit(model, 3, 0.05, "fault")
    metrics = runner.last_metrics
    assert "killed rank 1 in epoch 1" in marker.read_text()
    assert metrics["start_epoch"] == 1  # resumed after epoch 1's checkpoint: lost < 1 epoch
    assert metrics["epoch"] == 3
    assert metrics["accuracy"] > 50.0
    assert runner.group_starts == 2  # the group was restarted once ...
    assert runner.evaluate(build_model("resnet20", 10)) < 50.0  # ... and still serves calls
    assert runner.group_starts == 2
    runner.close()
    assert not list((tmp_path / "ray").glob("group-*/*fault*"))  # epoch checkpoints removed


def test_bad_input_fails_before_work(ray_cluster, tmp_path):
    with pytest.raises(DistributedError, match="workers must be an integer >= 1, got 0"):
        RayRunner(DIGITS, TRAIN, 0, str(tmp_path))
    with pytest.raises(DistributedError, match="needs 2 GPUs but .* has 0"):
        RayRunner(DIGITS, TRAIN, 2, str(tmp_path), gpus_per_worker=1)
    with pytest.raises(DistributedError, match="batch size 64 must split into 3"):
        RayRunner(DIGITS, TRAIN, 3, str(tmp_path))
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError, match=re.escape(f"cannot write to {str(blocker / 'runs')!r}")):
        RayRunner(DIGITS, TRAIN, 2, str(blocker / "runs"))


@pytest.mark.parametrize("argv, message", [
    (["--workers", "0"], "workers must be >= 1, got 0"),
    (["--workers", "2", "--gpus-per-worker", "1"],
     "needs 2 GPUs but this machine's Ray instance has 0"),
])
def test_cli_bad_worker_flags_one_line_error(tmp_path, argv, message):
    proc = subprocess.run(
        [sys.executable, "-m", "ccpcsa", "prune", "--out", str(tmp_path / "out"), *argv],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not (tmp_path / "out" / "prepared").exists()  # nothing was trained


def test_a_restarted_driver_resumes_a_stable_fit_from_its_last_epoch(kill_worker, tmp_path):
    """Stage 0 after a lost head: its fits keep their epoch checkpoints under a path made of
    their label (stable_fits), so a new runner over the same storage continues the fit from
    the last epoch instead of epoch 0."""
    marker = tmp_path / "killed"
    kill_worker(f"1:1:3:{marker}")  # rank 1, second epoch, fourth batch
    lost = RayRunner(DIGITS, TRAIN, 2, str(tmp_path / "ray"), max_failures=0, stable_fits=True)
    with pytest.raises(DistributedError, match="worker group stopped"):
        lost.fit(build_model("resnet20", 10, with_bam=False), 3, 0.05, "baseline")
    lost.close()
    assert (tmp_path / "ray" / "fits" / "baseline" / "epoch-0001.pt").exists()
    kill_worker("")
    again = RayRunner(DIGITS, TRAIN, 2, str(tmp_path / "ray"), stable_fits=True)
    again.fit(build_model("resnet20", 10, with_bam=False), 3, 0.05, "baseline")
    assert again.last_metrics["start_epoch"] == 1 and again.last_metrics["epoch"] == 3
    again.close()

def _descendants(root: int) -> dict[int, str]:
    """pid -> command name of every live process below `root` (Ray's processes are
    children of the raylet this test process started)."""
    children: dict[int, list[int]] = {}
    names = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        names[int(entry.name)] = stat[stat.index("(") + 1:stat.rindex(")")]
        children.setdefault(int(stat[stat.rindex(")") + 2:].split()[1]), []).append(
            int(entry.name))
    found, todo = {}, list(children.get(root, []))
    while todo:
        pid = todo.pop()
        found[pid] = names.get(pid, "")
        todo.extend(children.get(pid, []))
    return found


def _listening(pid: int) -> list[str]:
    """The local addresses process `pid` listens on (TCP)."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
    return [line.split()[3] for line in out.splitlines() if f"pid={pid}," in line]


def test_two_workers_on_a_local_ray_listen_on_loopback_only(ray_cluster, tmp_path):
    """Issue 26: a Ray Train worker of a local run listened on all interfaces (torch's
    TCPStore); the group now meets through a file and binds gloo to 127.0.0.1."""
    if subprocess.run(["which", "ss"], capture_output=True).returncode:
        pytest.skip("no ss here")
    runner = RayRunner(DIGITS, TRAIN, 2, str(tmp_path), sync_bn=True)
    try:
        runner.evaluate(build_model("resnet20", 10))  # the group is up, its process group made
        workers = [pid for pid, name in _descendants(os.getpid()).items()
                   if name.startswith("ray::RayTrain")]
        assert len(workers) == 2, _descendants(os.getpid())
        addresses = [addr for pid in workers for addr in _listening(pid)]
        assert addresses, "the workers listen nowhere: is gloo's group there at all?"
        assert all(addr.startswith(("127.0.0.1:", "[::1]:", "[::ffff:127.0.0.1]:"))
                   for addr in addresses), addresses
    finally:
        runner.close()
