"""Accuracy-vs-FLOPs Pareto frontier of the search's candidate points.

Every reported round of every trial is a candidate; the frontier maximises top-1 accuracy and
minimises FLOPs over the deployable points (those whose model was fine-tuned: a two-phase
search's screened points are candidates for phase 2, not models to ship). Points with the same
(accuracy, FLOPs) appear on it once: the one that cost the least compute to reproduce.
Storage goes through pyarrow.fs so a run dir may be a local path or a URI (s3://, gs://,
file://).
"""

from __future__ import annotations

import io
import json
import math
import os
import posixpath
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, Formatter, FuncFormatter, LogFormatter

from ccpcsa import storage

FRONTIER_FILE = "frontier.parquet"
FRONTIER_DIR = "frontier"
BASELINE_KEY = b"baseline"

# ---------------------------------------------------------------------------------------------
# Frontier maths


def pareto_mask(accuracy: Sequence[float], flops: Sequence[float]) -> np.ndarray:
    """Bool mask of non-dominated points (maximise accuracy, minimise flops), O(n log n).

    A point is dominated iff another has accuracy >= and flops <= with at least one strict.
    Exact duplicates of a non-dominated point are all kept; rows with NaN are never pareto.
    """
    acc = np.asarray(accuracy, dtype=float)
    fl = np.asarray(flops, dtype=float)
    if acc.shape != fl.shape or acc.ndim != 1:
        raise ValueError(
            f"accuracy and flops must be 1-D of equal length, got {acc.shape}, {fl.shape}"
        )
    mask = np.zeros(acc.shape, dtype=bool)
    valid = np.flatnonzero(~(np.isnan(acc) | np.isnan(fl)))
    if valid.size == 0:
        return mask
    # flops ascending, accuracy descending within equal flops.
    order = valid[np.lexsort((-acc[valid], fl[valid]))]
    a, f = acc[order], fl[order]
    group_start = np.r_[True, f[1:] != f[:-1]]
    start_idx = np.maximum.accumulate(np.where(group_start, np.arange(f.size), 0))
    group_best = a[start_idx]  # best accuracy among points with the same flops
    running_max = np.maximum.accumulate(a)
    # best accuracy among points with strictly fewer flops (none for the first group)
    has_prev = start_idx > 0
    prev_best = np.where(has_prev, running_max[np.maximum(start_idx - 1, 0)], -np.inf)
    keep = (a == group_best) & (~has_prev | (group_best > prev_best))
    mask[order] = keep
    return mask


def hypervolume(
    accuracy: Sequence[float],
    flops: Sequence[float],
    ref_flops: float,
    ref_accuracy: float = 0.0,
) -> float:
    """Area dominated by the points w.r.t. (ref_flops, ref_accuracy).

    x = fraction of ref_flops saved (1 - flops/ref_flops, clipped at 0), y = accuracy above
    ref_accuracy (clipped at 0); the result is the area of the union of [0,x]x[0,y].
    """
    if not ref_flops > 0:
        raise ValueError(f"ref_flops must be > 0, got {ref_flops}")
    acc = np.asarray(accuracy, dtype=float)
    fl = np.asarray(flops, dtype=float)
    x = np.clip(1.0 - fl / float(ref_flops), 0.0, None)
    y = np.clip(acc - float(ref_accuracy), 0.0, None)
    ok = ~(np.isnan(x) | np.isnan(y)) & (x > 0) & (y > 0)
    x, y = x[ok], y[ok]
    area, y_top = 0.0, 0.0
    for i in np.lexsort((-y, -x)):  # x descending, y descending within ties
        if y[i] > y_top:
            area += float(x[i]) * float(y[i] - y_top)
            y_top = float(y[i])
    return area


