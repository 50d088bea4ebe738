"""DMD gradient, the Self Forcing rollout, and distill.py end to end (DESIGN section 6)."""
import os

import pytest
import torch
import torch.nn as nn

import distill
import teacher
from model import BadInput, KVCache, VideoDiT, add_noise, load_checkpoint, model_config, pred_x0, rollout
from test_model import CH, MC, randomized
from test_teacher import ROOT, TINY, assert_one_line_error, run, tiny_cfg


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
    per_frame, aux = distill.dmd_loss(x, event, m, m, guidance=0.0, shift=3.0)
    per_frame.mean().backward()
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
        per_frame, _ = distill.dmd_loss(x, torch.zeros(256, 1, dtype=torch.long), GaussianScore(mu_real),
                                        GaussianScore(mu_gen), guidance=0.0, shift=shift)
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


# ----------------------------------------------------------------------------- the rollout

LEVELS = torch.tensor([1.0, 0.9, 0.75, 0.5])


def roll(m, noise, event, seed=0, **kw):
    torch.manual_seed(seed)                                       # the same re-noising draws
    return rollout(m, noise, event, LEVELS, CH, KVCache(2, 64), **kw)


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
            for k, s in enumerate(LEVELS):
                seq = torch.cat(done + [x], 1)
                sig = torch.cat([torch.zeros(2, i), torch.full((2, CH), float(s))], 1)
                x0 = pred_x0(x, m(seq, sig, event[:, :i + CH], causal_chunk=CH)[:, i:], sig[:, i:])
                if k < len(LEVELS) - 1:
                    x = add_noise(x0, torch.randn_like(x0), torch.full((2, CH), float(LEVELS[k + 1])))
            done.append(x0)
    assert torch.allclose(streamed, torch.cat(done, 1), atol=1e-5)


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


# ----------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("pipeline")
    teacher.main(tiny_cfg(d, max_steps=2))
    return d


def distill_cfg(d, **kw):
    cfg = distill.DistillConfig(out_dir=str(d), ode_pairs=8, ode_steps=2, dmd_steps=2, batch=2,
                                critic_ratio=2, eval_samples=5, log_every=1)
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def test_distill_end_to_end_and_resume(teacher_dir, capsys):
    distill.main(distill_cfg(teacher_dir, max_steps=2))
    ck = load_checkpoint(str(teacher_dir / "student.pt"), ["student"], "python distill.py")
    assert ck["step"] == 2 and ck["phase"] == "dmd" and {"follow", "valid", "canon"} <= set(ck["metrics"])
    distill.main(distill_cfg(teacher_dir, dmd_steps=3, resume=True))
    assert "resumed" in capsys.readouterr().out
    assert load_checkpoint(str(teacher_dir / "student.pt"), ["student"], "")["step"] == 3
    assert os.path.exists(teacher_dir / "student_samples.gif")


def test_missing_or_mismatched_teacher(teacher_dir, tmp_path):
    with pytest.raises(BadInput, match="not found"):
        distill.main(distill_cfg(tmp_path, teacher=str(tmp_path / "none.pt")))
    with pytest.raises(BadInput, match="do not split into chunks"):
        distill.main(distill_cfg(teacher_dir, chunk=3))
    r = run("distill.py", f"--out_dir={tmp_path}", f"--teacher={teacher_dir / 'student.pt'}")
    assert_one_line_error(r, "student checkpoint, not teacher", "python teacher.py")
