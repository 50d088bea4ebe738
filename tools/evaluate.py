"""The evaluation in one place: the benchmark over schedules and seeds, and three probes.

    python -m tools.evaluate --ckpts=out/longtune_s0.pt,out/longtune_s1.pt --first_seed=100 --seeds=16 --svg=out/f.svg
    python -m tools.evaluate --merge=part1/final.json,part2/final.json --reference=longtune.pt --md=out/pooled.md
    python -m tools.evaluate --probe=react --teacher=out/teacher.pt --ckpts=out/student.pt --seeds=4
    python -m tools.evaluate --probe=failures --ckpts=out/longtune_s0.pt,out/deltaforcing_s0.pt --first_seed=100 --seeds=16
    python -m tools.evaluate --probe=clips --ckpts=out/teacher.pt,out/student.pt --first_seed=777 --seeds=8

The benchmark scores every checkpoint on the same videos with the world's exact metrics. The unit of a training
method is the training seed: checkpoints NAME_s<k>.pt are one row NAME, whose figure is the mean over its training
seeds of each seed's mean over the videos, with a t interval over training seeds; each seed's own row carries the
evaluation noise (an interval over evaluation seeds); with --reference=NAME[,NAME] every row also gets its paired difference
against each NAME, seed by seed on the same videos, with a t interval. Tables to the terminal and --md, every number to --json,
the frontier (react against identity failures and against pull; tools/plot.py) to --svg; --merge pools the rows of
benchmarks run apart (parts of a table, each in its own folder) as if they had been one. The probes: react (does
a model turn when the event switches?), failures (how a generator loses the sprite after a switch) and clips
(checkpoints on the teacher's own evaluation clips, scored as training scores them at its end).
"""

import sys

if not __package__:   # run as a file, the stages are not on the path: say how to run it
    print("run it from the repository root as: python -m tools.evaluate [--key=value ...]", file=sys.stderr)
    sys.exit(2)

import json
import os
import re
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

import distill
import teacher as teacher_stage
from common import autocast, check_file, load_checkpoint, pick_device
from config import BadInput, Config, Count, OneOf, SwitchCache, Whole, cli
from model import add_noise, build
from streaming import KVCache, rollout, stream
from sample import check_frames, generate, load_generator, schedule_tensor
from metrics import batch_metrics, look, segments, switches, track
from world import EVENTS, World, ordered_pairs, parse_schedule, sample_videos
from tools.plot import frontier_svg
from tools.stats import merge, rows_over_seeds, summarize_rows

METRICS = ["react", "latency", "follow", "identity", "identity_free", "bias", "pull", "jumps", "valid", "drift"]


@dataclass
class EvalConfig(Config):
    ckpts: str = "out/longtune.pt"  # comma-separated generator checkpoints, one row (or pooled row) each
    probe: OneOf("none", "react", "failures", "clips") = "none"   # none: the benchmark | react | failures | clips (see the top)
    teacher: str = "out/teacher.pt"   # --probe=react and clips: the teacher checkpoint
    weights: OneOf("ema", "model") = "ema"   # ema | model (the raw weights)
    schedule_file: str = ""        # a JSON list of schedule strings, each --frames long (default: the built-in set)
    frames: Count = 96             # --schedule_file: the length of its videos
    seeds: Count = 8               # evaluation seeds (--probe=react: clips per ordered pair)
    first_seed: Whole = 0          # seeds first_seed .. first_seed + seeds - 1 (tune on some, report on fresh ones)
    drawn: bool = False            # add the drawn group: 20 schedules by a fixed rule and seed, a row of its own, not in "all" (the final table)
    pool: bool = True              # checkpoints named NAME_s<k>.pt (training seeds) make one row NAME
    merge: str = ""                # comma-separated JSONs of earlier benchmarks of the same videos: their rows pooled by file name
                                   # (parts run in different folders make one row), instead of scoring --ckpts
    reference: str = ""            # rows (NAME.pt, or a checkpoint path; comma-separated): every row's paired difference against each
    switch_cache: SwitchCache = "recache_window"   # at every event switch: recache_window | recache | keep | clear
    json: str = ""                 # also write the results here, as JSON
    md: str = ""                   # also append the markdown tables to this file
    svg: str = ""                  # also draw the frontier here, as SVG: react against identity failures and pull
    renamed = {"png": "svg"}


