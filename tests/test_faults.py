"""Faults and bad input: kill -9 and resume, non-finite losses, one clear line for every bad
input, bit-identical samples for a seed, and live steering in a real terminal (tmux)."""
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import imageio.v2 as imageio
import pytest
import torch

import distill
import teacher
from common import load_checkpoint, optimizer_step
from conftest import (ROOT, TEACHER_FLAGS, assert_one_line_error, assert_one_line_exit_2, distill_cfg, run, run_cli,
                      tiny_cfg)


# ----------------------------------------------------------------------------- kill -9, resume, non-finite

def test_kill_9_at_random_moments_leaves_a_checkpoint_that_resumes(tmp_path):
    rng = random.Random(0)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for attempt in range(3):
        p = subprocess.Popen([sys.executable, os.path.join(ROOT, "teacher.py"), f"--out_dir={tmp_path}", *TEACHER_FLAGS,
                              "--steps=100000", "--resume=True"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        t0 = time.time()
        while not (tmp_path / "teacher.pt").exists() and time.time() - t0 < 60:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.5))                       # then a random moment, mid-write or not
        p.send_signal(signal.SIGKILL)
        p.wait()
        ck = load_checkpoint(str(tmp_path / "teacher.pt"), ["teacher"], "")   # readable after every kill
        assert ck["step"] >= 1
    r = run("teacher.py", f"--out_dir={tmp_path}", *TEACHER_FLAGS, f"--steps={ck['step'] + 2}", "--resume=True")
    assert r.returncode == 0, r.stderr
    assert f"resumed {tmp_path / 'teacher.pt'} at step {ck['step']}" in r.stdout
    assert load_checkpoint(str(tmp_path / "teacher.pt"), ["teacher"], "")["step"] == ck["step"] + 2


@pytest.mark.parametrize("fused", [True, False])
def test_a_non_finite_step_leaves_weights_moments_and_count_alone(fused):
    """A non-finite step is skipped, with fused AdamW and with any other optimizer."""
    torch.manual_seed(0)
    m = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(m.parameters(), lr=0.1, fused=fused)
    optimizer_step(m, opt, m(torch.ones(1, 3)).sum(), 1.0)
    weights = {k: v.clone() for k, v in m.state_dict().items()}
    moments = [{k: v.clone() for k, v in s.items()} for s in opt.state.values()]
    _, applied = optimizer_step(m, opt, m(torch.ones(1, 3)).sum() * float("nan"), 1.0)
    assert not applied
    assert all(torch.equal(v, weights[k]) for k, v in m.state_dict().items())
    assert all(torch.equal(v, old[k]) for s, old in zip(opt.state.values(), moments) for k, v in s.items())
    _, applied = optimizer_step(m, opt, m(torch.ones(1, 3)).sum(), 1.0)
    assert applied and all(int(s["step"]) == 2 for s in opt.state.values())


def test_non_finite_losses_are_skipped_and_counted(tmp_path, monkeypatch, teacher_dir, capsys):
    real_fm, calls = teacher.fm_loss, []

    def nan_on_second(*a):
        calls.append(1)
        loss = real_fm(*a)
        return loss * float("nan") if len(calls) == 2 else loss
    monkeypatch.setattr(teacher, "fm_loss", nan_on_second)
    teacher.main(tiny_cfg(tmp_path, steps=4, ckpt_every=100))
    ck = load_checkpoint(str(tmp_path / "teacher.pt"), ["teacher"], "")
    assert ck["step"] == 4 and ck["skipped"] == 1 and "skipped 1" in capsys.readouterr().out
    assert all(torch.isfinite(v).all() for v in ck["model"].values())
    adam = ck["optimizer"]["state"][0]                           # skipped on the device: AdamW took 3 steps, not 4
    assert int(adam["step"]) == 3 and torch.isfinite(adam["exp_avg"]).all() and torch.isfinite(adam["exp_avg_sq"]).all()

    real_dmd, calls = distill.dmd_loss, []

    def dmd_nan_on_first(x, *a, **kw):
        calls.append(1)
        per_frame, aux = real_dmd(x, *a, **kw)
        return (per_frame * float("nan") if len(calls) == 1 else per_frame), aux
    monkeypatch.setattr(distill, "dmd_loss", dmd_nan_on_first)
    distill.main(distill_cfg(tmp_path / "d", teacher=str(teacher_dir / "teacher.pt"), max_steps=3))
    ck = load_checkpoint(str(tmp_path / "d" / "student.pt"), ["student"], "")
    assert ck["skipped"] == 1 and all(torch.isfinite(v).all() for v in ck["model"].values())


