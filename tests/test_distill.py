"""The DMD gradient, the Self Forcing rollout, ODE pairs, evaluation, and distill.py end to end."""
import dataclasses
import os

import pytest
import torch
import torch.nn as nn

import distill
import teacher
from common import load_checkpoint
from config import BadInput
from conftest import CH, SIGMAS, assert_one_line_error, distill_cfg, randomized, run, stream_setup, tiny_cfg
from model import add_noise, build, pred_x0
from streaming import KVCache, rollout
from metrics import switches
from world import World, eval_events


# ----------------------------------------------------------------------------- the DMD gradient

class GaussianScore(nn.Module):
    """The exact flow-matching velocity of data N(mu, s^2 I) (a stand-in for teacher or critic)."""
    null_event = 9

    def __init__(self, mu, s=1.0):
        super().__init__()
        self.mu, self.s = mu, s

    def forward(self, x, sigma, event):
        sg = sigma[..., None, None, None]
        a, mu = 1 - sg, self.mu.detach()
        x0 = mu + a * self.s ** 2 / (a ** 2 * self.s ** 2 + sg ** 2) * (x - a * mu)    # E[x0 | x_sigma]
        return (x - x0) / sg


def test_dmd_gradient_is_zero_when_fake_equals_real():
    torch.manual_seed(0)
    m = randomized()
    x = torch.randn(2, 4, 3, 16, 16, requires_grad=True)
    event = torch.randint(5, (2, 4))
    per_frame, aux = distill.dmd_loss(x, event, teacher=m, critic=m, guidance=0.0, shift=3.0)
    per_frame.mean().backward()
    assert per_frame.shape == (2, 4)
    assert aux["grad"].abs().max() == 0 and x.grad.abs().max() == 0


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_dmd_step_moves_generator_mean_toward_teacher(shift):
    torch.manual_seed(0)
    mu_real = torch.tensor([2.0, -1.0]).view(1, 1, 1, 1, 2)
    mu_gen = nn.Parameter(torch.zeros(1, 1, 1, 1, 2))        # generator: x = mu_gen + z
    opt = torch.optim.SGD([mu_gen], lr=0.5)
    start = (mu_gen - mu_real).norm().item()
    for _ in range(20):
        x = mu_gen + torch.randn(256, 1, 1, 1, 2)
        per_frame, _ = distill.dmd_loss(x, torch.zeros(256, 1, dtype=torch.long), teacher=GaussianScore(mu_real),
                                        critic=GaussianScore(mu_gen), guidance=0.0, shift=shift)
        opt.zero_grad()
        per_frame.mean().backward()
        assert (mu_gen.grad.view(2) * (mu_gen - mu_real).view(2)).sum() > 0   # descent points toward the teacher
        opt.step()
    assert (mu_gen - mu_real).norm().item() < 0.5 * start


def test_critic_loss_is_flow_matching_on_its_input():
    m = randomized()
    x = torch.randn(2, 4, 3, 16, 16)
    loss = distill.critic_loss(m, x, torch.zeros(2, 4, dtype=torch.long), 3.0)
    loss.backward()
    assert loss.item() > 0 and m.final_layer.weight.grad.abs().max() > 0


def test_critic_loss_on_the_new_frames_only_is_their_share_of_the_mean():
    """LongLive's critic mask: the loss over frames [F F T T] is the mean of those two frames' terms,
    and with every frame in the mask it is the whole window's loss."""
    m, x, ev = randomized(), torch.randn(2, 4, 3, 16, 16), torch.zeros(2, 4, dtype=torch.long)
    losses = []
    for frames in (None, torch.tensor([False, False, True, True]), torch.ones(4, dtype=torch.bool)):
        torch.manual_seed(0)
        losses.append(distill.critic_loss(m, x, ev, 3.0, frames))
    torch.manual_seed(0)
    sigma = distill.dmd_sigma(2, 3.0, x.device)[:, None].expand(2, 4)
    eps = torch.randn_like(x)
    v = m(add_noise(x, eps, sigma), sigma, ev)
    per_frame = ((v - (eps - x)) ** 2).mean(dim=(2, 3, 4))
    assert torch.allclose(losses[1], per_frame[:, 2:].mean()) and torch.allclose(losses[0], losses[2])