def mark_frontier(points: pd.DataFrame, baseline: dict | None = None) -> pd.DataFrame:
    """Copy of `points` with bool `pareto`, `duplicate_of` and `flops_reduction` (% fewer FLOPs
    than baseline; NaN when no baseline is given).

    `pareto`: non-dominated among the deployable rows (all rows when there is no `deployable`
    column); of several frontier rows with identical accuracy and FLOPs only the one with the
    least `compute_s` (the first on a tie) is marked, and the others name it in
    `duplicate_of` ("<trial_id> round <k>"; "" elsewhere)."""
    out = points.copy()
    deployable = (out["deployable"].astype(bool).to_numpy() if "deployable" in out.columns
                  else np.ones(len(out), dtype=bool))
    accuracy = out["accuracy"].to_numpy(float)
    flops = out["flops"].to_numpy(float)
    mask = np.zeros(len(out), dtype=bool)
    rows = np.flatnonzero(deployable)
    mask[rows] = pareto_mask(accuracy[rows], flops[rows])
    out["duplicate_of"] = _mark_duplicates(out, mask)
    out["pareto"] = mask
    base_flops = _baseline_value(baseline, "flops")
    out["flops_reduction"] = _reduction(flops, base_flops)
    return out


def _mark_duplicates(points: pd.DataFrame, mask: np.ndarray) -> list[str]:
    """Clears `mask` on all but the cheapest of each set of frontier rows with identical
    (accuracy, FLOPs); returns, per row, the kept row's name for the cleared ones."""
    names = [""] * len(points)
    cost = (points["compute_s"].to_numpy(float) if "compute_s" in points.columns
            else np.zeros(len(points)))
    cost = np.where(np.isnan(cost), np.inf, cost)
    same: dict[tuple[float, float], list[int]] = {}
    for i in np.flatnonzero(mask):
        key = (float(points["accuracy"].iloc[i]), float(points["flops"].iloc[i]))
        same.setdefault(key, []).append(int(i))
    for rows in same.values():
        if len(rows) < 2:
            continue
        keep = min(rows, key=lambda i: (cost[i], i))
        rec = points.iloc[keep]
        rnd = rec.get("round")
        name = f"{rec.get('trial_id', keep)}" + ("" if rnd is None or pd.isna(rnd)
                                                 else f" round {int(rnd)}")
        for i in rows:
            if i != keep:
                mask[i] = False
                names[i] = name
    return names


def _baseline_value(baseline: dict | None, key: str) -> float:
    if not baseline or baseline.get(key) is None:
        return math.nan
    return float(baseline[key])


def _reduction(values: np.ndarray, base: float) -> np.ndarray:
    if not base > 0:  # also catches NaN
        return np.full(values.shape, np.nan)
    return 100.0 * (1.0 - values / base)


def _ensure_marked(df: pd.DataFrame, baseline: dict | None) -> pd.DataFrame:
    return df if "pareto" in df.columns else mark_frontier(df, baseline)


# ---------------------------------------------------------------------------------------------
# Local path / URI plumbing


def _is_uri(path: str) -> bool:
    return "://" in path


def _resolve(path: str) -> tuple[pafs.FileSystem, str]:
    if _is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def join_path(base: str, *parts: str) -> str:
    """Join path parts onto a local path or a URI."""
    if _is_uri(base):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# ---------------------------------------------------------------------------------------------
# Parquet round trip


def write_frontier(df: pd.DataFrame, run_dir: str, baseline: dict | None = None) -> str:
    """Write `df` (marked if it has no `pareto` column) to <run_dir>/frontier.parquet, with the
    baseline as JSON under schema metadata key b"baseline". Returns the file's path/URI."""
    df = _ensure_marked(df, baseline)
    table = pa.Table.from_pandas(df, preserve_index=False)
    if baseline is not None:
        meta = dict(table.schema.metadata or {})
        meta[BASELINE_KEY] = json.dumps(baseline, default=_json_default).encode()
        table = table.replace_schema_metadata(meta)
    path = join_path(run_dir, FRONTIER_FILE)
    storage.write_bytes(path, storage.parquet_bytes(table))  # atomic: old or new, never a part
    return path


def read_frontier(run_dir: str) -> tuple[pd.DataFrame, dict | None]:
    """Read <run_dir>/frontier.parquet; returns (points, baseline or None)."""
    fs, root = _resolve(run_dir)
    if fs.get_file_info(root).type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"run dir not found: {run_dir}")
    path = posixpath.join(root, FRONTIER_FILE)
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise FileNotFoundError(f"no {FRONTIER_FILE} in run dir {run_dir}")
    table = pq.read_table(path, filesystem=fs)
    raw = (table.schema.metadata or {}).get(BASELINE_KEY)
    baseline = json.loads(raw) if raw else None
    return table.to_pandas(), baseline


