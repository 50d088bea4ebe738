"""Streaming interactive generation from any generator checkpoint, and --eval, the benchmark
(DESIGN section 9).

    python sample.py --ckpt=out/longtune.pt --events=right@0,up@24,left@48 --frames=96 --out=out/sample.gif
    python sample.py --eval --ckpts=out/student.pt,out/longtune.pt --seeds=8 --json=out/eval.json

Generation streams chunk by chunk through the KV cache (sink + rolling window) and writes each
chunk to the GIF/MP4 as it comes, so memory stays constant for any length. --eval runs the same
videos (schedules x seeds) through every checkpoint and prints the world metrics with 95%
intervals over seeds.
"""
import json
import re
import math
import os
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch

import distill
from model import BadInput, KVCache, build, cli, load_checkpoint, pick_device, rollout
from world import World, batch_metrics, parse_schedule, schedule_events

METRICS = ["follow", "latency", "identity", "jumps", "valid", "drift", "bias"]


@dataclass
class SampleConfig:
    preset: str = "tiny"
    device: str = "auto"
    ckpt: str = "out/longtune.pt"
    events: str = "right@0,up@24,left@48"
    frames: int = 96
    out: str = "out/sample.gif"
    seed: int = 0
    switch_cache: str = "recache"
    eval: bool = False
    ckpts: str = ""                # --eval: comma-separated checkpoints (default: --ckpt)
    schedule_file: str = ""        # --eval: JSON list of schedule strings, each --frames long
    seeds: int = 8
    first_seed: int = 0            # --eval: seeds first_seed .. first_seed + seeds - 1 (tune on some, report on fresh ones)
    pool: bool = True              # --eval: pool checkpoints named NAME_s<k>.pt (training seeds) into one row NAME
    json: str = ""
    live: bool = False


PRESETS = {"tiny": {}, "small": {}}


def load_generator(path, device):
    """Any causal generator checkpoint (student or long-tuned) -> (model, streaming settings)."""
    ck = load_checkpoint(path, ["student", "longtune"], "python distill.py (or python longtune.py)")
    g = dict(ck["config"])
    g["levels"] = distill.student_levels(distill.DistillConfig(levels=g["levels"], shift=g["shift"]), device)
    g["world"] = World(**{k: ck["teacher_config"][k] for k in ("size", "sprite", "speed", "rho")})
    g["window"] = ck["teacher_config"]["frames"]
    return build(ck, "ema", device).eval(), g


def check_frames(frames, chunk):
    if frames <= 0:
        raise BadInput(f"--frames must be a positive number of frames, not {frames}")
    if frames % chunk:
        raise BadInput(f"--frames={frames} must be a multiple of the generator's chunk of {chunk} frames")


def builtin_schedules(W):
    """(group, schedule, frames) in units of the teacher window W: one switch, several, and long horizons."""
    one = [(a, b) for a, b in (("right", "up"), ("down", "left"), ("left", "down"), ("up", "right"))]
    return ([("switch", f"{a}@0,{b}@{2 * W}", 4 * W) for a, b in one]
            + [("multi", f"right@0,down@{W + W // 2},left@{3 * W},up@{4 * W + W // 2}", 6 * W),
               ("multi", f"up@0,left@{W},down@{2 * W},right@{3 * W},stay@{4 * W}", 6 * W)]
            + [("long", f"left@0,up@{3 * W},right@{6 * W}", 8 * W), ("long", f"down@0,right@{4 * W}", 8 * W),
               ("long", "right@0", 8 * W)])


@torch.no_grad()
def generate(model, g, ev, noise_seed, switch, on_chunk=None):
    """Stream the videos for per-frame events ev (B,T). noise_seed fixes the initial noise per
    video and the re-noising draws. on_chunk(x) sees each chunk as it is made."""
    B, T = ev.shape
    S, ch = g["size"], g["chunk"]
    gens = [torch.Generator().manual_seed(int(s)) for s in noise_seed]
    noise = torch.stack([torch.randn(T, 3, S, S, generator=gn) for gn in gens]).to(ev.device)
    torch.manual_seed(int(noise_seed[0]))
    cache, outs, times = KVCache(g["n_sink"], g["n_window"]), [], []
    for i in range(0, T, ch):                                    # rollout chunk by chunk = one long rollout
        t = time.perf_counter()
        x = rollout(model, noise[:, i:i + ch], ev[:, i:i + ch], g["levels"], ch, cache, switch=switch)
        if x.device.type == "cuda":
            torch.cuda.synchronize()                             # time the work, not the launch
        times.append(time.perf_counter() - t)
        (on_chunk or outs.append)(x.cpu())
    return (torch.cat(outs, 1) if outs else None), times


def schedule_tensor(text, frames, chunk, B, device):
    return schedule_events(parse_schedule(text, frames), frames, chunk)[None].expand(B, frames).to(device)


