"""Shared constants, helpers and fixtures of the test suite.

The stages are flat files at the repository root, the instruments a package in tools/; tests
import both directly. The pipeline
fixtures (a 2-step teacher, a 1-step student) are session-scoped and read-only: a test that
trains writes into its own tmp_path, pointing --teacher / --student at these checkpoints.
"""
import dataclasses
import importlib
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import common  # noqa: E402
import distill  # noqa: E402
import longtune  # noqa: E402
import teacher  # noqa: E402
from config import cli, parse_config  # noqa: E402
from model import ModelConfig, VideoDiT  # noqa: E402

# ----------------------------------------------------------------------------- small models and inputs

MC = ModelConfig(size=16, patch=4, dim=32, depth=2, heads=2)   # model args of the unit tests
MODEL_ARGS = dataclasses.asdict(MC)
B, T, CH = 2, 8, 2                                             # batch, frames, chunk of the unit tests
SIGMAS = [1.0, 0.9, 0.75, 0.5]                                # four denoising levels of a rollout (host floats)

# the teacher flags of every tiny pipeline run (in-process configs and subprocess command lines)
TINY = dict(dim=32, depth=2, heads=2, batch=4, frames=4, eval_samples=4, sample_steps=2, warmup=2,
            log_every=1, ckpt_every=1)
TEACHER_FLAGS = [f"--{k}={v}" for k, v in TINY.items()]


def randomized(seed=0, mc=MC):
    """A model with every weight random (AdaLN-Zero would make the output trivially zero)."""
    torch.manual_seed(seed)
    m = VideoDiT(mc)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.1)
    return m.eval()


def stream_setup(chunk=CH, n_sink=2, n_window=8, window=8, sigmas=SIGMAS, shift=3.0):
    """A generator's streaming setup, as distill.stream_args stores it in a checkpoint."""
    return dict(chunk=chunk, sigmas=list(sigmas), n_sink=n_sink, n_window=n_window, window=window,
                shift=shift)


# ----------------------------------------------------------------------------- stage configs

def tiny_cfg(out_dir, **kw):
    """A tiny teacher config (the tiny preset shrunk further), writing to out_dir."""
    cfg = parse_config(teacher.TeacherConfig, teacher.PRESETS, ["--preset=tiny"])
    for k, v in {**TINY, "out_dir": str(out_dir), **kw}.items():
        setattr(cfg, k, v)
    return cfg


def distill_cfg(out_dir, **kw):
    """A tiny distill config (8 ODE pairs, 2 ODE steps, 2 DMD updates of batch 2), writing to out_dir."""
    cfg = distill.DistillConfig(out_dir=str(out_dir), ode_pairs=8, ode_steps=2, dmd_steps=2, batch=2,
                                critic_ratio=2, eval_samples=5, log_every=1)
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def longtune_cfg(out_dir, student, **kw):
    """A tiny long-tuning config: 2 updates of 2 streams, 2-window videos, from the given student."""
    cfg = longtune.LongtuneConfig(out_dir=str(out_dir), student=str(student), max_steps=2, batch=2, critic_ratio=1,
                                  windows=2, log_every=1)
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


# ----------------------------------------------------------------------------- running the scripts

def run(script, *args, cwd=ROOT):
    """A script in a fresh interpreter (what a user types)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = ["-m", module_name(script)] if script.startswith("tools/") else [os.path.join(ROOT, script)]
    return subprocess.run([sys.executable, *cmd, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def module_name(script):
    """'tools/evaluate.py' -> 'tools.evaluate', 'teacher.py' -> 'teacher'."""
    return script[:-3].replace("/", ".")


def assert_one_line_error(r, *words):
    """A subprocess result that failed with exit code 2 and one line on stderr holding every word."""
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in lines[0], lines[0]


def config_of(script):
    """A script's module and the config class its cli takes: the most derived of the module's own."""
    mod = importlib.import_module(module_name(script))
    own = [v for k, v in vars(mod).items() if k.endswith("Config") and getattr(v, "__module__", "") == mod.__name__]
    return mod, next(c for c in own if not any(o is not c and issubclass(o, c) for o in own))


def run_cli(script, args, capsys, monkeypatch):
    """A script's entry point, in this process (no interpreter start-up): -> (exit code, stderr).
    Any exception other than the one-line BadInput escapes and fails the test, as a traceback would."""
    mod, cls = config_of(script)
    monkeypatch.setattr(sys, "argv", [script, *args])
    capsys.readouterr()
    try:
        cli(mod.main, cls, mod.PRESETS)
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def assert_one_line_exit_2(code, err, *words):
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert all(w in lines[0] for w in words), lines[0]


@pytest.fixture(autouse=True)
def fp32_on_the_cpu():
    """Every test starts with the CPU in fp32, whatever an earlier test's stage chose: exact
    comparisons stay exact. A stage's main still sets its own precision (--precision)."""
    common.BF16["cpu"] = False
    yield
    common.BF16["cpu"] = False


# ----------------------------------------------------------------------------- the pipeline, once per session

@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory):
    """A directory holding teacher.pt from a 2-step tiny run. Read-only for tests."""
    d = tmp_path_factory.mktemp("teacher")
    teacher.main(tiny_cfg(d, steps=2))
    return d


@pytest.fixture(scope="session")
def student_dir(teacher_dir, tmp_path_factory):
    """A directory holding teacher.pt (a copy) and student.pt from a 1-step distill run. Read-only for tests."""
    d = tmp_path_factory.mktemp("student")
    shutil.copy(teacher_dir / "teacher.pt", d / "teacher.pt")
    distill.main(distill_cfg(d, max_steps=1))
    return d