PRESETS = {"tiny": {}, "small": {}}


# ----------------------------------------------------------------------------- the benchmark

def builtin_schedules(W):
    """(group, schedule, frames) in units of the teacher window W: one switch, several, long horizons,
    switches off the chunk grid, and rapid switching."""
    one = [("right", "up"), ("down", "left"), ("left", "down"), ("up", "right")]
    return ([("switch", f"{a}@0,{b}@{2 * W}", 4 * W) for a, b in one]
            + [("multi", f"right@0,down@{W + W // 2},left@{3 * W},up@{4 * W + W // 2}", 6 * W),
               ("multi", f"up@0,left@{W},down@{2 * W},right@{3 * W},stay@{4 * W}", 6 * W)]
            + [("long", f"left@0,up@{3 * W},right@{6 * W}", 8 * W), ("long", f"down@0,right@{4 * W}", 8 * W),
               ("long", "right@0", 8 * W)]
            + [("offgrid", f"down@0,right@{2 * W - 3},up@{3 * W + 1}", 4 * W),
               ("offgrid", f"up@0,left@{W + 1},down@{3 * W - 1}", 4 * W)]
            + [("rapid", f"right@0,up@{2 * W},left@{2 * W + 4},down@{2 * W + 8},right@{2 * W + 12}", 4 * W),
               ("rapid", f"left@0,down@{W},right@{W + 4},up@{W + 8},left@{W + 12}", 3 * W)])


def drawn_schedules(W, n=20, seed=2026):
    """(group "drawn", schedule, frames): n schedules of 8 W frames drawn by a fixed rule and seed, fixed before
    any run was scored on them. Schedule i opens with the i-th ordered pair of the five events and switches
    1 + i % 8 times, at frames drawn anywhere (off the chunk and window grids), each switch to another event."""
    gen, pairs, out = torch.Generator().manual_seed(seed), ordered_pairs(), []
    for i in range(n):
        k = 1 + i % 8
        at = sorted((1 + torch.randperm(8 * W - 1, generator=gen)[:k]).tolist())
        ev = list(pairs[i % len(pairs)])
        while len(ev) <= k:
            ev.append((ev[-1] + 1 + int(torch.randint(len(EVENTS) - 1, (), generator=gen))) % len(EVENTS))
        out.append(("drawn", ",".join(f"{EVENTS[e]}@{t}" for e, t in zip(ev, [0] + at)), 8 * W))
    return out


def eval_schedules(cfg, g):
    """The schedules of an evaluation, checked against generator g: --schedule_file's, or the built-in set."""
    schedules = builtin_schedules(g.stream["window"]) + (drawn_schedules(g.stream["window"]) if cfg.drawn else [])
    if cfg.schedule_file:
        try:
            items = json.load(open(cfg.schedule_file))
        except (OSError, ValueError) as e:
            raise BadInput(f"cannot read --schedule_file {cfg.schedule_file}: {e}") from None
        if not isinstance(items, list) or not items or not all(isinstance(s, str) for s in items):
            raise BadInput(f"--schedule_file {cfg.schedule_file} must hold a non-empty JSON list of schedule strings")
        schedules = [("file", s, cfg.frames) for s in items]
    for _, text, n in schedules:
        check_frames(n, g.chunk)
        parse_schedule(text, n)
    return schedules


def schedule_videos(g, schedules, seeds, switch):
    """Every schedule x seed through one generator (video seed 1000 j + s for schedule j) -> yields
    (group, events (B,T) on the CPU, videos (B,T,...))."""
    for j, (group, text, n) in enumerate(schedules):
        ev = schedule_tensor(text, n, g.chunk, len(seeds), "cpu")
        yield group, ev, generate(g, ev, [1000 * j + s for s in seeds], switch)


def score(g, schedules, seeds, switch):
    """Every schedule x seed through one generator -> {(group, metric): (schedules, seeds) values}; the group
    "all" holds the built-in (or --schedule_file) schedules, not the drawn group, which is its own row."""
    per = {}
    for group, ev, x in schedule_videos(g, schedules, seeds, switch):
        m = batch_metrics(x, ev, g.world, first=g.chunk, chunk=g.chunk)
        for k in METRICS + ["n_react"]:
            for grp in (group,) if group == "drawn" else (group, "all"):
                per.setdefault((grp, k), []).append(m[k])
    return per


