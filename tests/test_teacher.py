"""Teacher training and sampler, and the CLI contract every script shares: presets, --key=value,
--help, one clear line and exit code 2 for every bad flag."""
import os

import pytest
import torch

import teacher
from common import load_checkpoint
from config import BadInput, parse_config
from conftest import assert_one_line_exit_2, run, run_cli, tiny_cfg
from model import build
from world import BACKGROUNDS, World, teacher_batch


def test_training_lowers_loss_on_a_fixed_batch(tmp_path):
    cfg = tiny_cfg(tmp_path)
    torch.manual_seed(0)
    m = build(teacher.model_args(cfg))
    x, event = teacher_batch(teacher.world_of(cfg), 8, 4, torch.Generator().manual_seed(0), cfg.chunk)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)

    def loss():
        torch.manual_seed(1)                                     # same noise and levels every time
        return teacher.fm_loss(m, x, event, cfg.sigma_mu)
    first = loss().item()
    for _ in range(15):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert loss().item() < 0.8 * first


@pytest.mark.parametrize("p_frame", [0.0, 0.5, 1.0])
def test_fm_loss_draws_one_level_per_clip_or_per_frame(p_frame):
    """p_frame = 0: every frame of a clip shares its level (the sampler's case); p_frame = 1:
    every frame draws its own (Diffusion Forcing); in between, about that share of the clips."""
    seen = []

    class Spy(torch.nn.Module):
        def forward(self, x, sigma, event):
            seen.append(sigma)
            return torch.zeros_like(x)
    torch.manual_seed(0)
    teacher.fm_loss(Spy(), torch.zeros(400, 4, 3, 16, 16), torch.zeros(400, 4, dtype=torch.long), 0.5, p_frame)
    per_frame = (seen[0].std(1) > 0).float().mean().item()      # share of clips whose frames differ in level
    assert abs(per_frame - p_frame) < 0.08 and ((seen[0] > 0) & (seen[0] < 1)).all()


def test_model_args_and_world_come_from_the_config(tmp_path):
    cfg = tiny_cfg(tmp_path, size=32, sprite=6, speed=1, rho=0.5)
    assert build(teacher.model_args(cfg)).mc.size == 32 and teacher.model_args(cfg)["dim"] == 32
    assert teacher.world_of(cfg) == World(size=32, sprite=6, speed=1, rho=0.5)


def test_sampler_shapes():
    m = build(teacher.model_args(teacher.TeacherConfig(dim=32, depth=2, heads=2)))
    noise = torch.randn(3, 4, 3, 16, 16)
    per_frame = torch.tensor([[0, 0, 3, 3], [1, 1, 1, 1], [4, 4, 2, 2]])
    for g in (0.0, 1.5):
        for event in (torch.tensor([0, 1, 4]), per_frame):      # one event per clip, or per frame
            x = teacher.sample(m, event, noise, teacher.euler_grid(3), guidance=g)
            assert x.shape == noise.shape and torch.isfinite(x).all()


def test_main_end_to_end_and_resume(tmp_path, capsys):
    teacher.main(tiny_cfg(tmp_path, steps=2))
    ck = load_checkpoint(str(tmp_path / "teacher.pt"), ["teacher"], "python teacher.py")
    assert ck["step"] == 2 and {"follow", "valid", "canon", "react", "latency"} <= set(ck["metrics"])
    steps = [float((c - b).norm()) * (2 * 4 * 2) ** 0.5 for c in World().colors for b in BACKGROUNDS]
    assert min(abs(ck["natural_step"] - s) for s in steps) < 1e-4   # the median transition: one 2-pixel step
    teacher.main(tiny_cfg(tmp_path, steps=4, resume=True))
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
    assert cfg.size == 32 and cfg.lr == 0.1 and cfg.resume is True and cfg.preset == "small"
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
def test_cli_bad_flags(args, words, capsys, monkeypatch):
    assert_one_line_exit_2(*run_cli("teacher.py", args, capsys, monkeypatch), *words)


def test_cli_corrupt_checkpoint_on_resume(tmp_path, capsys, monkeypatch):
    (tmp_path / "teacher.pt").write_bytes(b"\x00" * 100)
    args = [f"--out_dir={tmp_path}", "--resume=True", "--max_steps=1"]
    assert_one_line_exit_2(*run_cli("teacher.py", args, capsys, monkeypatch), "corrupt", "python teacher.py")