def test_critic_update_steps_the_critic_only():
    critic, student = randomized(0), randomized(1)
    opt_critic = torch.optim.SGD(critic.parameters(), lr=0.1)
    before, s_before = critic.final_layer.weight.clone(), student.final_layer.weight.clone()
    x = torch.randn(2, 4, 3, 16, 16)
    nets = distill.DMDNets(teacher=None, student=student, ema=None, critic=critic, opt=None, opt_critic=opt_critic)
    loss = distill.critic_update(nets, x, torch.zeros(2, 4, dtype=torch.long), shift=3.0, grad_clip=10.0)
    assert torch.isfinite(loss) and (critic.final_layer.weight - before).abs().max() > 0
    assert torch.equal(student.final_layer.weight, s_before)


def test_dmd_update_steps_the_student_and_the_critic(tmp_path):
    student, critic, frozen = randomized(0), randomized(1), randomized(2).requires_grad_(False)
    cfg = distill_cfg(tmp_path, critic_ratio=2)
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    opt_critic = torch.optim.SGD(critic.parameters(), lr=0.1)
    s0, c0, t0 = (m.final_layer.weight.clone() for m in (student, critic, frozen))
    torch.manual_seed(0)
    nets = distill.DMDNets(teacher=frozen, student=student, ema=None, critic=critic, opt=opt, opt_critic=opt_critic)
    loss, closs, gnorm, applied = distill.dmd_update(nets, cfg, sigmas=stream_setup()["sigmas"], shape=(2, 4, 16),
                                                     gen=torch.Generator().manual_seed(0))
    assert applied and torch.isfinite(loss) and torch.isfinite(closs) and gnorm > 0
    assert (student.final_layer.weight - s0).abs().max() > 0 and (critic.final_layer.weight - c0).abs().max() > 0
    assert torch.equal(frozen.final_layer.weight, t0)           # the teacher is never trained


# ----------------------------------------------------------------------------- the rollout

def roll(m, noise, event, seed=0, **kw):
    torch.manual_seed(seed)                                       # the same re-noising draws
    return rollout(m, noise, event, SIGMAS, CH, KVCache(2, 64), **kw)


def test_later_chunks_use_earlier_chunks():
    m = randomized()
    noise, event = torch.randn(2, 6, 3, 16, 16), torch.zeros(2, 6, dtype=torch.long)
    noise2 = noise.clone()
    noise2[:, :2] = torch.randn(2, 2, 3, 16, 16)                  # a different first chunk
    with torch.no_grad():
        a, b = roll(m, noise, event), roll(m, noise2, event)
    assert (a[:, 2:] - b[:, 2:]).abs().max() > 1e-3


def test_rollout_equals_recomputing_the_prefix():
    """Streaming through the cache gives exactly what re-running the whole causal prefix gives."""
    m = randomized()
    noise, event = torch.randn(2, 6, 3, 16, 16), torch.randint(5, (2, 6))
    with torch.no_grad():
        streamed = roll(m, noise, event, switch="keep")          # the prefix keeps its own events
        torch.manual_seed(0)
        done = []
        for i in range(0, 6, CH):                                 # no cache: the clean prefix goes in every time
            x = noise[:, i:i + CH]
            for k, s in enumerate(SIGMAS):
                seq = torch.cat(done + [x], 1)
                sig = torch.cat([torch.zeros(2, i), torch.full((2, CH), float(s))], 1)
                x0 = pred_x0(x, m(seq, sig, event[:, :i + CH], causal_chunk=CH)[:, i:], sig[:, i:])
                if k < len(SIGMAS) - 1:
                    x = add_noise(x0, torch.randn_like(x0), torch.full((2, CH), float(SIGMAS[k + 1])))
            done.append(x0)
    assert torch.allclose(streamed, torch.cat(done, 1), atol=1e-5)


