"""Speed, measured in one run so that ratios compare like with like (machines are noisy).

    python bench.py                       # tiny on CPU, small on a GPU
    python bench.py --compile=on          # also compile on the CPU (slow to compile; checks the code path)
    python bench.py --json=out/bench.json # the rows also as JSON (device, torch, date, one object per row)
    python bench.py --profile=True        # and where the time goes: torch.profiler's top ops per step

One loop over the modes, eager then compiled (on CUDA by default), and on a CPU that multiplies
bf16 natively eager in fp32 and in bf16 (with their ratios, same run); for each mode:
streaming (frames/s in steady state and first-chunk latency at batch 1 and at a large batch; on
CUDA the compiled step replays as a CUDA graph, and the graphs compiled and any recompile during
a warmed stream are counted), training (step time, FLOPs counted per step by PyTorch's
FlopCounterMode, achieved FLOP/s and MFU against a small table of bf16 peaks, for the teacher,
DMD and long-tuning steps, built by the stages' own code), and the teacher's sampler against the
student's stream. Eager alone also measures per-frame cost at frame 50 against frame --late,
cached streaming against recomputing the causal prefix, and host syncs per training step (CUDA);
compiled adds its speed-ups over eager. Cheap eager rows come first, compiles and profiles
last, and each row is saved as it is measured: a run cut short (a GPU slot's time limit) keeps
the most. Weights do not change speed, so untrained models of the preset's shape are used.
Which attention paths take the flash kernel is a test: tests/test_cuda.py.
"""
import contextlib
import datetime
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, replace

import torch
from torch._dynamo.utils import counters
from torch.utils.flop_counter import FlopCounterMode

import distill
import longtune
import sample
import teacher
from common import BF16, autocast, check_file, compile_, pick_device, set_precision
from config import Config, Count, OneOf, Whole, cli
from model import KVCache, build, pred_x0, rollout
from world import natural_step, teacher_batch

PEAK_BF16 = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
             "4090": 165e12}                                     # dense bf16 tensor-core FLOP/s, from the data sheets


@dataclass
class BenchConfig(Config):
    compile: OneOf("auto", "on", "off") = "auto"   # auto: on CUDA only | on: also on the CPU | off
    big_batch: Count = 16         # the large batch for streaming throughput
    frames: Count = 256           # stream length for cached streaming against recompute
    late: Count = 1000            # per-frame cost is compared at frame 50 and at this frame
    repeats: Count = 3            # best of n for whole-call timings
    steps: Count = 3              # timed training steps per stage, after two warm-up steps
    threads: Whole = 0            # torch CPU threads; 0 = torch's default
    json: str = ""                # also write the rows here, as JSON
    profile: bool = False         # also print torch.profiler's top ops: a streaming chunk and each training step


PRESETS = {"tiny": {}, "small": dict(big_batch=64)}
TEACHER, DMD, BASELINE, DELTA = ("teacher step", "DMD step (5 critic + 1 generator)", "long-tune step, baseline",
                                 "long-tune step, Delta Forcing")


def fmt(val):
    return val if isinstance(val, str) else f"{val:,.2f}"


class Rows(list):
    """The measured rows (what, value, unit). Each is printed the moment it is measured, and with a
    path the JSON is rewritten too, so a run cut short (a GPU slot's time limit) keeps every row so far."""

    def __init__(self, path, header):
        super().__init__()
        self.path, self.header = path, header

    def append(self, row):
        super().append(row)
        print(f"  {row[0]}: {fmt(row[1])} {row[2]}", flush=True)
        if self.path:                                               # write, then rename: a kill never leaves half a file
            with open(self.path + ".tmp", "w") as f:
                json.dump(dict(self.header, rows=[dict(what=w, value=v, unit=u) for w, v, u in self]), f, indent=1)
            os.replace(self.path + ".tmp", self.path)

    def __iadd__(self, rows):
        for row in rows:
            self.append(row)
        return self


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()                                 # time the GPU work, not the launch


