"""The configs and their command line: one dataclass per stage on a shared base, `--key=value`,
`--preset=tiny|small`, `--help`. Each field declares its valid values in its type (Count, Prob,
OneOf(...), ...) and documents itself in its trailing comment, which --help prints. Every field is
checked before any work; a bad value, like every user error, is one line on stderr and exit code 2.

    @dataclass
    class TeacherConfig(RunConfig):
        batch: Count = 32             # clips per step (the global batch under torchrun)
    cli(main, TeacherConfig, PRESETS)                           # under if __name__ == "__main__":
"""
import dataclasses
import inspect
import math
import os
import re
import sys
from dataclasses import dataclass
from typing import Annotated, get_args, get_origin

import torch


class BadInput(ValueError):
    """A user error. Scripts print it as one line on stderr and exit with code 2."""


@dataclass(frozen=True)
class Range:
    """A number's valid values: finite, lo <= v <= hi (lo < v with open_lo)."""
    lo: float = -math.inf
    hi: float = math.inf
    open_lo: bool = False
    what: str = "a finite number"

    def error(self, v):
        ok = math.isfinite(v) and (v > self.lo if self.open_lo else v >= self.lo) and v <= self.hi
        return None if ok else f"must be {self.what}"


@dataclass(frozen=True)
class Choice:
    choices: tuple

    def error(self, v):
        return None if v in self.choices else f"must be one of {', '.join(self.choices)}"


@dataclass(frozen=True)
class Levels:
    """Noise levels in (0, 1], comma-separated; strictly decreasing unless `decreasing=False`
    (a few-step schedule is; a set of fixed levels need not be)."""
    decreasing: bool = True

    def error(self, v):
        try:
            s = [float(x) for x in v.split(",")]
        except ValueError:
            s = []
        ok = s and all(0 < a <= 1 for a in s) and (not self.decreasing or all(a > b for a, b in zip(s, s[1:])))
        order = "decreasing, " if self.decreasing else ""
        return None if ok else f"must be noise levels in (0, 1], {order}separated by commas (e.g. 1,0.75,0.5,0.25)"


Count = Annotated[int, Range(1, what="a positive integer")]
Whole = Annotated[int, Range(0, what="an integer >= 0")]
Positive = Annotated[float, Range(0, open_lo=True, what="a finite number > 0")]
NonNegative = Annotated[float, Range(0, what="a finite number >= 0")]
Real = Annotated[float, Range()]
Prob = Annotated[float, Range(0, 1, what="a probability in [0, 1]")]
Port = Annotated[int, Range(0, 65535, what="a port in 0-65535 (0: any free port)")]
Sigmas = Annotated[str, Levels()]
BandLevels = Annotated[str, Levels(decreasing=False)]


def OneOf(*choices):
    return Annotated[str, Choice(choices)]


SwitchCache = OneOf("recache_window", "recache", "keep", "clear")   # what happens to a stream's KV cache when its event switches


@dataclass
class Config:
    """What every script takes."""
    preset: OneOf("tiny", "small") = "tiny"   # sizes: tiny (a laptop CPU) or small (one GPU); default by the device
    device: OneOf("auto", "cpu", "cuda", "mps") = "auto"   # auto: cuda, else mps, else cpu
    precision: OneOf("auto", "fp32", "bf16") = "auto"   # bf16 autocast; auto: bf16 on CUDA and on CPUs that multiply bf16 natively, but fp32 for sample.py and the web page on a CPU
    seed: Whole = 0                # seeds every draw of the run (the benchmark's videos: tools.evaluate --first_seed)


@dataclass
class RunConfig(Config):
    """What every training stage takes."""
    out_dir: str = "out"           # checkpoints and samples go here
    resume: bool = False           # continue from out_dir's checkpoint of this stage
    compile: bool = True           # torch.compile the networks (CUDA only; the CPU stays eager)
    max_steps: Whole = 0           # smoke runs: if > 0, caps every loop of the stage and its final evaluation


