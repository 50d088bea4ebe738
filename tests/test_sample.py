"""sample.py: streaming generation (a video depends only on its own seed, never on its batch),
the one stepper, GIF/PNG output, and one clear line for every bad input."""
import os

import pytest
import torch

import sample
from conftest import assert_one_line_error, assert_one_line_exit_2, randomized, run, run_cli, stream_setup
from world import World


def random_generator(**kw):
    return sample.StreamModel(randomized(), stream_setup(**kw), World())


def test_generator_holds_model_stream_and_world():
    g = random_generator(chunk=2)
    assert g.chunk == 2 and g.world.size == 16 and g.stream["n_window"] == 8


@pytest.mark.parametrize("switch", ["recache", "clear", "keep"])
def test_a_video_does_not_depend_on_its_batch(switch):
    """Video 0 (seed 5) generated alone, and next to another video (seed 9, another schedule, a
    switch at another frame): the same frames. Its noise and re-noising come from its own seed."""
    g = random_generator()
    one = sample.schedule_tensor("right@0,up@4", 8, 2, 1, "cpu")
    two = torch.cat([one, sample.schedule_tensor("down@0,left@2,stay@6", 8, 2, 1, "cpu")])
    a = sample.generate(g, one, [5], switch)
    b = sample.generate(g, two, [5, 9], switch)
    assert a.abs().max() > 0.1 and a.shape[1] == 8              # a real, non-zero generator
    assert torch.allclose(a, b[0:1], atol=1e-5), (a - b[0:1]).abs().max()
    assert (b[0] - b[1]).abs().max() > 1e-2
    c = sample.generate(g, one, [6], switch)
    assert (a - c).abs().max() > 1e-2                            # another seed, another video


def test_generate_hands_over_chunks_as_they_come():
    g = random_generator()
    ev = sample.schedule_tensor("right@0", 6, 2, 2, "cpu")
    chunks = []
    x = sample.generate(g, ev, [1, 2], "recache", on_chunk=chunks.append)
    assert x is None and len(chunks) == 3 and all(c.shape == (2, 2, 3, 16, 16) for c in chunks)
    whole = sample.generate(g, ev, [1, 2], "recache")
    assert torch.equal(torch.cat(chunks, 1), whole)


def test_generate_leaves_the_global_rng_alone():
    g = random_generator()
    state = torch.get_rng_state()
    sample.generate(g, sample.schedule_tensor("right@0,up@2", 4, 2, 1, "cpu"), [3], "recache")
    assert torch.equal(state, torch.get_rng_state())


def test_load_generator_and_same_seed(student_dir):
    st = str(student_dir / "student.pt")
    g = sample.load_generator(st, "cpu")
    assert isinstance(g, sample.StreamModel) and g.chunk == 2
    ev = sample.schedule_tensor("right@0,up@4", 8, 2, 1, "cpu")
    a = sample.generate(g, ev, [7], "recache")
    b = sample.generate(g, ev, [7], "recache")
    c = sample.generate(g, ev, [8], "recache")
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_player_steps_chunk_by_chunk_as_generate_does():
    """The one stepper: chunks taken one at a time from a Player equal generate's whole video."""
    g = random_generator()
    ev = sample.schedule_tensor("right@0,up@4", 8, 2, 2, "cpu")
    player = sample.Player(g, [3, 4], "recache")
    steps = torch.cat([player.next_chunk(ev[:, i:i + 2]) for i in range(0, 8, 2)], 1)
    whole = sample.generate(g, ev, [3, 4], "recache")
    assert torch.equal(steps, whole)


def test_load_generator_weights(student_dir):
    st = str(student_dir / "student.pt")
    ema, raw = sample.load_generator(st, "cpu"), sample.load_generator(st, "cpu", "model")
    ck = torch.load(st, weights_only=True)
    assert all(torch.equal(v, ck["ema"][k]) for k, v in ema.model.state_dict().items())
    assert all(torch.equal(v, ck["model"][k]) for k, v in raw.model.state_dict().items())
    assert ema.stream == ck["stream"] and ema.world == World(**ck["world"])


def test_sample_writes_gif_and_png(student_dir, tmp_path, capsys):
    out = str(tmp_path / "v.gif")
    sample.main(sample.SampleConfig(ckpt=str(student_dir / "student.pt"), events="right@0,up@4", frames=8, out=out))
    assert os.path.exists(out) and os.path.exists(tmp_path / "v.png")
    assert "frames/s" in capsys.readouterr().out


@pytest.mark.parametrize("args,words", [
    (["--events=fly@0"], ["unknown event"]),
    (["--events=right@0,up"], ["malformed"]),
    (["--events=right@0,up@40", "--frames=16"], ["past the end"]),
    (["--frames=0"], ["positive"]),
    (["--out=/proc/forbidden/x.gif", "--frames=4", "--events=right@0"], ["cannot write"]),
])
def test_sample_bad_input(student_dir, args, words, capsys, monkeypatch):
    code, err = run_cli("sample.py", [f"--ckpt={student_dir / 'student.pt'}", *args], capsys, monkeypatch)
    assert_one_line_exit_2(code, err, *words)


def test_sample_wrong_stage(teacher_dir):                        # in a fresh interpreter, as a user types it
    assert_one_line_error(run("sample.py", f"--ckpt={teacher_dir / 'teacher.pt'}"), "teacher checkpoint", "python distill.py")