# ---------------------------------------------------------------------------------------------
# Human units


def human(value: float) -> str:
    """1234 -> '1.23K', 3.2e8 -> '320M', 4.1e9 -> '4.1G'."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    v = float(value)
    for scale, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(v) >= scale:
            return f"{v / scale:.3g}{unit}"
    return f"{v:.3g}"


class _HumanLogFormatter(Formatter):
    """Log-axis tick labels in human units; which ticks get labels is LogFormatter's choice."""

    def __init__(self) -> None:
        self._inner = LogFormatter(labelOnlyBase=False)

    def set_axis(self, axis: Any) -> None:
        super().set_axis(axis)
        self._inner.set_axis(axis)

    def set_locs(self, locs: Any) -> None:
        super().set_locs(locs)
        self._inner.set_locs(locs)

    def __call__(self, x: float, pos: int | None = None) -> str:
        return human(x) if x > 0 and self._inner(x, pos) else ""


# ---------------------------------------------------------------------------------------------
# Plot


def plot_frontier(
    df: pd.DataFrame, path: str, baseline: dict | None = None, title: str = ""
) -> str:
    """Draw all points (grey), the frontier (step line) and the baseline (star) to a PNG."""
    df = _ensure_marked(df, baseline)
    fig = Figure(figsize=(7.5, 5.0), dpi=120)
    ax = fig.add_subplot()
    _draw_points(ax, df)
    _draw_baseline(ax, baseline)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(_HumanLogFormatter())
    ax.xaxis.set_minor_formatter(_HumanLogFormatter())
    ax.set_xlabel("FLOPs (multiply-accumulates)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.grid(True, which="both", alpha=0.3)
    _percent_axis(ax, _baseline_value(baseline, "flops"))
    if title:
        ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    _save_figure(fig, path)
    return path


def _percent_axis(ax: Any, base_flops: float) -> None:
    """A top axis with FLOPs as % of the baseline's."""
    if not (math.isfinite(base_flops) and base_flops > 0):
        return
    top = ax.secondary_xaxis("top", functions=(lambda f: 100.0 * f / base_flops,
                                               lambda p: p * base_flops / 100.0))
    top.set_xlabel("FLOPs (% of the baseline)")
    low, high = (100.0 * f / base_flops for f in ax.get_xlim())
    step = 10.0 if high / max(low, 1e-9) < 20 else 25.0
    ticks = [t for t in np.arange(step, 1000.0 + step, step) if low <= t <= high]
    top.xaxis.set_major_locator(FixedLocator(ticks or [100.0]))
    top.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:.0f}%"))
    top.xaxis.set_minor_locator(FixedLocator([]))


def _plottable(df: pd.DataFrame) -> pd.DataFrame:
    acc = df["accuracy"].to_numpy(float)
    fl = df["flops"].to_numpy(float)
    return df[np.isfinite(acc) & np.isfinite(fl) & (fl > 0)]


def _draw_points(ax: Any, df: pd.DataFrame) -> None:
    pts = _plottable(df)
    if pts.empty:
        return
    deployable = (pts["deployable"].astype(bool) if "deployable" in pts.columns
                  else pd.Series(True, index=pts.index))
    screened = pts[~deployable]
    if not screened.empty:
        ax.scatter(screened["flops"], screened["accuracy"], s=16, marker="x",
                   color="tab:orange", alpha=0.5,
                   label="screened: BN re-estimated, not fine-tuned (not deployable)")
    fine = pts[deployable]
    ax.scatter(fine["flops"], fine["accuracy"], s=14, color="0.6", alpha=0.6,
               label="all points" if screened.empty else "fine-tuned points (deployable)")
    front = pts[pts["pareto"].astype(bool)].drop_duplicates(["flops", "accuracy"])
    front = front.sort_values("flops")
    if front.empty:
        return
    ax.step(front["flops"], front["accuracy"], where="post", color="tab:blue", linewidth=1.5)
    _draw_final_finetune(ax, pts)
    within = _within_tolerance(front)
    ax.scatter(front.loc[within, "flops"], front.loc[within, "accuracy"], s=30,
               color="tab:blue", zorder=3,
               label=f"Pareto frontier ({len(front)})" if within.all()
               else f"frontier, within tolerance: deployable ({int(within.sum())})")
    if not within.all():
        ax.scatter(front.loc[~within, "flops"], front.loc[~within, "accuracy"], s=36,
                   facecolors="white", edgecolors="tab:blue", linewidths=1.5, zorder=3,
                   label=f"frontier, past the tolerance ({int((~within).sum())})")