def markdown(result, seeds, switch, references=()):
    """Per group: each row (mean +- t interval over its training seeds, n seeds), its seeds' rows (mean +- the
    evaluation noise), and with a reference its paired difference (mean +- t interval over training seeds)."""
    f = lambda c: f"{c['mean']:.3f} +- {c['ci95']:.3f}"
    lines = []
    for grp in next(iter(result.values())):
        lines += [f"\n**{grp} schedules** (evaluation seeds {seeds[0]}-{seeds[-1]}, switch cache {switch}; a row: mean "
                  "+- 95% t interval over its training seeds; a seed: +- the evaluation noise over evaluation seeds"
                  + ("; paired: the row minus a reference, seed by seed" if references else "") + ")\n",
                  "| row | seeds | " + " | ".join(METRICS) + " |", "|---|---:|" + "---:|" * len(METRICS)]
        for row, r in result.items():
            lines.append(f"| **{row}** | {r[grp][METRICS[0]]['n']} | " + " | ".join(f(r[grp][k]) for k in METRICS) + " |")
            if len(r[grp][METRICS[0]]["seeds"]) > 1:
                lines += [f"| {p} | | " + " | ".join(f(r[grp][k]["seeds"][p]) for k in METRICS) + " |"
                          for p in r[grp][METRICS[0]]["seeds"]]
            for ref in references:
                if ref != row and r[grp][METRICS[0]]["diff"][ref]["n"]:   # n = 0: no seed in common
                    lines.append(f"| {row} - {ref}, paired | {r[grp][METRICS[0]]['diff'][ref]['n']} | " + " | ".join(
                        f"{r[grp][k]['diff'][ref]['mean']:+.3f} +- {r[grp][k]['diff'][ref]['ci95']:.3f}" for k in METRICS) + " |")
    return "\n".join(lines)


def listed(text):
    """A comma-separated flag's items."""
    return [p.strip() for p in text.split(",") if p.strip()]


def benchmark(cfg, paths, models):
    """Every checkpoint on the same videos -> the rows (a row NAME pools NAME_s<k>.pt), reported."""
    schedules = eval_schedules(cfg, models[0])
    seeds = list(range(cfg.first_seed, cfg.first_seed + cfg.seeds))
    rows = {}
    for path in paths:
        rows.setdefault(re.sub(r"_s\d+(\.pt)$", r"\1", path) if cfg.pool else path, []).append(path)   # NAME_s1.pt -> NAME.pt
    references = listed(cfg.reference)
    for ref in references:                                        # before any work
        if ref not in rows:
            raise BadInput(f"--reference={ref} names no row; rows: {', '.join(rows)}")
    per_ckpt = {p: score(g, schedules, seeds, cfg.switch_cache) for p, g in zip(paths, models)}
    return report(cfg, summarize_rows(per_ckpt, rows, references), schedules, seeds, cfg.switch_cache, references)


def merged(cfg):
    """--merge: the rows of earlier benchmarks' JSONs (the same schedules and seeds), pooled by file name, reported."""
    runs = []
    for path in listed(cfg.merge):
        try:
            runs.append(json.load(open(path)))
        except (OSError, ValueError) as e:
            raise BadInput(f"cannot read --merge {path}: {e}") from None
        if not isinstance(runs[-1], dict) or not {"schedules", "seeds", "results"} <= set(runs[-1]):
            raise BadInput(f"--merge {path} is not a benchmark's JSON (tools.evaluate --json)")
        if (runs[-1]["schedules"], runs[-1]["seeds"]) != (runs[0]["schedules"], runs[0]["seeds"]):
            raise BadInput(f"--merge {path} scored other schedules or seeds than {cfg.merge.split(',')[0]}")
    references = [os.path.basename(r) for r in listed(cfg.reference)]
    result = rows_over_seeds(merge([r["results"] for r in runs]), references)
    switch = runs[0].get("switch_cache", cfg.switch_cache)        # what the parts were scored with
    return report(cfg, result, runs[0]["schedules"], runs[0]["seeds"], switch, references)