def sample_one(cfg, device):
    import imageio.v2 as imageio
    model, g = load_generator(cfg.ckpt, device)
    check_frames(cfg.frames, g["chunk"])
    ev = schedule_tensor(cfg.events, cfg.frames, g["chunk"], 1, device)
    if not cfg.out.endswith((".gif", ".mp4")):
        raise BadInput(f"--out must end in .gif or .mp4, not {cfg.out!r}")
    try:
        os.makedirs(os.path.dirname(cfg.out) or ".", exist_ok=True)
        writer = (imageio.get_writer(cfg.out, fps=8, macro_block_size=1) if cfg.out.endswith(".mp4")
                  else imageio.get_writer(cfg.out, duration=125, loop=0))
    except OSError as e:
        raise BadInput(f"cannot write {cfg.out}: {e.strerror or e}") from None
    strip, every = [], max(1, cfg.frames // 16)

    def write(x):                                                # (1,chunk,3,S,S) -> frames appended as they come
        for f in x[0]:
            a = ((f.float().clamp(-1, 1) + 1) * 127.5).round().byte()
            a = a.repeat_interleave(4, -1).repeat_interleave(4, -2).permute(1, 2, 0).numpy()
            writer.append_data(a)
            if write.n % every == 0 and len(strip) < 16:
                strip.append(a)
            write.n += 1
    write.n = 0
    _, times = generate(model, g, ev, [cfg.seed], cfg.switch_cache, on_chunk=write)
    writer.close()
    png = os.path.splitext(cfg.out)[0] + ".png"
    imageio.imwrite(png, np.concatenate(strip, 1))
    steady = times[1:] or times
    print(f"{cfg.frames} frames -> {cfg.out} and {png} | {g['chunk'] * len(steady) / sum(steady):.1f} frames/s "
          f"| first chunk {times[0] * 1000:.1f} ms | device {device}")


def evaluate(cfg, device):
    paths = [p for p in (cfg.ckpts or cfg.ckpt).split(",") if p]
    gens = [load_generator(p, device) for p in paths]
    chunk, W = gens[0][1]["chunk"], gens[0][1]["window"]
    if cfg.seeds <= 0:
        raise BadInput(f"--seeds must be positive, not {cfg.seeds}")
    if cfg.schedule_file:
        try:
            items = json.load(open(cfg.schedule_file))
        except (OSError, ValueError) as e:
            raise BadInput(f"cannot read --schedule_file {cfg.schedule_file}: {e}") from None
        if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
            raise BadInput(f"--schedule_file {cfg.schedule_file} must hold a JSON list of schedule strings")
        check_frames(cfg.frames, chunk)
        schedules = [("file", s, cfg.frames) for s in items]
    else:
        schedules = builtin_schedules(W)
    for _, s, n in schedules:
        parse_schedule(s, n)                                     # every schedule is checked before any work
    seeds = list(range(cfg.first_seed, cfg.first_seed + cfg.seeds))
    result, pooled = {}, {}
    for path, (model, g) in zip(paths, gens):
        row = re.sub(r"_s\d+(\.pt)$", r"\1", path) if cfg.pool else path   # NAME_s1.pt -> NAME.pt
        per = {}                                                 # (group, metric) -> (seeds, schedules) values
        for j, (group, text, n) in enumerate(schedules):
            ev = schedule_tensor(text, n, g["chunk"], len(seeds), device)
            x, _ = generate(model, g, ev, [1000 * j + s for s in seeds], cfg.switch_cache)
            m = batch_metrics(x, ev.cpu(), g["world"], first=g["chunk"])
            for k in METRICS:
                for grp in (group, "all"):
                    per.setdefault((grp, k), []).append(m[k])
        for key, vals in per.items():                            # rows: (schedules, seeds x training seeds)
            pooled.setdefault(row, {}).setdefault(key, []).append(np.array(vals, dtype=float))
    for row, per in pooled.items():
        result[row] = {}
        for (grp, k), vals in per.items():
            vals = np.concatenate(vals, axis=1)
            with warnings.catch_warnings():                      # a metric that applies to none of a seed's videos is nan
                warnings.simplefilter("ignore", RuntimeWarning)
                v = np.nanmean(np.array(vals, dtype=float), axis=0)  # per seed, mean over the group's schedules
            v = v[~np.isnan(v)]
            half = 1.96 * v.std(ddof=1) / math.sqrt(len(v)) if len(v) > 1 else float("nan")
            result[row].setdefault(grp, {})[k] = dict(mean=float(v.mean()) if len(v) else float("nan"), ci95=float(half))
    for grp in next(iter(result.values())):
        print(f"\n{grp} schedules (seeds {seeds[0]}-{seeds[-1]}; mean +- 95% interval over seeds, pooled over the"
              f" training seeds of a row)")
        print("| checkpoint | " + " | ".join(METRICS) + " |\n|---|" + "---:|" * len(METRICS))
        for p, res in result.items():
            r = res[grp]
            print(f"| {p} | " + " | ".join(f"{r[k]['mean']:.3f} +- {r[k]['ci95']:.3f}" for k in METRICS) + " |")
    if cfg.json:
        with open(cfg.json, "w") as f:
            json.dump(dict(schedules=schedules, seeds=seeds, results=result), f, indent=1)
        print(f"wrote {cfg.json}")
    return result


def main(cfg):
    device = pick_device(cfg.device)
    if cfg.switch_cache not in ("recache", "keep", "clear"):
        raise BadInput(f"--switch_cache must be recache, keep or clear, not {cfg.switch_cache!r}")
    if cfg.live:
        raise BadInput("--live is not built yet (issue 7); use --events to steer with a schedule")
    return evaluate(cfg, device) if cfg.eval else sample_one(cfg, device)


if __name__ == "__main__":
    cli(main, SampleConfig, PRESETS)