# ----------------------------------------------------------------------------- one line for every bad input

@pytest.mark.parametrize("script,args,words", [
    ("teacher.py", ["--out_dir=/proc/nope"], ["cannot write checkpoints", "/proc/nope"]),
    ("teacher.py", ["--lr=fast"], ["--lr", "not a float"]),
    ("teacher.py", ["--compile=maybe"], ["--compile"]),
    ("teacher.py", ["--frames=5"], ["--frames=5 must be a multiple of --chunk=2"]),
    ("distill.py", ["--out_dir=/proc/nope"], ["cannot write checkpoints"]),
    ("longtune.py", ["--switch_cache=sometimes"], ["recache, keep, clear"]),
    ("longtune.py", ["--window_events=sometimes"], ["true, current"]),
    ("longtune.py", ["--context=3"], ["--context=3", "chunks"]),
    ("longtune.py", ["--tau=-1"], ["--tau=-1.0", "> 0"]),
    ("longtune.py", ["--band_levels=0.5,x"], ["--band_levels", "noise levels in (0, 1]"]),
    ("longtune.py", ["--band_levels=0.5,1.2"], ["--band_levels", "noise levels in (0, 1]"]),
    ("longtune.py", ["--trust_const=1.5"], ["--trust_const"]),
    ("teacher.py", ["--batch=-3"], ["--batch=-3", "positive integer"]),
    ("tools/evaluate.py", ["--seeds=0"], ["--seeds=0", "positive integer"]),
    ("sample.py", ["--frames=-8"], ["positive"]),
    ("sample.py", ["--events=right@0,up@8,left@4", "--frames=16"], ["must increase"]),
    ("sample.py", ["--events=up@3", "--frames=16"], ["must start at frame 0"]),
    ("sample.py", ["--events=right@-2", "--frames=16"], ["non-negative integer"]),
    ("sample.py", ["--out=out/x.png"], [".gif or .mp4"]),
    ("sample.py", ["--live"], ["needs a terminal"]),
    ("sample.py", ["--weights=best"], ["ema, model"]),
    ("tools/evaluate.py", ["--json=/proc/nope/e.json"], ["cannot write --json"]),
    ("tools/evaluate.py", ["--schedule_file=/nonexistent.json"], ["cannot read --schedule_file"]),
    ("tools/evaluate.py", ["--probe=all"], ["none, react, failures, clips"]),
    ("tools/bench.py", ["--compile=fast"], ["auto, on, off"]),
])
def test_bad_input_is_one_line_and_exit_2(student_dir, script, args, words, capsys, monkeypatch):
    ck = [f"--ckpt={student_dir / 'student.pt'}"] if script == "sample.py" else []
    ck += [f"--ckpts={student_dir / 'student.pt'}"] if script == "tools/evaluate.py" else []
    ck += [f"--student={student_dir / 'student.pt'}"] if script == "longtune.py" else []
    ck += [f"--teacher={student_dir / 'teacher.pt'}"] if script == "distill.py" else []
    assert_one_line_exit_2(*run_cli(script, [*ck, *args], capsys, monkeypatch), *words)


def test_bad_schedule_file_contents(student_dir, tmp_path, capsys, monkeypatch):
    args = [f"--ckpts={student_dir / 'student.pt'}", f"--schedule_file={tmp_path / 's.json'}", "--frames=8"]
    (tmp_path / "s.json").write_text('["right@0,fly@4"]')
    assert_one_line_exit_2(*run_cli("tools/evaluate.py", args, capsys, monkeypatch), "unknown event 'fly'")
    (tmp_path / "s.json").write_text('["right@0,up@9"]')
    assert_one_line_exit_2(*run_cli("tools/evaluate.py", args, capsys, monkeypatch), "past the end")
    for text in ('{"right": 0}', "[]"):                          # not a list, or an empty one
        (tmp_path / "s.json").write_text(text)
        assert_one_line_exit_2(*run_cli("tools/evaluate.py", args, capsys, monkeypatch), "JSON list of schedule strings")


