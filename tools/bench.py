"""Speed, measured in one run so that ratios compare like with like (machines are noisy).

    python -m tools.bench                       # tiny on CPU, small on a GPU
    python -m tools.bench --compile=on          # also compile on the CPU (slow to compile; checks the code path)
    python -m tools.bench --json=out/bench.json # the rows also as JSON (device, torch, date, one object per row)
    python -m tools.bench --profile=True        # and torch.profiler's top ops: a stream and each training step

Each mode (eager; compiled, on CUDA by default; eager fp32 and bf16 on a CPU that multiplies bf16) times streaming,
the stages' own training steps and the teacher's sampler, on untrained models (weights do not change speed). The modes
are timed in turn, call by call, so that a drifting machine meets them alike. Each row is printed and saved as it is
measured, streaming first, so a run cut short keeps the most (every mode is warmed, and compiled, before the first row).
"""

import sys

if not __package__:   # run as a file, the stages are not on the path: say how to run it
    print("run it from the repository root as: python -m tools.bench [--key=value ...]", file=sys.stderr)
    sys.exit(2)

import json
import os
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, replace

import torch
from torch._dynamo.utils import counters
from torch.utils.flop_counter import FlopCounterMode

import distill
import longtune
import sample
import teacher
import trust_region
from common import BF16, adamw, autocast, check_file, compile_, ema_copy, pick_device, set_precision
from config import Config, Count, OneOf, Whole, cli
from model import build, pred_x0
from streaming import KVCache, rollout
from world import natural_step, teacher_batch

PEAK_BF16 = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
             "4090": 165e12}                                     # dense bf16 tensor-core FLOP/s, from the data sheets


@dataclass
class BenchConfig(Config):
    compile: OneOf("auto", "on", "off") = "auto"   # auto: on CUDA only | on: also on the CPU | off
    big_batch: Count = 16         # the large batch for streaming throughput
    frames: Count = 64            # stream length for cached streaming against recompute (its cost grows as frames^2)
    late: Count = 1000            # per-frame cost is compared at frame 50 and at this frame
    repeats: Count = 3            # rounds of the streaming and teacher-sampler timings (median of streams, best sampler)
    steps: Count = 3              # timed training steps per stage, after two warm-up steps
    threads: Whole = 0            # torch CPU threads; 0 = torch's default
    json: str = ""                # also write the rows here, as JSON
    profile: bool = False         # also print torch.profiler's top ops: a streaming chunk and each training step


PRESETS = {"tiny": {}, "small": dict(big_batch=64)}
TEACHER, DMD, BASELINE, DELTA = ("teacher step", "DMD step (5 critic + 1 generator)", "long-tune step, baseline",
                                 "long-tune step, Delta Forcing")


def clock(fn, device):
    """Seconds of fn() to the end of its work (on CUDA a sync), not to its launch."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def timed(fn, device, repeats=1):
    """Best seconds of fn() over repeats, after one warm-up call."""
    fn()
    return min(clock(fn, device) for _ in range(repeats))


def profile(fn, device, label, top=12):
    """torch.profiler's top ops of one more call of fn: GPU time against launch time tells launch- from compute-bound."""
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    try:
        with torch.profiler.profile() as p:
            clock(fn, device)
        print(f"\nprofile: {label}, top ops by {key}\n" + p.key_averages().table(sort_by=key, row_limit=top), flush=True)
    except Exception as e:                                          # a profile is a bonus: never lose the rows for it
        print(f"profile: {label}: failed ({type(e).__name__}: {e})", flush=True)


def host_syncs(fn):
    """How often fn() makes the host wait for the GPU (.item(), a data-dependent branch, a blocking copy)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        fn()
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def stream_times(g, B, n, device):
    """Seconds of each chunk of one n-frame stream at batch B, through sample.py's own stepper."""
    player, event = sample.Player(g, list(range(B))), torch.zeros(B, g.chunk, dtype=torch.long)
    return [clock(lambda: player.next_chunk(event), device) for _ in range(0, n, g.chunk)]


def early_late_times(g, late, n, device):
    """Seconds per chunk of two streams at batch 1, one at frames 50.. and one at frames late.., timed chunk
    by chunk in turn (a machine that drifts meets both alike). -> (early times, late times), n chunks each."""
    event = torch.zeros(1, g.chunk, dtype=torch.long)
    early, old = sample.Player(g, [0]), sample.Player(g, [1])
    for player, frame in ((early, 50), (old, late)):
        for _ in range(0, frame, g.chunk):
            player.next_chunk(event)
    times = [[clock(lambda: p.next_chunk(event), device) for p in (early, old)] for _ in range(n)]
    return [t[0] for t in times], [t[1] for t in times]


