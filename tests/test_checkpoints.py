"""One checkpoint schema for every stage, loadable compiled or not, and a clear refusal of
checkpoints written by an older version of the code."""
import dataclasses

import pytest
import torch

import distill
import longtune
import teacher
from common import FORMAT, load_checkpoint, resume, save_checkpoint, states
from config import BadInput
from conftest import MODEL_ARGS, assert_one_line_exit_2, longtune_cfg, randomized, run_cli
from model import build
from world import World

COMMON = {"stage", "format", "model_args", "world", "config", "model", "ema", "optimizer", "step", "metrics", "rng"}


def check_schema(ck, stage, extra=()):
    assert COMMON | set(extra) <= set(ck), set(COMMON | set(extra)) - set(ck)
    assert ck["stage"] == stage
    net = build(ck["model_args"])                                # model_args rebuild the network
    keys = set(net.state_dict())
    for name in ("model", "ema") + (("critic",) if "critic" in extra else ()):
        assert set(ck[name]) == keys and not any(k.startswith("_orig_mod.") for k in ck[name])
        net.load_state_dict(ck[name])                            # strict: loads as it is
    World(**ck["world"])                                         # world rebuilds the toy world
    assert isinstance(ck["config"], dict) and isinstance(ck["metrics"], dict)
    assert isinstance(ck["optimizer"], dict) and "state" in ck["optimizer"]


def test_every_stage_writes_one_schema(teacher_dir, student_dir, tmp_path):
    tck = load_checkpoint(str(teacher_dir / "teacher.pt"), ["teacher"], "")
    check_schema(tck, "teacher", ["natural_step", "gen"])
    assert tck["config"] == dataclasses.asdict(teacher.TeacherConfig(**tck["config"]))
    sck = load_checkpoint(str(student_dir / "student.pt"), ["student"], "")
    check_schema(sck, "student", ["stream", "critic", "critic_optimizer", "natural_step", "phase"])
    assert set(sck["stream"]) == {"chunk", "sigmas", "n_sink", "n_window", "window", "shift"}
    assert sck["model_args"] == tck["model_args"] and sck["world"] == tck["world"]
    assert sck["config"] == dataclasses.asdict(distill.DistillConfig(**sck["config"]))
    longtune.main(longtune_cfg(tmp_path, student_dir / "student.pt", max_steps=1))
    lck = load_checkpoint(str(tmp_path / "longtune.pt"), ["longtune"], "")
    check_schema(lck, "longtune", ["stream", "critic", "critic_optimizer", "natural_step"])
    assert lck["stream"] == sck["stream"] and lck["model_args"] == sck["model_args"]
    assert lck["config"] == dataclasses.asdict(longtune.LongtuneConfig(**lck["config"]))


def test_a_compiled_model_saves_plain_keys_and_resumes(tmp_path):
    from common import compile_
    m = compile_(randomized(), True, backend="eager")
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(3)
    path = str(tmp_path / "t.pt")
    save_checkpoint(path, dict(stage="teacher", format=FORMAT, model_args=MODEL_ARGS, world={}, config={}, step=7, metrics={},
                               **states(gen, model=m, ema=m, optimizer=opt)))
    ck = load_checkpoint(path, ["teacher"], "")
    assert not any("_orig_mod" in k for k in ck["model"])
    fresh, fresh_gen = build(MODEL_ARGS), torch.Generator()
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.1)
    cfg = type("Cfg", (), dict(resume=True))
    got = resume(cfg, path, "teacher", "python teacher.py", fresh_gen, model=fresh, optimizer=fresh_opt)
    assert got["step"] == 7 and torch.equal(fresh_gen.get_state(), gen.get_state())
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), m.state_dict().values()))
    torch._dynamo.reset()


def test_old_format_checkpoint_is_refused_with_the_command_that_remakes_it(tmp_path, capsys, monkeypatch):
    old = tmp_path / "old.pt"
    torch.save({"stage": "student", "model": {}, "ema": {}, "step": 3}, old)   # before model_args existed
    with pytest.raises(BadInput, match="older version.*remake it with `python distill.py`"):
        load_checkpoint(str(old), ["student"], "python distill.py")
    assert_one_line_exit_2(*run_cli("sample.py", [f"--ckpt={old}"], capsys, monkeypatch),
                           "older version", "python distill.py")
    assert_one_line_exit_2(*run_cli("longtune.py", [f"--student={old}", f"--out_dir={tmp_path}"], capsys, monkeypatch),
                           "older version", "python distill.py")
    torch.save({"stage": "teacher", "model": {}}, tmp_path / "teacher.pt")
    assert_one_line_exit_2(*run_cli("distill.py", [f"--out_dir={tmp_path}"], capsys, monkeypatch),
                           "older version", "python teacher.py")