@pytest.mark.parametrize("script,ckpt_arg,words", [
    ("teacher.py", None, ["student checkpoint, not teacher", "python teacher.py"]),
    ("distill.py", "--teacher=student.pt", ["student checkpoint, not teacher", "python teacher.py"]),
    ("longtune.py", "--student=teacher.pt", ["teacher checkpoint, not student", "python distill.py"]),
    ("sample.py", "--ckpt=teacher.pt", ["teacher checkpoint", "python distill.py"]),
])
def test_wrong_stage_names_the_command_that_makes_the_right_one(student_dir, tmp_path, script, ckpt_arg, words,
                                                               capsys, monkeypatch):
    if ckpt_arg is None:                                         # --resume finds a student where the teacher should be
        shutil.copy(student_dir / "student.pt", tmp_path / "teacher.pt")
        args = [f"--out_dir={tmp_path}", "--resume=True"]
    else:
        key, name = ckpt_arg.split("=")
        args = [f"{key}={student_dir / name}"] + ([f"--out_dir={tmp_path}"] if script != "sample.py" else [])
    assert_one_line_exit_2(*run_cli(script, args, capsys, monkeypatch), *words)


def test_truncated_checkpoint_is_one_line(student_dir, tmp_path):
    data = (student_dir / "student.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[:len(data) // 2])
    assert_one_line_error(run("sample.py", f"--ckpt={tmp_path / 'cut.pt'}"), "truncated or corrupt", "python distill.py")


def test_same_seed_gives_bit_identical_files(student_dir, tmp_path, capsys, monkeypatch):
    for name in ("a", "b", "c"):
        seed = "--seed=3" if name != "c" else "--seed=4"
        args = [f"--ckpt={student_dir / 'student.pt'}", "--frames=8", "--events=right@0,up@4", seed, f"--out={tmp_path / name}.gif"]
        assert run_cli("sample.py", args, capsys, monkeypatch)[0] == 0
    a, b, c = ((tmp_path / f"{n}.gif").read_bytes() for n in "abc")
    assert a == b and a != c


# ----------------------------------------------------------------------------- live steering, in tmux

def tmux(*args):
    return subprocess.run(["tmux", "-L", "dftest", *args], capture_output=True, text=True).stdout


def wait_for(text, timeout=60):
    t0 = time.time()
    while time.time() - t0 < timeout:
        screen = tmux("capture-pane", "-p", "-t", "live")
        if text in screen:
            return screen
        time.sleep(0.2)
    raise AssertionError(f"{text!r} never appeared; the screen was:\n{screen}")


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
@pytest.mark.parametrize("stop", ["q", "C-c", "SIGTERM"])
def test_live_in_tmux_steers_saves_and_restores_the_terminal(student_dir, tmp_path, stop):
    gif, pid = tmp_path / "live.gif", tmp_path / "pid"
    cmd = (f"sh -c 'echo $$ > {pid}; exec env OMP_NUM_THREADS=1 {sys.executable} sample.py --live "
           f"--ckpt={student_dir / 'student.pt'} --events=up@0 --fps=30 --out={gif}'; echo EXIT=$?; stty -a; "
           f"echo STTY-DONE; sleep 60")
    tmux("kill-server")
    tmux("new-session", "-d", "-s", "live", "-x", "250", "-y", "50", "-c", ROOT, cmd)
    try:
        wait_for("event up")
        tmux("send-keys", "-t", "live", "Right")
        wait_for("event right")                                  # the arrow key switched the event
        if stop == "SIGTERM":
            os.kill(int(pid.read_text()), signal.SIGTERM)
        else:
            tmux("send-keys", "-t", "live", stop)
        screen = wait_for("STTY-DONE")                         # after the exit code and the terminal modes
    finally:
        tmux("kill-server")
    code = {"q": "EXIT=0", "C-c": "EXIT=0", "SIGTERM": "EXIT=143"}[stop]
    assert code in screen, screen
    words = screen.split()                                       # stty -a: cooked mode is back
    assert "echo" in words and "icanon" in words and "-echo" not in words and "-icanon" not in words
    if stop != "SIGTERM":
        assert "frames ->" in screen and len(imageio.mimread(str(gif))) >= 2   # the session was saved
