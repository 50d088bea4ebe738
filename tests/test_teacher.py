"""Teacher training, sampler, and the CLI contract every script shares (DESIGN sections 10, 11)."""
import os
import subprocess
import sys

import pytest
import torch

import teacher
from model import BadInput, build, load_checkpoint, parse_config
from world import teacher_batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(dim=32, depth=2, heads=2, batch=4, frames=4, eval_samples=4, sample_steps=2, warmup=2,
            log_every=1, ckpt_every=1)


def tiny_cfg(tmp_path, **kw):
    cfg = parse_config(teacher.TeacherConfig, teacher.PRESETS, ["--preset=tiny"])
    for k, v in {**TINY, "out_dir": str(tmp_path), **kw}.items():
        setattr(cfg, k, v)
    return cfg


def run(script, *args, cwd=ROOT):
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def assert_one_line_error(r, *words):
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_training_lowers_loss_on_a_fixed_batch(tmp_path):
    cfg = tiny_cfg(tmp_path)
    torch.manual_seed(0)
    m = build(cfg)
    x, event = teacher_batch(cfg, 8, 4, torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)

    def loss():
        torch.manual_seed(1)                                     # same noise and levels every time
        return teacher.fm_loss(m, x, event, cfg)
    first = loss().item()
    for _ in range(15):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert loss().item() < 0.8 * first


def test_sampler_shapes():
    m = build(teacher.TeacherConfig(dim=32, depth=2, heads=2))
    noise = torch.randn(3, 4, 3, 16, 16)
    for g in (0.0, 1.5):
        x = teacher.sample(m, torch.tensor([0, 1, 4]), noise, teacher.euler_grid(3), guidance=g)
        assert x.shape == noise.shape and torch.isfinite(x).all()


def test_main_end_to_end_and_resume(tmp_path, capsys):
    teacher.main(tiny_cfg(tmp_path, max_steps=2))
    ck = load_checkpoint(str(tmp_path / "teacher.pt"), ["teacher"], "python teacher.py")
    assert ck["step"] == 2 and {"follow", "valid", "canon"} <= set(ck["metrics"])
    teacher.main(tiny_cfg(tmp_path, max_steps=4, resume=True))
    assert "resumed" in capsys.readouterr().out
    ck = load_checkpoint(str(tmp_path / "teacher.pt"), ["teacher"], "python teacher.py")
    assert ck["step"] == 4
    assert os.path.exists(tmp_path / "teacher_samples.gif")


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(BadInput, match="not found"):
        load_checkpoint(str(tmp_path / "nope.pt"), ["teacher"], "python teacher.py")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(BadInput, match="corrupt"):
        load_checkpoint(str(tmp_path / "bad.pt"), ["teacher"], "python teacher.py")
    torch.save({"stage": "student"}, tmp_path / "s.pt")
    with pytest.raises(BadInput, match="student checkpoint, not teacher"):
        load_checkpoint(str(tmp_path / "s.pt"), ["teacher"], "python teacher.py")


def test_config_parsing():
    cfg = parse_config(teacher.TeacherConfig, teacher.PRESETS, ["--preset=small", "--lr=0.1", "--resume"])
    assert cfg.size == 32 and cfg.lr == 0.1 and cfg.resume is True
    with pytest.raises(BadInput, match="unknown option --lrr"):
        parse_config(teacher.TeacherConfig, teacher.PRESETS, ["--lrr=1"])
    with pytest.raises(BadInput, match="not an int"):
        parse_config(teacher.TeacherConfig, teacher.PRESETS, ["--max_steps=many"])


def test_cli_help():
    r = run("teacher.py", "--help")
    assert r.returncode == 0 and "--max_steps" in r.stdout and "--preset" in r.stdout


@pytest.mark.parametrize("args,words", [
    (["--bogus=1"], ["unknown option --bogus"]),
    (["--preset=huge"], ["unknown preset"]),
    (["--max_steps=ten"], ["--max_steps"]),
    (["max_steps=3"], ["--key=value"]),
])
def test_cli_bad_flags(args, words):
    assert_one_line_error(run("teacher.py", *args), *words)


def test_cli_corrupt_checkpoint_on_resume(tmp_path):
    (tmp_path / "teacher.pt").write_bytes(b"\x00" * 100)
    r = run("teacher.py", f"--out_dir={tmp_path}", "--resume=True", "--max_steps=1")
    assert_one_line_error(r, "corrupt", "python teacher.py")