def _draw_final_finetune(ax: Any, pts: pd.DataFrame) -> None:
    """Points that had the final fine-tune: their accuracy before it, joined to after."""
    if "accuracy_before_final" not in pts.columns:
        return
    tuned = pts[pts["accuracy_before_final"].notna()]
    if tuned.empty:
        return
    ax.vlines(tuned["flops"], tuned["accuracy_before_final"], tuned["accuracy"],
              colors="tab:green", linestyles="dotted", linewidth=1.2, zorder=2)
    ax.scatter(tuned["flops"], tuned["accuracy_before_final"], s=22, marker="v",
               color="tab:green", zorder=2,
               label=f"before the final fine-tune ({len(tuned)})")


def _within_tolerance(df: pd.DataFrame) -> pd.Series:
    """Per row: within the search's accuracy tolerance (True where not recorded)."""
    if "within_tolerance" not in df.columns:
        return pd.Series(True, index=df.index)
    return df["within_tolerance"].map(lambda v: True if v is None or v is pd.NA
                                      or (isinstance(v, float) and math.isnan(v))
                                      else bool(v)).astype(bool)


def _draw_baseline(ax: Any, baseline: dict | None) -> None:
    acc = _baseline_value(baseline, "accuracy")
    fl = _baseline_value(baseline, "flops")
    if math.isfinite(acc) and math.isfinite(fl) and fl > 0:
        ax.scatter(
            [fl],
            [acc],
            marker="*",
            s=220,
            color="tab:red",
            edgecolor="black",
            zorder=4,
            label="baseline (unpruned)",
        )


def criteria_text(df: pd.DataFrame) -> str:
    """", criterion l1" / ", criteria l1, taylor": what the frontier's points were pruned
    with ("" when the points do not say)."""
    if "importance" not in df.columns:
        return ""
    front = df[df["pareto"].astype(bool)] if "pareto" in df.columns else df
    used = sorted({str(c) for c in front["importance"].dropna() if c})
    if not used:
        return ""
    return f", criteri{'a' if len(used) > 1 else 'on'} {', '.join(used)}"


def has_latency(df: pd.DataFrame) -> bool:
    return "latency_ms" in df.columns and bool(df["latency_ms"].notna().any())