def report(cfg, result, schedules, seeds, switch, references):
    """The rows to the terminal and to --md (appended), --json and --svg."""
    text = markdown(result, seeds, switch, references)
    print(text)
    if cfg.md:
        with open(cfg.md, "a") as f:                             # appends: one file can collect several runs
            f.write(text + "\n")
        print(f"appended the tables to {cfg.md}")
    if cfg.json:
        with open(cfg.json, "w") as f:
            json.dump(dict(schedules=schedules, seeds=seeds, switch_cache=switch, results=result), f, indent=1)
        print(f"wrote {cfg.json}")
    if cfg.svg:
        frontier_svg(cfg.svg, result, note=f"seeds {seeds[0]}-{seeds[-1]}, switch cache {switch}; "
                                           "intervals over training seeds")
        print(f"wrote {cfg.svg}")
    return result


# ----------------------------------------------------------------------------- the probes

def real_clips(w, T, t0, seeds, seed):
    """For every ordered pair of the moving events and seed, a real clip moving with the old event, and
    events that switch to the new one at frame t0 -> x (N,T,...), ev (N,T)."""
    pairs = torch.tensor([p for p in ordered_pairs(4) for _ in range(seeds)])
    x, _, _ = sample_videos(w, pairs[:, :1].expand(-1, T), torch.Generator().manual_seed(seed), rho=None)
    return x, torch.cat([pairs[:, :1].expand(-1, t0), pairs[:, 1:].expand(-1, T - t0)], 1)