def test_rollout_with_a_generator_leaves_the_global_rng_alone():
    m = randomized()
    noise, event = torch.randn(2, 4, 3, 16, 16), torch.zeros(2, 4, dtype=torch.long)
    state = torch.get_rng_state()
    with torch.no_grad():
        a = rollout(m, noise, event, SIGMAS, CH, KVCache(2, 8), gen=torch.Generator().manual_seed(3))
        b = rollout(m, noise, event, SIGMAS, CH, KVCache(2, 8), gen=torch.Generator().manual_seed(3))
        c = rollout(m, noise, event, SIGMAS, CH, KVCache(2, 8), gen=torch.Generator().manual_seed(4))
    assert torch.equal(state, torch.get_rng_state())
    assert torch.equal(a, b) and (a - c).abs().max() > 1e-3     # the re-noising draws come from gen


def test_gradient_only_from_the_shared_exit_step():
    m = randomized()
    calls = []
    orig = m.forward

    def spy(x, sigma, event, return_kv=False, **kw):
        calls.append((round(float(sigma[0, 0]), 3), torch.is_grad_enabled(), return_kv))
        return orig(x, sigma, event, return_kv=return_kv, **kw)
    m.forward = spy
    noise = torch.randn(2, 6, 3, 16, 16, requires_grad=True)
    out = roll(m, noise, torch.zeros(2, 6, dtype=torch.long), exit_step=2)
    per_chunk = [calls[i:i + 4] for i in range(0, len(calls), 4)]
    assert len(per_chunk) == 3
    for c in per_chunk:                                           # levels 0..2 then the clean write
        assert [s for s, _, _ in c] == [1.0, 0.9, 0.75, 0.0]
        assert [g for _, g, _ in c] == [False, False, True, False]    # only the exit step keeps a graph
        assert [w for _, _, w in c] == [False, False, False, True]    # and the cache write has none
    out[:, 4:].sum().backward()
    assert noise.grad is None                                     # steps before the exit hold no graph
    assert m.final_layer.weight.grad.abs().max() > 0
    m.zero_grad()
    out = roll(m, noise, torch.zeros(2, 6, dtype=torch.long), exit_step=0)
    out[:, 4:].sum().backward()                                   # the last chunk's loss ...
    assert noise.grad[:, :4].abs().max() == 0                     # ... reaches no earlier chunk through the cache
    assert noise.grad[:, 4:].abs().max() > 0


# ----------------------------------------------------------------------------- ODE init

def test_stream_args_hold_the_shifted_levels():
    cfg = distill.DistillConfig(timesteps="1,0.5", shift=3.0, chunk=2, n_sink=2, n_window=8)
    s = distill.stream_args(cfg, 8)
    assert s == dict(chunk=2, sigmas=pytest.approx([1.0, 0.75]), n_sink=2, n_window=8, window=8, shift=3.0)


def test_ode_pairs_follow_per_frame_schedules_and_the_seed(teacher_dir):
    tck = load_checkpoint(str(teacher_dir / "teacher.pt"), ["teacher"], "")
    model = build(tck["model_args"], tck["ema"]).eval()
    sigmas = stream_setup()["sigmas"]

    def pairs(seed):
        return distill.ode_pairs(model, tck, 8, sigmas=sigmas, chunk=2, p_switch=1.0, device="cpu",
                                 gen=torch.Generator().manual_seed(seed))
    xs, x0, event = pairs(0)
    T = tck["config"]["frames"]
    assert xs.shape == (8, len(sigmas), T, 3, 16, 16) and x0.shape == (8, T, 3, 16, 16) and event.shape == (8, T)
    assert all(len(switches(e)) == 1 for e in event)             # p_switch = 1: every pair switches once
    again, other = pairs(0), pairs(1)
    assert all(torch.equal(a, b) for a, b in zip((xs, x0, event), again))
    assert not torch.equal(xs, other[0])                         # another --seed: other data
    loss = distill.ode_loss(randomized(), xs, x0, event, sigmas, 2)
    assert loss.ndim == 0 and torch.isfinite(loss) and loss > 0