def capped(n, cfg, floor=1):
    """--max_steps caps every loop of a stage (smoke runs): n, or at most max(floor, max_steps)."""
    return min(n, max(floor, cfg.max_steps)) if cfg.max_steps > 0 else n


def field_checks(cls):
    """{name: (base type, check or None)} of a config dataclass, read from the fields' types."""
    return {f.name: get_args(f.type)[:2] if get_origin(f.type) is Annotated else (f.type, None)
            for f in dataclasses.fields(cls)}


def field_help(cls):
    """{name: its trailing comment} over cls and its bases: the documentation --help prints."""
    out = {}
    for c in reversed(cls.__mro__[:-1]):
        for line in inspect.getsource(c).splitlines():
            m = re.match(r"\s+(\w+):[^#]*#\s*(.*)", line)
            if m and m[1] in {f.name for f in dataclasses.fields(cls)}:
                out[m[1]] = m[2]
    return out


def command():
    """How this script was run: `python X.py`, or `python -m tools.X` for an instrument."""
    d, name = os.path.split(os.path.abspath(sys.argv[0]))
    return f"python -m tools.{name[:-3]}" if os.path.basename(d) == "tools" else f"python {name}"


def print_help(cls, presets):
    print(f"usage: {command()} [--preset=tiny|small] [--key=value ...]")
    helps = field_help(cls)
    for f in dataclasses.fields(cls):
        tiny, small = presets["tiny"].get(f.name, f.default), presets["small"].get(f.name, f.default)
        default = f"--{f.name}={tiny}" + (f" (small: {small})" if small != tiny else "")
        print(f"  {default:<34} {helps.get(f.name, '')}")


def parse_config(cls, presets, argv):
    """--preset=tiny|small first, then --key=value overrides typed by the dataclass fields; then
    every field is checked against its declared range or choices, before any work."""
    checks = field_checks(cls)
    if any(a in ("-h", "--help") for a in argv):
        print_help(cls, presets)
        sys.exit(0)
    pairs = []
    for a in argv:
        key, eq, val = a[2:].partition("=") if a.startswith("--") else ("", "", "")
        if not key:
            raise BadInput(f"cannot read argument {a!r}; use --key=value")
        pairs.append((key, val if eq else "True"))
    preset = dict(pairs).get("preset", "small" if torch.cuda.is_available() else "tiny")
    if preset not in presets:
        raise BadInput(f"--preset={preset} is an unknown preset; choose one of {', '.join(presets)}")
    cfg = cls(**presets[preset])
    for key, val in pairs:
        if key in getattr(cls, "renamed", {}) and key not in checks:
            raise BadInput(f"--{key} was renamed; use --{cls.renamed[key]}")
        if key not in checks:
            raise BadInput(f"unknown option --{key}; valid options: {', '.join('--' + k for k in checks)}")
        setattr(cfg, key, convert(key, val, checks[key][0]))
    cfg.preset = preset
    check_config(cfg)
    return cfg


def check_config(cfg):
    """Every field against its declared range or choices: the first bad one is one line."""
    for name, (_, check) in field_checks(type(cfg)).items():
        why = check.error(getattr(cfg, name)) if check else None
        if why:
            raise BadInput(f"--{name}={getattr(cfg, name)} {why}")


def convert(key, val, typ):
    try:
        return {"true": True, "1": True, "false": False, "0": False}[val.lower()] if typ is bool else typ(val)
    except (KeyError, ValueError):
        article = "an" if typ.__name__[0] in "aeiou" else "a"
        raise BadInput(f"bad value for --{key}: {val!r} is not {article} {typ.__name__}") from None


def cli(main, cls, presets):
    """The entry point of every script: parse, run, and turn BadInput into one line and exit code 2."""
    try:
        main(parse_config(cls, presets, sys.argv[1:]))
        if "RANK" in os.environ and torch.distributed.is_initialized():
            torch.distributed.barrier()   # rank 0 may still evaluate and save: no rank tears the group down early
    except BadInput as e:
        print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except BrokenPipeError:                                      # `--help | head`: the reader left, end quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    finally:
        if "RANK" in os.environ and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