def timed(fn, device, repeats):
    """Best wall time of fn() over repeats, after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def profile(fn, device, label, top=12):
    """torch.profiler's top ops of one more call of fn (already warm): GPU time against the CPU's
    time launching it tells a launch-bound step (small kernels, host syncs) from a compute-bound one."""
    from torch.profiler import ProfilerActivity
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    try:
        with torch.profiler.profile(activities=acts) as p:
            fn()
            sync(device)
        print(f"\nprofile: {label}, top ops by {key}\n" + p.key_averages().table(sort_by=key, row_limit=top), flush=True)
    except Exception as e:                                          # a profile is a bonus: never lose the rows for it
        print(f"profile: {label}: failed ({type(e).__name__}: {e})", flush=True)


def host_syncs(fn):
    """How often one call of fn makes the host wait for the GPU (.item(), a data-dependent branch, a
    blocking copy): CUDA's sync debug mode warns once per synchronizing call."""
    import warnings
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def stream_times(g, B, n, device):
    """Seconds of each chunk of one n-frame stream at batch B: sample.py's own streaming loop."""
    ev = torch.zeros(B, n, dtype=torch.long, device=device)
    return sample.generate(g, ev, list(range(B)), "recache_window", on_chunk=lambda x: None)[1]


@torch.no_grad()
def recompute_stream(model, noise, event, sigmas, chunk):
    """The baseline without a cache: every denoising step re-runs the whole clean causal prefix."""
    done = []
    for i in range(0, noise.shape[1], chunk):
        x = noise[:, i:i + chunk]
        for k in range(len(sigmas)):
            seq = torch.cat(done + [x], 1)
            sig = torch.zeros(seq.shape[:2], device=x.device)
            sig[:, i:] = sigmas[k]
            x0 = pred_x0(x, model(seq, sig, event[:, :i + chunk], causal_chunk=chunk)[:, i:], sig[:, i:])
            if k + 1 < len(sigmas):
                x = (1 - sigmas[k + 1]) * x0 + sigmas[k + 1] * torch.randn_like(x0)
        done.append(x0)
    return torch.cat(done, 1)


def train_step_fn(what, tcfg, dcfg, lcfg, device, compiled, seed):
    """A closure running one training step of the pipeline, exactly the stage's own step function,
    on fresh models of the preset's shape (the DMD set-up is distill.dmd_nets, as in distill.py and
    longtune.py). Seeded here, so every call builds and then steps the very same way."""
    torch.manual_seed(seed)
    args, gen = teacher.model_args(tcfg), torch.Generator().manual_seed(seed)
    if what == TEACHER:
        model, ema, opt = teacher.build_teacher(tcfg, device, compiled)
        x, ev = (a.to(device) for a in teacher_batch(teacher.world_of(tcfg), tcfg.batch, tcfg.frames, gen, tcfg.chunk))
        return lambda: teacher.train_step(model, ema, opt, x, ev, step=0, cfg=tcfg)
    stream_ = distill.stream_args(dcfg, tcfg.frames)
    sigmas = stream_["sigmas"]
    nets, _ = distill.dmd_nets(args, teacher=None, student=None, critic=None, cfg=dcfg if what == DMD else lcfg,
                               device=device, compiled=compiled)
    if what == DMD:
        return lambda: distill.dmd_update(**nets, cfg=dcfg, sigmas=sigmas, gen=gen, shape=(dcfg.batch, tcfg.frames, tcfg.size))
    lc = replace(lcfg, trust_region=what == DELTA)
    streams = longtune.Streams(lc, stream_, tcfg.size, gen, device, lc.batch)
    m = natural_step(teacher.world_of(tcfg), tcfg.frames, tcfg.chunk)
    return lambda: longtune.tune_update(streams, **nets, cfg=lc, sigmas=sigmas, shift=dcfg.shift, m=m)


def warmed(make):
    """A fresh training step closure from make(), run twice (compiled, and past the first step's
    lazy state such as AdamW's moments), as step_cost runs it."""
    fn = make()
    fn(), fn()
    return fn


def step_cost(make, device, steps, count):
    """(seconds per step, FLOPs per step, graphs compiled during the timed steps): the mean over
    `steps` steps after two warm-up steps, which compile what they meet (a rarer path, such as the
    recache at a switch, may first compile inside the timed steps: the third number says so).
    make() builds fresh models and steps from a fixed seed, so with count=True the very same calls
    (the same random exit steps, stream states and switches) run again under PyTorch's
    FlopCounterMode: matmuls and attention, forward and backward (elementwise work is not counted,
    as in every MFU figure; the CPU's attention is written out as matmuls, so it is counted too)."""
    def run(timing):
        fn = warmed(make)
        sync(device)
        g0, t = counters["stats"]["unique_graphs"], time.perf_counter()
        mode = FlopCounterMode(display=False) if not timing else contextlib.nullcontext()
        with mode:
            for _ in range(steps):
                fn()
        sync(device)
        dt, graphs = (time.perf_counter() - t) / steps, counters["stats"]["unique_graphs"] - g0
        return dt, (mode.get_total_flops() / steps if not timing else graphs)
    dt, graphs = run(timing=True)
    return dt, (run(timing=False)[1] if count else None), graphs