def teacher_probe(tck, cfg, device):
    """Share of clips the teacher turns within a chunk of the switch, as `react` counts it: the first half of
    its window a real clip (inpainted: those frames replaced by the real ones re-noised to the current level
    at every Euler step), the new event's label the rest."""
    tc, w = tck["config"], World(**tck["world"])
    model = build(tck["model_args"], tck["ema"], device).eval()   # the teacher's EMA weights, as every stage uses
    T, H = tc["frames"], tc["frames"] // 2                        # H frames of real history, inpainted
    x_real, ev = real_clips(w, T, H, cfg.seeds, cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    x, ctx = torch.randn(x_real.shape, generator=gen).to(device), x_real[:, :H].to(device)
    sig = teacher_stage.euler_grid(tc["sample_steps"], tc["sample_shift"]).to(device)
    for i in range(len(sig) - 1):                                 # Euler + CFG, the context inpainted by replacement
        x[:, :H] = add_noise(ctx, torch.randn(ctx.shape, generator=gen).to(device), sig[i].expand(len(x), H))
        with autocast(device):
            x = teacher_stage.sample(model, ev.to(device), x, sig[i:i + 2], tc["guidance"]).float()
    return float(np.mean(batch_metrics(x.cpu(), ev, w, chunk=tc["chunk"])["react"]))


def generator_probe(g, cfg, switch):
    """Share of clips a generator turns within one chunk, as `react` counts it: a real clip written clean into
    its KV cache under the old event, then one chunk generated under the new one, `switch` the cache handling."""
    s, device = g.stream, next(g.model.parameters()).device
    H, ch = s["window"] - g.chunk, g.chunk                        # history: all but one chunk of a teacher window
    x_real, ev = real_clips(g.world, H + ch, H, cfg.seeds, cfg.seed)
    cache = KVCache(s["n_sink"], s["n_window"])
    with autocast(device):
        for i in range(0, H, ch):                                 # the real history, written clean under the old event
            f = x_real[:, i:i + ch].to(device)
            stream(g.model, f, torch.zeros(f.shape[:2], device=device), ev[:, i:i + ch].to(device), cache, write=True)
        gen = torch.Generator().manual_seed(cfg.seed + 2)
        out = rollout(g.model, torch.randn(len(ev), ch, *x_real.shape[2:], generator=gen).to(device),
                      ev[:, H:].to(device), s["sigmas"], ch, cache, switch=switch, gen=gen).float().cpu()
    return float(np.mean(batch_metrics(torch.cat([x_real[:, :H], out], 1), ev, g.world, chunk=ch)["react"]))


def clip_probe(path, tck, cfg, device):
    """One checkpoint, teacher or generator, on 16 x --seeds one-event and as many switch clips of the teacher's
    (noise seed --first_seed) -> metrics, as training scores them at its end (seed 1234: report on fresh ones)."""
    ck = load_checkpoint(path, ["teacher", "student", "longtune"], "python teacher.py")
    model, n = build(ck["model_args"], ck[cfg.weights], device).eval(), 16 * cfg.seeds
    if ck["stage"] == "teacher":
        return teacher_stage.evaluate(model, teacher_stage.TeacherConfig(**ck["config"]), n, device, cfg.first_seed)[0]
    return distill.evaluate(model, ck["stream"], tck, n, device, cfg.first_seed)[0]


def failure_kind(tr, before, after):
    """One switch: 'kept', or how the first frame unlike the segment before it came about: a new colour or
    background at once, or after a dissolve (two or more frames without a valid sprite first)."""
    ref = look(tr, before)
    bad = [t for t in after if (tr["color_id"][t], tr["bg_id"][t]) != ref]
    if not bad:
        return "kept"
    last_ok = max([t for t in range(before[0], bad[0]) if tr["valid"][t]], default=before[-1])
    what = "background" if tr["bg_id"][bad[0]] != ref[1] else "colour"
    return f"{what} after a dissolve" if bad[0] - last_ok - 1 >= 2 else f"{what} at once"


def identity_failures(g, cfg):
    """Every switch of the built-in schedules x seeds through one generator -> Counter of failure kinds
    ('no sprite': no valid frame before or after the switch)."""
    c, seeds = Counter(), list(range(cfg.first_seed, cfg.first_seed + cfg.seeds))
    for _, ev, x in schedule_videos(g, builtin_schedules(g.stream["window"]), seeds, cfg.switch_cache):
        for v, e in zip(x, ev.numpy()):
            tr, sw = track(v, g.world), switches(e)
            for before, after in segments(tr["valid"], sw, len(e)):
                c[failure_kind(tr, before, after) if before and after else "no sprite"] += 1
    return c


@torch.no_grad()
def main(cfg):
    if cfg.probe == "none":
        for flag in ("json", "md", "svg"):                       # every check before any work
            check_file(flag, getattr(cfg, flag))
    if cfg.merge:
        if cfg.probe != "none":
            raise BadInput(f"--merge belongs to the benchmark, not to --probe={cfg.probe}")
        return merged(cfg)
    device = pick_device(cfg.device, precision=cfg.precision)
    paths = listed(cfg.ckpts)
    if not paths:
        raise BadInput("--ckpts names no checkpoint")
    if len(set(paths)) < len(paths):
        raise BadInput(f"--ckpts names {next(p for p in paths if paths.count(p) > 1)} twice")
    if cfg.probe != "none" and (cfg.json or cfg.md or cfg.schedule_file or cfg.svg):
        raise BadInput(f"--json, --md, --svg and --schedule_file belong to the benchmark, not to --probe={cfg.probe}")
    tck = load_checkpoint(cfg.teacher, ["teacher"], "python teacher.py") if cfg.probe in ("react", "clips") else None
    models = [load_generator(p, device, cfg.weights) for p in paths] if cfg.probe != "clips" else None
    if cfg.probe == "react":
        n = len(ordered_pairs(4)) * cfg.seeds
        r = teacher_probe(tck, cfg, device)
        print(f"teacher probe ({cfg.teacher}): turned in {round(r * n)}/{n} clips ({r:.2f})")
        for path, g in zip(paths, models):
            for switch in ("recache_window", "recache", "keep", "clear"):
                r = generator_probe(g, cfg, switch)
                print(f"generator probe ({path}, cache {switch}): turned within one chunk in {round(r * n)}/{n} clips ({r:.2f})")
    elif cfg.probe == "clips":
        for path in paths:
            m = clip_probe(path, tck, cfg, device)
            print(f"{path} ({16 * cfg.seeds} + {16 * cfg.seeds} clips, noise seed {cfg.first_seed}): "
                  + " | ".join(f"{k} {v:.3f}" for k, v in m.items()))
    elif cfg.probe == "failures":
        for path, g in zip(paths, models):
            c = identity_failures(g, cfg)
            n = sum(c.values())
            print(f"{path}: {n} switches | " + " | ".join(f"{k} {v} ({v / n:.2f})" for k, v in sorted(c.items())))
    else:
        return benchmark(cfg, paths, models)


if __name__ == "__main__":
    cli(main, EvalConfig, PRESETS)
