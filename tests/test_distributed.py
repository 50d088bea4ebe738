"""Data parallel under torchrun (gloo on the CPU): every stage runs as 2 processes, each rank
draws its own data, and both ranks end with identical weights."""
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

import common
import teacher
from common import load_checkpoint
from config import BadInput
from conftest import ROOT, TEACHER_FLAGS

TEACHER = TEACHER_FLAGS + ["--steps=3"]


def torchrun(script, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(ROOT, script), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    digests = dict(re.findall(r"rank (\d)/2: weights sha256 ([0-9a-f]{16})", r.stdout))
    assert sorted(digests) == ["0", "1"], r.stdout[-2000:]              # each rank hashed its own weights
    assert digests["0"] == digests["1"] and "weights identical on all 2 ranks" in r.stdout
    return r


def test_torchrun_two_ranks_every_stage_stays_in_sync(tmp_path):
    torchrun("teacher.py", f"--out_dir={tmp_path}", *TEACHER)
    ck = load_checkpoint(str(tmp_path / "teacher.pt"), ["teacher"], "")
    assert ck["step"] == 3
    init = torch.load(str(tmp_path / "teacher.pt"), weights_only=True)["model"]
    torchrun("distill.py", f"--out_dir={tmp_path}", "--ode_pairs=8", "--ode_steps=2", "--dmd_steps=2", "--batch=4",
             "--critic_ratio=1", "--eval_samples=4", "--log_every=1")
    ck = load_checkpoint(str(tmp_path / "student.pt"), ["student"], "")
    assert ck["step"] == 2 and ck["phase"] == "dmd"
    assert any((ck["model"][k] - init[k]).abs().max() > 0 for k in init)   # the ranks really trained
    torchrun("longtune.py", f"--out_dir={tmp_path}", "--max_steps=2", "--batch=2", "--critic_ratio=1", "--windows=2",
             "--log_every=1", "--trust_region=True")
    assert load_checkpoint(str(tmp_path / "deltaforcing.pt"), ["longtune"], "")["step"] == 2


def test_batch_must_split_over_the_ranks(tmp_path, monkeypatch):
    """As under torchrun with 2 ranks (in process: a process group of 2 faked), a batch of 3 is refused."""
    monkeypatch.setenv("RANK", "0")
    for name, value in (("is_initialized", True), ("get_rank", 0), ("get_world_size", 2)):
        monkeypatch.setattr(dist, name, lambda v=value: v)
    with pytest.raises(BadInput, match="does not split over 2 processes"):
        common.init_run(teacher.TeacherConfig(out_dir=str(tmp_path), batch=3), 3)