# ----------------------------------------------------------------------------- evaluation

def test_evaluation_never_touches_the_global_rng():
    m = randomized()
    tck = dict(config=dict(frames=8, size=16), world=dataclasses.asdict(World()))
    torch.manual_seed(123)
    state = torch.get_rng_state()
    metrics, one, sw = distill.evaluate(m, stream_setup(), tck, 3, torch.device("cpu"))
    assert torch.equal(state, torch.get_rng_state())
    assert one.shape == sw.shape == (3, 8, 3, 16, 16)
    assert {"follow", "valid", "canon", "react", "latency", "identity", "switch_valid"} <= set(metrics)
    again = distill.evaluate(m, stream_setup(), tck, 3, torch.device("cpu"))
    assert torch.equal(one, again[1]) and torch.equal(sw, again[2])      # its own seed: the same clips every time


def test_teacher_evaluation_never_touches_the_global_rng(tmp_path):
    cfg = tiny_cfg(tmp_path)
    m = build(teacher.model_args(cfg))
    state = torch.get_rng_state()
    metrics, one, sw = teacher.evaluate(m, cfg, 2, torch.device("cpu"))
    assert torch.equal(state, torch.get_rng_state())
    assert one.shape == sw.shape == (2, cfg.frames, 3, cfg.size, cfg.size) and "react" in metrics


def test_eval_events_cover_one_event_and_switch_clips():
    one, sw = eval_events(20, 8, 2)
    assert (one == one[:, :1]).all() and set(one[:, 0].tolist()) == set(range(5))
    assert all(switches(e) and switches(e)[0][0] == 4 and len(switches(e)) == 1 for e in sw)
    assert len({tuple(e[[0, -1]].tolist()) for e in sw}) == 20  # distinct ordered pairs


# ----------------------------------------------------------------------------- end to end

def test_distill_end_to_end_and_resume(teacher_dir, tmp_path, capsys):
    t = str(teacher_dir / "teacher.pt")
    distill.main(distill_cfg(tmp_path, teacher=t, max_steps=2))
    ck = load_checkpoint(str(tmp_path / "student.pt"), ["student"], "python distill.py")
    assert ck["step"] == 2 and ck["phase"] == "dmd" and {"follow", "valid", "canon", "react"} <= set(ck["metrics"])
    distill.main(distill_cfg(tmp_path, teacher=t, dmd_steps=3, resume=True))
    assert "resumed" in capsys.readouterr().out
    assert load_checkpoint(str(tmp_path / "student.pt"), ["student"], "")["step"] == 3
    assert os.path.exists(tmp_path / "student_samples.gif") and os.path.exists(tmp_path / "teacher_vs_student.png")


def test_different_seeds_give_different_data(teacher_dir, tmp_path):
    t = str(teacher_dir / "teacher.pt")
    weights = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        distill.main(distill_cfg(tmp_path / name, teacher=t, max_steps=1, seed=seed, eval_samples=4))
        weights[name] = torch.load(tmp_path / name / "student.pt", weights_only=True)["model"]
    assert all(torch.equal(weights["a"][k], weights["b"][k]) for k in weights["a"])     # a seed is reproducible
    assert any(not torch.equal(weights["a"][k], weights["c"][k]) for k in weights["a"])  # another seed, other data


def test_missing_or_mismatched_teacher(teacher_dir, student_dir, tmp_path):
    with pytest.raises(BadInput, match="not found"):
        distill.main(distill_cfg(tmp_path, teacher=str(tmp_path / "none.pt")))
    with pytest.raises(BadInput, match="do not split into chunks"):
        distill.main(distill_cfg(tmp_path, teacher=str(teacher_dir / "teacher.pt"), chunk=3, n_window=3))
    r = run("distill.py", f"--out_dir={tmp_path}", f"--teacher={student_dir / 'student.pt'}")
    assert_one_line_error(r, "student checkpoint, not teacher", "python teacher.py")
