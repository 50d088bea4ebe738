"""The statistics protocol of the benchmark. The unit of a training method's result is the training seed:
a row's figure is the mean over its training seeds of each seed's mean over the same videos, with a t interval
over training seeds (n - 1 degrees of freedom), and a claim is a row's paired difference against a reference
row, seed by seed on the same videos. The interval over evaluation seeds is evaluation noise only."""
import math
import os
import re

import numpy as np

from config import BadInput


def interval(vals):
    """Evaluation noise. vals (schedules, seeds): mean over a seed's schedules, then mean +- 95% normal interval
    over evaluation seeds; a seed whose videos the metric applies to none of (all nan) is left out."""
    v = np.array([c[~np.isnan(c)].mean() for c in np.array(vals, dtype=float).T if not np.isnan(c).all()])
    half = 1.96 * v.std(ddof=1) / math.sqrt(len(v)) if len(v) > 1 else float("nan")
    return dict(mean=float(v.mean()) if len(v) else float("nan"), ci95=float(half))


def t_quantile(p, df):
    """Student's t quantile (p > 0.5) with df degrees of freedom: bisection on the CDF, integrated numerically."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    cdf = lambda x: 0.5 + np.trapezoid(c * (1 + np.linspace(0, x, 20001) ** 2 / df) ** (-(df + 1) / 2), dx=x / 20000)
    lo, hi = 0.0, 1000.0
    for _ in range(60):
        lo, hi = ((lo + hi) / 2, hi) if cdf((lo + hi) / 2) < p else (lo, (lo + hi) / 2)
    return (lo + hi) / 2


def t_interval(v):
    """Mean +- 95% t interval (n - 1 degrees of freedom) of values that are independent replicates."""
    v = np.asarray([x for x in v if not math.isnan(x)], dtype=float)
    half = t_quantile(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)) if len(v) > 1 else float("nan")
    return dict(mean=float(v.mean()) if len(v) else float("nan"), ci95=float(half), n=len(v))


def seed_cells(per_ckpt, rows):
    """per_ckpt: {path: {(group, metric): (schedules, seeds) values}}, rows: {row: [paths]} -> {row: {group: {metric:
    {path: cell}}}}, a checkpoint's cell its mean over the videos with the evaluation noise (n_react: its total)."""
    out = {}
    for row, paths in rows.items():
        for grp, k in per_ckpt[paths[0]]:
            out.setdefault(row, {}).setdefault(grp, {})[k] = {
                p: dict(total=float(np.nansum(per_ckpt[p][grp, k]))) if k == "n_react" else interval(per_ckpt[p][grp, k])
                for p in paths}
    return out


def seed_of(path):
    """A checkpoint's training seed: NAME_s<k>.pt -> "k"; a checkpoint without one (the student) -> its path."""
    return (re.findall(r"_s(\d+)\.pt$", path) or [path])[0]


def rows_over_seeds(cells, references=()):
    """{row: {group: {metric: {path: cell}}}} (seed_cells, merge) -> {row: {group: {metric: cell}}}, a cell the t
    interval over the row's checkpoints (training seeds) of each one's mean, with `seeds` (each checkpoint's mean
    and evaluation noise) and `diff`: {reference: the paired difference} for each named reference row but the row
    itself. A reference of one checkpoint with no _s<k> suffix (the student) is paired with every seed; otherwise
    seeds pair by their _s<k> suffix, and a seed the reference lacks is left out."""
    out = {row: {grp: {k: dict(total=sum(c["total"] for c in ck.values())) if k == "n_react"
                       else dict(t_interval([c["mean"] for c in ck.values()]), seeds=ck)
                       for k, ck in metrics.items()} for grp, metrics in groups.items()} for row, groups in cells.items()}
    for reference in references:
        if reference not in out:
            raise BadInput(f"--reference={reference} names no row; rows: {', '.join(out)}")
        for row, groups in out.items():
            for grp, metrics in groups.items():
                for k, cell in metrics.items():
                    if k == "n_react" or row == reference:
                        continue
                    base = {seed_of(p): c["mean"] for p, c in out[reference][grp][k]["seeds"].items()}
                    one = len(base) == 1 and not next(iter(base)).isdigit()   # one checkpoint, no seed: every seed's
                    d = [c["mean"] - (next(iter(base.values())) if one else base[seed_of(p)])
                         for p, c in cell["seeds"].items() if one or seed_of(p) in base]
                    cell.setdefault("diff", {})[reference] = t_interval(d)
    return out


def summarize_rows(per_ckpt, rows, references=()):
    """The benchmark's rows from its scores: rows_over_seeds(seed_cells(per_ckpt, rows), references)."""
    return rows_over_seeds(seed_cells(per_ckpt, rows), references)


def merge(results):
    """The results of several evaluations of the same videos (each JSON's "results") -> seed cells for rows_over_seeds,
    a row by its file name, so parts run in different folders pool into one row; a training seed (or a seedless
    checkpoint) that two of them score for the same row is refused."""
    cells = {}
    for res in results:
        for row, groups in res.items():
            name = os.path.basename(row)
            for grp, metrics in groups.items():
                for k, cell in metrics.items():
                    into = cells.setdefault(name, {}).setdefault(grp, {}).setdefault(k, {})
                    for p, c in ({row: dict(total=cell["total"])} if k == "n_react" else cell["seeds"]).items():
                        if k != "n_react" and seed_of(p) in {seed_of(q) for q in into}:
                            raise BadInput(f"row {name} has {p} twice (training seed {seed_of(p)}): merge each part once")
                        into[p] = c
    return cells