@torch.no_grad()
def recompute_stream(model, noise, event, sigmas, chunk):
    """The baseline without a cache: every denoising step re-runs the whole clean causal prefix."""
    done = []
    for i in range(0, noise.shape[1], chunk):
        x = noise[:, i:i + chunk]
        for k, s in enumerate(sigmas):
            sig = (torch.arange(i + chunk, device=x.device) >= i).float().mul(s).expand(len(x), -1)   # 0 on the prefix
            x0 = pred_x0(x, model(torch.cat(done + [x], 1), sig, event[:, :i + chunk], causal_chunk=chunk)[:, i:], sig[:, i:])
            if k + 1 < len(sigmas):
                x = (1 - sigmas[k + 1]) * x0 + sigmas[k + 1] * torch.randn_like(x0)
        done.append(x0)
    return torch.cat(done, 1)


def train_step_fn(what, tcfg, dcfg, lcfg, device, compiled, seed):
    """A closure running one training step, the stage's own step function on fresh models built as
    the stage builds them. Seeded here, so every call builds and then steps the very same way."""
    torch.manual_seed(seed)
    args, gen = teacher.model_args(tcfg), torch.Generator().manual_seed(seed)
    if what == TEACHER:
        model = build(args, device=device)
        ema = ema_copy(model)
        compile_(model, compiled)
        opt = adamw(model.parameters(), lr=tcfg.lr, betas=(0.9, 0.99), weight_decay=tcfg.weight_decay)
        x, ev = (a.to(device) for a in teacher_batch(teacher.world_of(tcfg), tcfg.batch, tcfg.frames, gen, tcfg.chunk))
        return lambda: teacher.train_step(model, ema, opt, x, ev, step=0, cfg=tcfg)
    stream_ = distill.stream_args(dcfg, tcfg.frames)
    nets = distill.dmd_nets(args, teacher=None, student=None, critic=None, cfg=dcfg if what == DMD else lcfg,
                            device=device, compiled=compiled)
    if what == DMD:
        return lambda: distill.dmd_update(nets, dcfg, sigmas=stream_["sigmas"], gen=gen,
                                          shape=(dcfg.batch, tcfg.frames, tcfg.size))
    lc = replace(lcfg, trust_region=what == DELTA)
    streams = longtune.Streams(lc, stream_, tcfg.size, gen, device, lc.batch)
    m = natural_step(teacher.world_of(tcfg), tcfg.frames, tcfg.chunk)
    tr = trust_region.TrustRegion.from_config(lc) if lc.trust_region else None
    return lambda: longtune.tune_update(streams, nets, lc, stream=stream_, m=m, tr=tr)


