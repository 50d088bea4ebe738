"""Every script's config: each field declares its valid values in its type and documents itself in
a comment; every bad value of every field is one line and exit 2 before any work; --help prints
the descriptions. The walk reads the configs, so a field added later is covered too."""
import dataclasses
import math
import sys

import pytest

from config import Choice, Levels, Range, cli, field_checks, field_help
from conftest import ROOT, assert_one_line_exit_2, config_of, module_name, run_cli

SCRIPTS = ["teacher.py", "distill.py", "longtune.py", "sample.py", "tools/evaluate.py", "tools/serve.py", "tools/bench.py",
           "tools/drift.py"]


def bad_values(typ, check):
    """Values outside what the field declares: below, above, not finite, not a choice."""
    if isinstance(check, Choice):
        return ["bogus"]
    if isinstance(check, Levels):
        return ["1,2", "0,x"] + (["0.5,0.75"] if check.decreasing else [])   # increasing: bad for a schedule only
    vals = ["nan", "inf"] if typ is float else ["1.5"]
    if math.isfinite(check.lo):
        vals.append(str(typ(check.lo)) if check.open_lo else str(typ(check.lo - 1)))
    if math.isfinite(check.hi):
        vals.append(str(typ(check.hi + 1)))
    return vals


def never(cfg):
    raise AssertionError(f"main ran with a bad config: {cfg}")


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_field_declares_its_values_and_documents_itself(script):
    _, cls = config_of(script)
    helps = field_help(cls)
    for name, (typ, check) in field_checks(cls).items():
        assert helps.get(name), f"{script}: --{name} has no description (a trailing comment)"
        if typ in (int, float):
            assert isinstance(check, Range), f"{script}: --{name} is a number without a declared range"


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_bad_value_of_every_field_is_one_line_and_exit_2(script, capsys, monkeypatch):
    mod, cls = config_of(script)
    tried = 0
    for name, (typ, check) in field_checks(cls).items():
        if check is None:                                        # paths and free text: checked by their stage
            continue
        for val in bad_values(typ, check):
            monkeypatch.setattr(sys, "argv", [script, f"--{name}={val}"])
            capsys.readouterr()
            with pytest.raises(SystemExit) as e:
                cli(never, cls, mod.PRESETS)
            err = capsys.readouterr().err.strip().splitlines()
            assert e.value.code == 2 and len(err) == 1 and f"--{name}" in err[0], (name, val, err)
            tried += 1
    assert tried >= 3


def test_presets_and_defaults_are_valid():
    from config import check_config
    for script in SCRIPTS:
        mod, cls = config_of(script)
        for preset in mod.PRESETS.values():
            check_config(cls(**preset))                          # raises if a preset breaks a declared range


def test_help_prints_each_description(capsys, monkeypatch):
    mod, cls = config_of("longtune.py")
    monkeypatch.setattr(sys, "argv", ["longtune.py", "--help"])
    with pytest.raises(SystemExit) as e:
        cli(never, cls, mod.PRESETS)
    out = capsys.readouterr().out
    assert e.value.code == 0
    line = next(l for l in out.splitlines() if l.strip().startswith("--tau="))
    assert "trust radius" in line and "--max_steps=0" in out and "smoke runs" in out
    assert {f.name for f in dataclasses.fields(cls)} <= {l.split("=")[0].strip()[2:] for l in out.splitlines()
                                                          if l.strip().startswith("--")}


@pytest.mark.parametrize("script,old,new", [("teacher.py", "ema", "ema_decay"), ("distill.py", "ema", "ema_decay"),
                                            ("longtune.py", "ema", "ema_decay"), ("longtune.py", "steps", "dmd_steps")])
def test_a_renamed_flag_is_refused_with_its_new_name(script, old, new, capsys, monkeypatch):
    assert_one_line_exit_2(*run_cli(script, [f"--{old}=1"], capsys, monkeypatch), f"--{old}", f"--{new}")


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_into_a_pager_that_closes_early_ends_quietly(script):
    """`python X.py --help | head -1`: the reader leaves early; no BrokenPipeError traceback."""
    import subprocess
    cmd = ["-m", module_name(script)] if script.startswith("tools/") else [script]
    p = subprocess.Popen([sys.executable, *cmd, "--help"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()                                             # the pager quits before the help is written
    err = p.stderr.read().decode()
    assert p.wait(timeout=60) in (0, 1) and "Traceback" not in err and "Error" not in err, err


def test_a_tool_run_as_a_file_says_how_to_run_it():
    import subprocess
    r = subprocess.run([sys.executable, "tools/evaluate.py"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.strip() == "run it from the repository root as: python -m tools.evaluate [--key=value ...]"