def plot_latency(df: pd.DataFrame, path: str, baseline: dict | None = None, title: str = ""
                 ) -> str:
    """Two panels over the points whose latency was measured (the FLOPs frontier): accuracy
    vs FLOPs, and accuracy vs measured batch-1 latency, with the points non-dominated in
    (accuracy, latency) joined; the baseline as a star where it was measured."""
    df = _ensure_marked(df, baseline)
    if not has_latency(df):
        raise ValueError("no latency_ms measured in these points")
    pts = df[df["latency_ms"].notna()].copy()
    fig = Figure(figsize=(11.0, 4.8), dpi=120)
    for ax, column, label in ((fig.add_subplot(1, 2, 1), "flops", "FLOPs (multiply-accumulates)"),
                              (fig.add_subplot(1, 2, 2), "latency_ms",
                               "latency at batch 1 (ms, median)")):
        front = pts[pareto_mask(pts["accuracy"].to_numpy(float), pts[column].to_numpy(float))]
        front = front.sort_values(column)
        ax.scatter(pts[column], pts["accuracy"], s=14, color="0.6", label="measured points")
        ax.step(front[column], front["accuracy"], where="post", color="tab:blue")
        ax.scatter(front[column], front["accuracy"], s=30, color="tab:blue", zorder=3,
                   label=f"non-dominated ({len(front)})")
        base_x, base_y = _baseline_value(baseline, column), _baseline_value(baseline, "accuracy")
        if math.isfinite(base_x) and math.isfinite(base_y):
            ax.scatter([base_x], [base_y], marker="*", s=220, color="tab:red",
                       edgecolor="black", zorder=4, label="baseline (unpruned)")
        if column == "flops":
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(_HumanLogFormatter())
            ax.xaxis.set_minor_formatter(_HumanLogFormatter())
        ax.set_xlabel(label)
        ax.set_ylabel("top-1 accuracy (%)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="lower right", fontsize="small")
    device = pts["latency_device"].dropna().iloc[0] if "latency_device" in pts else ""
    fig.suptitle(f"{title}\n{device}" if title else str(device))
    fig.tight_layout()
    _save_figure(fig, path)
    return path


def _save_figure(fig: Figure, path: str) -> None:
    png = io.BytesIO()
    fig.savefig(png, format="png")
    storage.write_bytes(path, png.getvalue())


# ---------------------------------------------------------------------------------------------
# Text table

_TABLE_COLUMNS = (
    ("trial", "<"),
    ("round", ">"),
    ("accuracy", ">"),
    ("Δacc", ">"),
    ("FLOPs", ">"),
    ("FLOPs ↓ %", ">"),
    ("params", ">"),
    ("params ↓ %", ">"),
    ("checkpoint", "<"),
)


def format_table(df: pd.DataFrame, baseline: dict | None = None, only_pareto: bool = True) -> str:
    """Aligned plain-text table sorted by FLOPs (pareto rows only unless only_pareto=False, in
    which case a leading `pareto` column marks frontier rows with "*"). A `phase` column and
    the compute each point cost appear when the points carry them; with every row listed, so
    does `deployable`; `tolerance` (within / past) when some row is past the tolerance."""
    df = _ensure_marked(df, baseline)
    if only_pareto:
        df = df[df["pareto"].astype(bool)]
    df = df.sort_values(["flops", "accuracy"], ascending=[True, False], kind="stable")
    columns = list(_TABLE_COLUMNS)
    extra = {"phase": "phase" in df.columns, "compute": "compute_s" in df.columns,
             "deployable": not only_pareto and "deployable" in df.columns,
             "latency": has_latency(df),
             "tolerance": "within_tolerance" in df.columns
             and not bool(_within_tolerance(df).all())}
    extra["criterion"] = "importance" in df.columns and bool(
        df["importance"].fillna("").astype(str).str.len().gt(0).any())
    if extra["tolerance"]:
        columns.insert(6, ("tolerance", "<"))
    if extra["criterion"]:
        columns.insert(2, ("criterion", "<"))
    if extra["phase"]:
        columns.insert(2, ("phase", "<"))
    if extra["compute"]:
        columns.insert(len(columns) - 1, ("compute", ">"))
    if extra["deployable"]:
        columns.insert(len(columns) - 1, ("deployable", "<"))
    if extra["latency"]:  # measured on the frontier points: before the checkpoint column
        batch = int(df["latency_batch"].dropna().iloc[0])
        columns[-1:-1] = [("ms b1", ">"), (f"ms b{batch}", ">")]
    if not only_pareto:
        columns.insert(0, ("pareto", "<"))
    rows = []
    within = _within_tolerance(df).tolist()
    for rec, ok in zip(df.to_dict("records"), within, strict=True):
        row = _table_row(rec, baseline)
        if extra["tolerance"]:
            row.insert(6, "within" if ok else "past")
        if extra["criterion"]:
            row.insert(2, str(rec.get("importance") or "-"))
        if extra["phase"]:
            row.insert(2, str(rec.get("phase") or "-"))
        if extra["compute"]:
            row.insert(len(row) - 1, compute_text(rec.get("compute_s"), rec.get("compute_unit")))
        if extra["deployable"]:
            row.insert(len(row) - 1, "yes" if rec.get("deployable") else "no")
        if extra["latency"]:
            row[-1:-1] = [_fmt(rec.get("latency_ms"), ".2f"),
                          _fmt(rec.get("latency_batch_ms"), ".2f")]
        rows.append(row if only_pareto else ["*" if rec["pareto"] else "", *row])
    headers = [name for name, _ in columns]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    sides = [side for _, side in columns]
    lines = [_align(headers, widths, sides), "  ".join("-" * w for w in widths)]
    lines += [_align(r, widths, sides) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def compute_text(seconds: Any, unit: Any) -> str:
    """Compute seconds as "12.3 cpu-s" / "4.1K gpu-s"; "-" when not measured."""
    try:
        value = float(seconds)
    except (TypeError, ValueError):
        return "-"
    if math.isnan(value):
        return "-"
    return f"{human(value)} {unit if isinstance(unit, str) and unit else 'cpu'}-s"


def _align(cells: list[str], widths: list[int], sides: list[str]) -> str:
    parts = []
    for cell, width, side in zip(cells, widths, sides, strict=True):
        parts.append(cell.ljust(width) if side == "<" else cell.rjust(width))
    return "  ".join(parts)


def _fmt(value: Any, spec: str) -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "-"
    return "-" if math.isnan(v) else format(v, spec)


def _pct_less(value: Any, base: float) -> str:
    if not base > 0:
        return "-"
    return _fmt(100.0 * (1.0 - float(value) / base), ".1f")


def _table_row(rec: dict, baseline: dict | None) -> list[str]:
    base_acc = _baseline_value(baseline, "accuracy")
    d_acc = float(rec["accuracy"]) - base_acc
    rnd = rec.get("round")
    ckpt = rec.get("frontier_checkpoint") or rec.get("checkpoint")  # the collected copy if any
    return [
        str(rec.get("trial_id", "")),
        "-" if rnd is None or pd.isna(rnd) else str(int(rnd)),
        _fmt(rec["accuracy"], ".2f"),
        _fmt(d_acc, "+.2f"),
        human(float(rec["flops"])),
        _pct_less(rec["flops"], _baseline_value(baseline, "flops")),
        human(float(rec["params"])) if "params" in rec else "-",
        _pct_less(rec["params"], _baseline_value(baseline, "params")) if "params" in rec else "-",
        "" if ckpt is None or (isinstance(ckpt, float) and math.isnan(ckpt)) else str(ckpt),
    ]


# ---------------------------------------------------------------------------------------------
# Checkpoints


def frontier_checkpoint_name(trial_id: Any, round_: Any) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", str(trial_id)) or "trial"
    return f"{safe}_round{int(round_)}.pt"


def collect_checkpoints(df: pd.DataFrame, run_dir: str) -> pd.DataFrame:
    """Copy each pareto row's checkpoint to <run_dir>/frontier/<trial_id>_round<k>.pt, and
    remove the copies an earlier frontier of this run left there (a resumed search's frontier
    replaces the old one; no stale model stays next to it).

    Returns a copy of df with `frontier_checkpoint` (the destination; "" for non-pareto rows
    and for pareto rows that recorded no checkpoint). A recorded checkpoint that does not exist
    raises FileNotFoundError.
    """
    out = _ensure_marked(df, None).copy()
    dests = [""] * len(out)
    for i, rec in enumerate(out.to_dict("records")):
        src = rec.get("checkpoint")
        if not bool(rec["pareto"]) or not isinstance(src, str) or not src:
            continue
        dest = join_path(
            run_dir, FRONTIER_DIR, frontier_checkpoint_name(rec["trial_id"], rec["round"])
        )
        _copy_file(src, dest)
        dests[i] = dest
    out["frontier_checkpoint"] = dests
    _remove_stale_copies(join_path(run_dir, FRONTIER_DIR), {d for d in dests if d})
    return out


def _copy_file(src: str, dest: str) -> None:
    if not storage.is_file(src):
        raise FileNotFoundError(f"checkpoint not found: {src}")
    storage.write_bytes(dest, storage.read_bytes(src))


def _remove_stale_copies(folder: str, keep: set[str]) -> None:
    kept = {posixpath.basename(path.replace(os.sep, "/")) for path in keep}
    for info in storage.list_dir(folder):
        if info.is_file and info.base_name.endswith(".pt") and info.base_name not in kept:
            storage.remove(join_path(folder, info.base_name))