def main(cfg):
    check_file("json", cfg.json)
    torch.set_num_threads(cfg.threads or torch.get_num_threads())   # 0: torch's default
    device = pick_device(cfg.device, precision=cfg.precision)
    both = cfg.precision == "auto" and device.type == "cpu" and BF16.get("cpu")   # fp32 and bf16, ratios in one run
    precisions = ["fp32", "bf16"] if both else ["bf16" if BF16.get(device.type) else "fp32"]
    torch.manual_seed(cfg.seed)
    compiled = cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda")
    tcfg, dcfg = teacher.TeacherConfig(**teacher.PRESETS[cfg.preset]), distill.DistillConfig(**distill.PRESETS[cfg.preset])
    lcfg = longtune.LongtuneConfig(**longtune.PRESETS[cfg.preset])
    model, stream_ = build(teacher.model_args(tcfg), device=device).eval(), distill.stream_args(dcfg, tcfg.frames)
    sigmas, ch, T, S = stream_["sigmas"], dcfg.chunk, tcfg.frames, tcfg.size
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    print(f"device {name}, torch {torch.__version__}, preset {cfg.preset}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, {T}-frame teacher clips, chunk {ch}, "
          f"cache {dcfg.n_sink} sink + {dcfg.n_window} window frames, compile {'on' if compiled else 'off'}\n\n"
          "| what | value | unit |\n|---|---:|---|")                 # the rows follow as they are measured
    header, rows = dict(device=name, torch=torch.__version__, preset=cfg.preset, compile=compiled,
                        date=time.strftime("%Y-%m-%d"), config=asdict(cfg)), []

    def add(*new):          # print each row as it is measured and save all so far: a run cut short keeps them
        for what, val, unit in new:
            rows.append((what, val, unit))
            print(f"| {what} | {val if isinstance(val, str) else f'{val:,.2f}'} | {unit} |", flush=True)
        if cfg.json:        # write, then rename: a kill never leaves half a file
            with open(cfg.json + ".tmp", "w") as f:
                json.dump(dict(header, rows=[dict(what=w, value=v, unit=u) for w, v, u in rows]), f, indent=1)
            os.replace(cfg.json + ".tmp", cfg.json)

    def make(what, on):     # a fresh training step, run twice: compiled, past its lazy state (AdamW's moments)
        fn = train_step_fn(what, tcfg, dcfg, lcfg, device, on, cfg.seed)
        fn(), fn()
        return fn

    # The modes (eager fp32 and bf16 on a CPU with native bf16; eager and compiled where compiled) are timed
    # in turn, call by call, so that a machine speeding up or slowing down meets every mode alike.
    modes = [(f"eager {p}", p, False) for p in precisions] + ([(f"compiled {precisions[-1]}", precisions[-1], True)]
                                                              if compiled else [])

    def each(fn):           # {label: fn(label, on)} over the modes in turn, each under its own precision
        out = {}
        for label, prec, on in modes:
            set_precision(prec, device)
            out[label] = fn(label, on)
        return out

    nets = each(lambda label, on: compile_(build(teacher.model_args(tcfg), model.state_dict(), device).eval(), True,
                dynamic=False, mode="reduce-overhead" if device.type == "cuda" else "default") if on else model)
    gens = {label: sample.StreamModel(net, stream_, teacher.world_of(tcfg)) for label, net in nets.items()}
    warm = (dcfg.n_sink + dcfg.n_window) // ch + 1                  # chunks until the cache is full
    batches = {TEACHER: tcfg.batch, DMD: dcfg.batch, BASELINE: lcfg.batch, DELTA: lcfg.batch}
    # evaluations per frame: the teacher's sample_steps (twice with CFG) against the student's levels + its cache write
    ceiling = tcfg.sample_steps * (2 if tcfg.guidance else 1) / (len(sigmas) + 1)
    rates, speed, flops = {}, {}, {}                                # rates[mode, batch], speed[mode, step], flops[step]
    grid, t_teacher = teacher.euler_grid(tcfg.sample_steps, tcfg.sample_shift), {label: [] for label in gens}
    clip = lambda label: autocast(device)(lambda: teacher.sample(gens[label].model, torch.zeros(1, T, dtype=torch.long,
                                      device=device), torch.randn(1, T, 3, S, S, device=device), grid, tcfg.guidance))
    for B in (1, cfg.big_batch):                                    # ---- streaming
        for _ in range(2):                                          # warm-up: compiles and records every graph
            each(lambda label, on: stream_times(gens[label], B, ch * (warm + 4), device))
            if B == 1:
                each(lambda label, on: clip(label)())
        g0, times = counters["stats"]["unique_graphs"], {label: [] for label in gens}
        for _ in range(cfg.repeats):
            for label, t in each(lambda label, on: stream_times(gens[label], B, ch * (warm + 20), device)).items():
                times[label].append(t)
            if B == 1:                                              # the teacher's sampler in the same turns
                for label, dt in each(lambda label, on: timed(clip(label), device)).items():
                    t_teacher[label].append(dt)
        for label, _, on in modes:
            rates[label, B] = B * ch / statistics.median(x for t in times[label] for x in t[warm:])
            add((f"{label}: streaming, batch {B}, steady state", rates[label, B], "frames/s"),
                (f"{label}: first-chunk latency, batch {B}", statistics.median(t[0] for t in times[label]) * 1000, "ms"))
            if on:
                add((f"{label}: graphs traced in total / new in a warmed stream, batch {B}",
                     f"{g0} / {counters['stats']['unique_graphs'] - g0}", ""),
                    (f"compiled / eager streaming, batch {B}", rates[label, B] / rates[modes[-2][0], B], "x"))

    label0 = modes[0][0]                                            # per-frame cost early and late, thrice
    set_precision(modes[0][1], device)
    for run in range(3):
        early, late = (statistics.median(t) for t in early_late_times(gens[label0], cfg.late, 50 // ch, device))
        add((f"{label0}, run {run + 1}: per-frame cost at frames 50-100 / {cfg.late}-{cfg.late + 50}, batch 1",
             f"{early / ch * 1000:.2f} / {late / ch * 1000:.2f}", "ms"),
            (f"{label0}, run {run + 1}: per-frame cost, frame {cfg.late} / frame 50", late / early, "x"))
    F, kv = cfg.frames, (dcfg.n_sink, dcfg.n_window)
    noise, ev = torch.randn(1, F, 3, S, S, device=device), torch.zeros(1, F, dtype=torch.long, device=device)
    t_cache = timed(torch.no_grad()(lambda: rollout(model, noise, ev, sigmas, ch, KVCache(*kv))), device)
    t_recompute = timed(lambda: recompute_stream(model, noise, ev, sigmas, ch), device)
    add((f"{F} frames, cached streaming (eager, no autocast)", F / t_cache, "frames/s"),
        (f"{F} frames, recompute the causal prefix", F / t_recompute, "frames/s"),
        ("cache / recompute", t_recompute / t_cache, "x"))

    for what, batch in batches.items():                             # ---- training, the modes step by step in turn
        fns, g0 = each(lambda label, on: make(what, on)), counters["stats"]["unique_graphs"]
        steps = {label: [] for label in fns}
        for _ in range(cfg.steps):
            for label, dt in each(lambda label, on: clock(fns[label], device)).items():
                steps[label].append(dt)
        graphs = counters["stats"]["unique_graphs"] - g0            # a rarer path (a recache) may compile late
        fn = make(what, False)      # the very same steps again (same seed), counted: matmuls and attention,
        with FlopCounterMode(display=False) as counted:   # forward and backward, as MFU counts (the CPU's attention too)
            for _ in range(cfg.steps):
                fn()
        flops[what] = counted.get_total_flops() / cfg.steps
        for label, _, on in modes:
            dt = speed[label, what] = statistics.median(steps[label])
            mfu = f"{100 * flops[what] / dt / peak:.1f}%" if peak else "n/a (no bf16 peak for this device)"
            add((f"{label}: {what}, batch {batch}" + (f" ({graphs} graphs compiled while timed)" if on else ""),
                 dt * 1000, "ms"),
                (f"{label}: {what}: {flops[what] / 1e9:.2f} GFLOP/step, achieved / MFU",
                 f"{flops[what] / dt / 1e9:,.1f} GFLOP/s / {mfu}", ""))
        if device.type == "cuda":                                   # eager: each sync is one op, not a graph
            add((f"host syncs per step (the host waits for the GPU): {what}", host_syncs(make(what, False)), ""))

    for label, _, _ in modes:                                       # ---- the student against the teacher's sampler
        ratio = rates[label, 1] / (T / min(t_teacher[label]))
        add((f"{label}: teacher Euler {tcfg.sample_steps} steps + CFG, batch 1", T / min(t_teacher[label]), "frames/s"),
            (f"{label}: student stream / teacher sampler, batch 1", ratio, "x"),
            (f"{label}: share of the evaluation-count ceiling, {ceiling:.1f}x", 100 * ratio / ceiling, "%"))

    if compiled:
        add(*[(f"compiled / eager train step speed-up: {w}", speed[modes[-2][0], w] / speed[modes[-1][0], w], "x")
              for w in batches])
    if len(precisions) == 2:                                        # the CPU's matrix units against fp32, same run
        f32, b16 = "eager fp32", "eager bf16"      # each row names what --precision=auto runs (common.set_precision)
        add(*[(f"bf16 / fp32 speed-up: {w} (auto: bf16)", speed[f32, w] / speed[b16, w], "x") for w in batches],
            ("bf16 / fp32 speed-up: streaming, batch 1 (auto: fp32, sample.py and the web page)",
             rates[b16, 1] / rates[f32, 1], "x"),
            (f"bf16 / fp32 speed-up: streaming, batch {cfg.big_batch} (auto: bf16, evaluation)",
             rates[b16, cfg.big_batch] / rates[f32, cfg.big_batch], "x"),
            ("auto: student stream (fp32) / teacher sampler (bf16), batch 1, share of the evaluation-count ceiling",
             100 * rates[f32, 1] * min(t_teacher[b16]) / T / ceiling, "%"))

    if cfg.profile:                                                 # the last mode's (bf16 where both were timed)
        g = gens[modes[-1][0]]
        profile(lambda: stream_times(g, 1, ch * (warm + 2), device), device, f"a stream of {warm + 2} chunks, batch 1")
        for what in batches:
            profile(make(what, compiled), device, what)


if __name__ == "__main__":
    cli(main, BenchConfig, PRESETS)