def main(cfg):
    check_file("json", cfg.json)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device, precision=cfg.precision)
    both = cfg.precision == "auto" and device.type == "cpu" and BF16.get("cpu")   # a CPU that multiplies bf16: both,
    precisions = ["fp32", "bf16"] if both else ["bf16" if BF16.get(device.type) else "fp32"]   # their ratios in one run
    torch.manual_seed(cfg.seed)
    compiled = cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda")
    tcfg = teacher.TeacherConfig(**teacher.PRESETS[cfg.preset])
    dcfg = distill.DistillConfig(**distill.PRESETS[cfg.preset])
    lcfg = longtune.LongtuneConfig(**longtune.PRESETS[cfg.preset])
    model = build(teacher.model_args(tcfg), device=device).eval()
    stream_ = distill.stream_args(dcfg, tcfg.frames)
    sigmas, ch, T = stream_["sigmas"], dcfg.chunk, tcfg.frames
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    print(f"device {name}, torch {torch.__version__}, preset {cfg.preset}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, {T}-frame teacher clips, chunk {ch}, "
          f"cache {dcfg.n_sink} sink + {dcfg.n_window} window frames, compile {'on' if compiled else 'off'}")
    rows = Rows(cfg.json, dict(device=name, torch=torch.__version__, preset=cfg.preset, compile=compiled,
                               date=datetime.date.today().isoformat(), config=asdict(cfg)))
    warm = (dcfg.n_sink + dcfg.n_window) // ch + 1                  # chunks until the cache is full
    batches = {TEACHER: tcfg.batch, DMD: dcfg.batch, BASELINE: lcfg.batch, DELTA: lcfg.batch}
    # like for like: the teacher evaluates each frame 2 x sample_steps times (CFG doubles the batch),
    # the student len(sigmas) + 1 times (its levels, then the clean cache write)
    ceiling = tcfg.sample_steps * (2 if tcfg.guidance else 1) / (len(sigmas) + 1)
    rates, flops, speed = {}, {}, {}

    modes = [("eager", p) for p in precisions] + ([("compiled", precisions[-1])] if compiled else [])
    for kind, prec in modes:
        label, on = f"{kind} {prec}", kind == "compiled"            # compiled: static shapes, a CUDA graph on CUDA
        set_precision(prec, device)
        net = compile_(build(teacher.model_args(tcfg), model.state_dict(), device).eval(), True, dynamic=False,
                       mode="reduce-overhead" if device.type == "cuda" else "default") if on else model
        g = sample.Generator(net, stream_, teacher.world_of(tcfg))

        rates[label] = {}                                           # ---- streaming
        for B in (1, cfg.big_batch):
            for _ in range(2):                                      # warm-up: compiles and records every graph
                stream_times(g, B, ch * (warm + 4), device)
            g0 = counters["stats"]["unique_graphs"]
            times = stream_times(g, B, ch * (warm + 20), device)
            rates[label][B] = B * ch / statistics.median(times[warm:])
            rows += [(f"{label}: streaming, batch {B}, steady state", rates[label][B], "frames/s"),
                     (f"{label}: first-chunk latency, batch {B}", times[0] * 1000, "ms")]
            if on:
                rows.append((f"{label}: graphs traced in total / new in a warmed stream, batch {B}",
                             f"{g0} / {counters['stats']['unique_graphs'] - g0}", ""))
        if on:
            rows += [(f"compiled / eager streaming, batch {B}", rates[label][B] / rates[f"eager {prec}"][B], "x")
                     for B in rates[label]]
        elif prec == precisions[0]:
            times = stream_times(g, 1, -(-(cfg.late + 50) // ch) * ch, device)   # one long stream, whole chunks
            early, late = (statistics.median(times[f // ch:(f + 50) // ch]) for f in (50, cfg.late))   # 50 frames each
            rows += [("per-frame cost at frames 50-100 (eager, batch 1)", early / ch * 1000, "ms"),
                     (f"per-frame cost at frames {cfg.late}-{cfg.late + 50}", late / ch * 1000, "ms"),
                     (f"per-frame cost, frame {cfg.late} / frame 50", late / early, "x")]
            F = cfg.frames
            noise = torch.randn(1, F, 3, tcfg.size, tcfg.size, device=device)
            ev = torch.zeros(1, F, dtype=torch.long, device=device)
            with torch.no_grad():
                t_cache = timed(lambda: rollout(model, noise, ev, sigmas, ch, KVCache(dcfg.n_sink, dcfg.n_window)), device, 1)
            t_recompute = timed(lambda: recompute_stream(model, noise, ev, sigmas, ch), device, 1)
            rows += [(f"{F} frames, cached streaming (eager)", F / t_cache, "frames/s"),
                     (f"{F} frames, recompute the causal prefix", F / t_recompute, "frames/s"),
                     ("cache / recompute", t_recompute / t_cache, "x")]

        for what, batch in batches.items():                         # ---- training: FLOPs counted on the eager steps
            make = lambda: train_step_fn(what, tcfg, dcfg, lcfg, device, on, cfg.seed)   # noqa: E731
            dt, f, graphs = step_cost(make, device, cfg.steps, count=what not in flops)
            flops[what] = f or flops[what]
            speed.setdefault(what, {})[label] = dt
            mfu = f"{100 * flops[what] / dt / peak:.1f}%" if peak else "n/a (no bf16 peak for this device)"
            rows += [(f"{label}: {what}, batch {batch}" + (f" ({graphs} graphs compiled while timed)" if on else ""),
                      dt * 1000, "ms"),
                     (f"{label}: {what}: {flops[what] / 1e9:.2f} GFLOP/step, achieved / MFU",
                      f"{flops[what] / dt / 1e9:,.1f} GFLOP/s / {mfu}", "")]
            if device.type == "cuda" and not on:                    # eager: each sync is one op, not a graph
                rows.append((f"host syncs per step (the host waits for the GPU): {what}", host_syncs(warmed(make)), ""))
        if on:
            rows += [(f"compiled / eager train step speed-up: {what}", v[f"eager {prec}"] / v[label], "x")
                     for what, v in speed.items()]
        if prec == "bf16" and "fp32" in precisions and not on:      # the CPU's matrix units, against fp32, same run
            rows += [(f"bf16 / fp32 speed-up: {what}", v["eager fp32"] / v[label], "x") for what, v in speed.items()]
            rows += [(f"bf16 / fp32 speed-up: streaming, batch {B}", rates[label][B] / rates["eager fp32"][B], "x")
                     for B in rates[label]]

        def teacher_clip():                                         # ---- the teacher, same compile and dtype
            with autocast(device):
                teacher.sample(g.model, torch.zeros(1, T, dtype=torch.long, device=device),
                               torch.randn(1, T, 3, tcfg.size, tcfg.size, device=device),
                               teacher.euler_grid(tcfg.sample_steps, tcfg.sample_shift), tcfg.guidance)
        t_teacher = timed(teacher_clip, device, cfg.repeats)
        ratio = rates[label][1] / (T / t_teacher)
        rows += [(f"{label}: teacher Euler {tcfg.sample_steps} steps + CFG, batch 1", T / t_teacher, "frames/s"),
                 (f"{label}: student stream / teacher sampler, batch 1", ratio, "x"),
                 (f"{label}: share of the evaluation-count ceiling, {ceiling:.1f}x", 100 * ratio / ceiling, "%")]

    if cfg.profile:                                                 # the faster setting of each (g: the last mode's)
        profile(lambda: stream_times(g, 1, ch * (warm + 2), device), device, f"a stream of {warm + 2} chunks, batch 1")
        for what in batches:
            profile(warmed(lambda: train_step_fn(what, tcfg, dcfg, lcfg, device, compiled, cfg.seed)), device, what)

    w = max(len(r[0]) for r in rows)
    print(f"| {'what':<{w}} | value | unit |\n|{'-' * (w + 2)}|---:|---|")
    for what, val, unit in rows:
        print(f"| {what:<{w}} | {fmt(val)} | {unit} |")


if __name__ == "__main__":
    cli(main, BenchConfig, PRESETS)
