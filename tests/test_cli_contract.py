"""The command line's contract, generated from the registries (methods, options, subcommands).

A new method, option or subcommand is covered here without new test code: every subcommand's
--help works; every declared option of every method passes both ways (``--method m --key v`` and
``--method m:key=v``) through ``run toy2d --smoke`` and the record shows exactly that option; bad
input gives exit status 2, one line on stderr, no traceback and no file. The CLI is called
in-process (``main(argv)``), not in a new interpreter per case.
"""

from __future__ import annotations

import inspect
import json
import math
import os
from pathlib import Path
from typing import Any

import pytest

import deconflict
from deconflict.cli import METHOD_OPTION_COMMANDS, build_parser, main, subcommands
from deconflict.experiments.problems import PROBLEMS
from deconflict.experiments.runner import MethodSpec, run_path
from deconflict.methods.options import Option
from deconflict.methods.registry import method_class

# Few steps: the runs check what reaches the record, not what the method learns.
FAST = ["--smoke", "--quiet", "--set", "steps=3"]
# Where a method cannot train on toy2d: its second loss goes negative, and MGDA-UB's default
# normalizer ("loss+") divides by the losses (refused in one line there).
ELSEWHERE = {"mgda_ub": ["xor-and", "--smoke", "--quiet", "--set", "max_epochs=2"]}
# The log-loss variants and MoCo's loss-scaled gradients refuse toy2d's second loss, which goes
# negative.
for _name in ("log_losses", "mgda_log", "cagrad_log", "imtl_g_log", "si_ls", "moco"):
    ELSEWHERE[_name] = ELSEWHERE["mgda_ub"]
# Robust aggregators whose options need more than toy2d's two tasks: Census-income's three
# (generated rows in the upstream format, the census_data fixture).
for _name in ("krum", "trimmed_mean"):
    ELSEWHERE[_name] = ["census-income", "--smoke", "--quiet"]
# Options whose every non-default value needs more tasks than any offline problem has (Krum
# with one Byzantine task needs four): the run must be refused in one line naming the option.
NEEDS_MORE_TASKS = {("krum", "n_byzantine")}


def files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*")) if folder.exists() else []


# ----------------------------------------------------------------------------- declarations
@pytest.mark.parametrize("name", deconflict.available())
def test_declared_options_are_the_constructor_keywords(name):
    """An option added to __init__ without a declaration (or the reverse) fails here."""
    cls = method_class(name)
    parameters = list(inspect.signature(cls).parameters.values())
    assert all(p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) for p in parameters)
    assert [p.name for p in parameters] == [o.name for o in cls.OPTIONS]
    for parameter, option in zip(parameters, cls.OPTIONS, strict=True):
        assert parameter.default == option.default, option.name
        assert option.help and not option.help.endswith("."), option.name
    method = cls()
    assert method.options() == {o.name: o.validate(name, o.default) for o in cls.OPTIONS}
    assert repr(method) == f"{cls.__name__}(" + ", ".join(
        f"{k}={v!r}" for k, v in method.options().items()) + ")"


@pytest.mark.parametrize("command", METHOD_OPTION_COMMANDS)
def test_no_method_option_is_named_like_a_flag_of_a_command(command):
    """A collision would only be usable as name:key=value; keep the registry free of them."""
    flags = set(subcommands(build_parser())[command]._option_string_actions)
    for name in deconflict.available():
        for option in method_class(name).OPTIONS:
            assert option.flag not in flags and f"--{option.name}" not in flags, (name, option)


def test_option_validation_keeps_the_messages():
    option = Option("c", "float", 0.5, "radius", low=0.0)
    with pytest.raises(deconflict.InvalidOptionError, match=r"^m: c must be in \[0, inf\), "):
        option.validate("m", -1)
    with pytest.raises(deconflict.InvalidOptionError, match="c must be finite"):
        option.validate("m", math.inf)
    with pytest.raises(deconflict.InvalidOptionError, match="c must be a number"):
        option.validate("m", True)
    seed = Option("seed", "int", None, "seed", nullable=True)
    assert seed.validate("m", None) is None and seed.parse("m", "7") == 7
    with pytest.raises(deconflict.InvalidOptionError, match="seed must be an int or None"):
        seed.validate("m", 1.5)
    with pytest.raises(deconflict.InvalidOptionError, match=r"seed takes an integer, got '1\.5'"):
        seed.parse("m", "1.5")
    rescale = Option("rescale", "int", 1, "rescale", choices=(0, 1, 2))
    assert rescale.parse("m", "2") == 2 and rescale.validate("m", 2.0) == 2
    with pytest.raises(deconflict.InvalidOptionError, match=r"one of \[0, 1, 2\], got True"):
        rescale.validate("m", True)
    leak = Option("leak", "float", 0.0, "leak", low=0.0, high=1.0, shape="scalar_or_list")
    assert leak.parse("m", "0.25") == 0.25 and leak.parse("m", "0.5/1") == (0.5, 1.0)
    with pytest.raises(deconflict.InvalidOptionError, match=r"leak\[1\] must be in \[0, 1\]"):
        leak.parse("m", "0.5/2")
    with pytest.raises(deconflict.InvalidOptionError, match="a/b/c"):
        leak.parse("m", "0.5//1")
    flag = Option("tension", "bool", True, "tension")
    assert flag.parse("m", "false") is False and flag.parse("m", "yes") is True
    with pytest.raises(deconflict.InvalidOptionError, match="true or false"):
        flag.parse("m", "maybe")
    with pytest.raises(TypeError):  # a declaration whose default it refuses is a bug
        Option("tau", "float", 0.0, "tau", low=0.0, low_open=True)


# ------------------------------------------------------------------------------------- help
def _commands() -> list[list[str]]:
    return [[], *([name] for name in subcommands(build_parser()))]


@pytest.mark.parametrize("command", _commands(), ids=lambda c: " ".join(c) or "deconflict")
def test_help_of_every_command(command, capsys):
    assert main([*command, "--help"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("usage: deconflict") and not captured.err


def test_methods_name_shows_each_option_with_default_and_range(capsys):
    for name in deconflict.available():
        assert main(["methods", name]) == 0
        out = capsys.readouterr().out
        assert out.startswith(f"{name}: ")
        for option in method_class(name).OPTIONS:
            line = next(line for line in out.splitlines()
                        if line.startswith(f"  {option.name} "))
            assert option.describe() in line and option.help in line
    assert main(["methods", "gradops"]) == 0
    out = capsys.readouterr().out
    assert "alpha" in out and "finite float" in out and "--method gradops --alpha" in out


# ------------------------------------------------------------------ every option, both ways
def example(option: Option) -> Any:
    """A valid value other than the default, from the declaration alone."""
    if option.choices is not None:
        return next(c for c in option.choices if c != option.default)
    if option.type == "bool":
        return not option.default
    scalar = option.default if isinstance(option.default, (int, float)) else None
    low = option.low if option.low is not None else -math.inf
    high = option.high if option.high is not None else math.inf
    if option.type == "int":
        candidates = [scalar + 1 if scalar is not None else None, (option.low or 0) + 1, 7]
    else:
        candidates = [(low + high) / 2 if math.isfinite(low + high) else None,
                      scalar / 2 if scalar else None, (scalar or 0) + 0.5, low + 1]
    value = next(c for c in candidates if c is not None and c != scalar
                 and option._in_range(c))
    return [value, 2 * value] if option.shape == "list" else value


def as_text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "/".join(as_text(v) for v in value)
    return str(value).lower() if isinstance(value, bool) else repr(value)


CASES = [(name, option) for name in deconflict.available()
         for option in method_class(name).OPTIONS]


@pytest.fixture(scope="module")
def plain_config(tmp_path_factory):
    """The configuration a run without options records, per problem (trained once)."""
    configs: dict[str, dict] = {}

    def config(problem: str, flags: list[str]) -> dict:
        if problem not in configs:
            out = tmp_path_factory.mktemp("plain")
            assert main(["run", problem, "--method", "sum", *flags, "--out", str(out)]) == 0
            configs[problem] = json.loads(next(out.rglob("*.json")).read_text())["config"]
        return configs[problem]
    return config


@pytest.mark.parametrize(("name", "option"), CASES, ids=[f"{n}-{o.name}" for n, o in CASES])
def test_every_option_both_ways_reaches_the_record_alone(name, option, tmp_path, plain_config,
                                                         capsys, request):
    value = example(option)
    text = as_text(value)
    out = str(tmp_path / "out")
    problem, *flags = ELSEWHERE.get(name, ["toy2d", *FAST])
    if problem == "census-income":
        request.getfixturevalue("census_data")
    if (name, option.name) in NEEDS_MORE_TASKS:
        assert main(["run", problem, "--method", name, option.flag, text, *flags,
                     "--out", out]) == 2
        error = capsys.readouterr().err.strip()
        assert len(error.splitlines()) == 1 and option.name in error
        assert not list(tmp_path.rglob("*.json"))
        return
    assert main(["run", problem, "--method", name, option.flag, text, *flags, "--out", out]) == 0
    (path,) = tmp_path.rglob("*.json")
    record = json.loads(path.read_text())
    expected = option.validate(name, value)
    expected = list(expected) if isinstance(expected, tuple) else expected
    assert record["method"] == name and record["options"] == {option.name: expected}
    assert record["config"] == plain_config(problem, flags)  # nothing else changed
    # The other form names the same run: it is found and reused, not trained again.
    assert main(["run", problem, "--method", f"{name}:{option.name}={text}", *flags,
                 "--out", out]) == 0
    assert list(tmp_path.rglob("*.json")) == [path]
    assert json.loads(path.read_text())["date"] == record["date"]
    assert f"{record['label']}" in capsys.readouterr().out


def test_a_method_option_named_like_a_flag_is_refused_in_flag_form(tmp_path, capsys,
                                                                   monkeypatch):
    from deconflict.methods import registry

    class Sideways(deconflict.Sum):
        name = "sideways"
        OPTIONS = (Option("force", "bool", False, "a deliberately colliding option"),)

        def __init__(self, force: bool = False) -> None:
            self._set_options(force=force)
            self.weights_ = None

    monkeypatch.setitem(registry._METHODS, "sideways", Sideways)
    out = tmp_path / "out"
    assert main(["run", "toy2d", "--method", "sideways", "--force", *FAST,
                 "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip()
    assert "--force is a flag of deconflict run and also an option of sideways" in error
    assert "--method sideways:force=VALUE" in error and not out.exists()
    # Written name:key=value, the option is the method's and --force is the command's flag.
    assert main(["run", "toy2d", "--method", "sideways:force=true", "--force", *FAST,
                 "--out", str(out)]) == 0
    (record,) = out.rglob("*.json")
    assert json.loads(record.read_text())["options"] == {"force": True}


# --------------------------------------------------------------------------------- bad input
def _record_path(out: Path, problem: str, method: str) -> Path:
    config = PROBLEMS[problem].resolve_config({}, smoke=True)
    return run_path(out, PROBLEMS[problem], MethodSpec.parse(method), 0, config)


def _corrupt_record(out: Path) -> None:
    path = _record_path(out, "toy2d", "sum")
    path.parent.mkdir(parents=True)
    path.write_text('{"problem": "toy2d", "metr')


def _stale_checkpoint(out: Path) -> None:
    path = _record_path(out, "digits", "sum")
    path.parent.mkdir(parents=True)
    path.with_suffix(".ckpt").write_bytes(b"not a checkpoint")


def _a_file(out: Path) -> None:
    out.write_text("a file where the results would go\n")


RUN = ["run", "toy2d", "--method"]
BAD = [
    # methods and their options
    ([*RUN, "nosuch"], "unknown method 'nosuch'", None),
    ([*RUN, "cagrd"], "Did you mean 'cagrad'", None),
    ([*RUN, "cagrad", "--alpha", "1"], "its options are: c, rescale", None),
    ([*RUN, "cagrad:alpha=1"], "its options are: c, rescale", None),
    ([*RUN, "cagrad", "--c", "abc"], "c takes a number, got 'abc'", None),
    ([*RUN, "cagrad", "--c", "-1"], "c must be in [0, inf)", None),
    ([*RUN, "cagrad:c=nan"], "c must be finite", None),
    ([*RUN, "cagrad:rescale=3"], "rescale must be one of [0, 1, 2]", None),
    ([*RUN, "pcgrad", "--seed", "1.5"], "seed takes an integer", None),
    ([*RUN, "tensioner", "--window", "0"], "window must be an int >= 1", None),
    ([*RUN, "gradops", "--gating", "some"], "gating must be one of", None),
    ([*RUN, "sum", "--weights", "1/-2"], "weights[1] must be in [0, inf)", None),
    ([*RUN, "cagrad:c=0.1", "--c", "0.2"], "given twice", None),
    ([*RUN, "cagrad:c"], "is not key=value", None),
    ([*RUN, "cagrad", "--c"], "method option --c needs a value", None),
    ([*RUN, ":c=1"], "has no method name", None),
    # abbreviations: never a prefix of a flag, so --c is CAGrad's and --checkpoint is nothing
    ([*RUN, "cagrad", "--checkpoint", "3"], "does not take option 'checkpoint'", None),
    ([*RUN, "sum", "--seed", "7"], "sum does not take option 'seed'", None),
    ([*RUN, "sum", "--ou", "x"], "does not take option 'ou'", None),
    (["run", "toy2d", "--meth", "sum"], "the following arguments are required: --method", None),
    (["dem", "--steps", "1"], "invalid choice: 'dem'", None),
    ([*RUN, "sum", "-q"], "unrecognized arguments: -q", None),
    # runner flags
    ([*RUN, "sum", "--seeds", "0"], "argument --seeds: expected an integer >= 1", None),
    ([*RUN, "sum", "--first-seed", "-1"], "expected an integer >= 0", None),
    ([*RUN, "sum", "--nproc", "0"], "argument --nproc", None),
    ([*RUN, "sum", "--threads", "0"], "argument --threads: expected an integer >= 1, got 0",
     None),
    ([*RUN, "sum", "--threads", "x"], "argument --threads: expected an integer, got 'x'", None),
    ([*RUN, "sum", "--checkpoint-every", "0"], "argument --checkpoint-every", None),
    ([*RUN, "sum", "--checkpoint-every", "x"], "expected an integer, got 'x'", None),
    (["run", "digits", "--method", "sum", "--resume"], "--resume needs --checkpoint-every",
     None),
    (["run", "imagenet", "--method", "sum"], "the problems are", None),
    (["compare", "toy2d", "--methods", "sum,cagrad", "--c", "0.2"],
     "compare takes method options only inside --methods", None),
    (["compare", "toy2d", "--methods", "sum,sum"], "a method is given twice", None),
    (["compare", "toy2d", "--methods", ","], "--methods is empty", None),
    (["methods", "nosuch"], "unknown method 'nosuch'", None),
    (["diagnose", "toy2d", "--method", "sum"], "diagnose and recon take", None),
    (["diagnose", "digits", "--method", "sum,cagrad", "--c", "0.1"],
     "with several methods", None),
    (["diagnose", "digits", "--method", "sum", "--nproc", "2"], "--nproc does not apply", None),
    (["diagnose", "digits", "--method", "sum", "--seeds", "3", "--checkpoint-every", "5"],
     "--seeds, --checkpoint-every do not apply", None),
    (["recon", "digits", "--method", "cagrad", "--c", "-1"], "c must be in [0, inf)", None),
    (["demo", "--steps", "-3"], "expected a positive integer", None),
    # problem settings (the problems' typed schemas)
    ([*RUN, "sum", "--set", "steps=-5"], "steps", None),
    ([*RUN, "sum", "--set", "steps=abc"], "steps", None),
    ([*RUN, "sum", "--set", "stepz=3"], "has no setting 'stepz'", None),
    ([*RUN, "sum", "--set", "steps"], "is not KEY=VALUE", None),
    (["run", "digits", "--method", "sum", "--set", "epochs=0"], "epochs", None),
    # output directory
    ([*RUN, "sum", "--out", "{out}/sub"], "not a directory", _a_file),
    ([*RUN, "sum", "--out", "{out}"], "not a directory", _a_file),
    (["demo", "--steps", "2", "--out", "{out}"], "not a directory", _a_file),
    # sweeps: grids, options and metric names, all before training
    (["sweep", "toy2d", "--method", "gradops", "--alpha", "a:b:3"], "'a' is not a finite", None),
    (["sweep", "toy2d", "--method", "gradops", "--alpha", "-5:5:0"], "count must be positive",
     None),
    (["sweep", "toy2d", "--method", "gradops", "--alpha", "5:-5:1.5"],
     "count '1.5' is not a whole number", None),
    (["sweep", "toy2d", "--method", "gradops", "--alpha", "1:2"], "write start:stop:count",
     None),
    (["sweep", "toy2d", "--method", "gradops", "--alpha", "1,1"], "repeats a value", None),
    (["sweep", "toy2d", "--method", "cagrad", "--c", "-1:1:3"], "c must be in [0, inf)", None),
    (["sweep", "toy2d", "--method", "sum", "--weights", "simplex:x"], "K 'x' is not a whole",
     None),
    (["sweep", "toy2d", "--method", "gradops", "--beta", "0:1:3"], "its options are: alpha",
     None),
    (["sweep", "toy2d", "--method", "gradops"], "give the option to sweep", None),
    (["sweep", "toy2d", "--method", "gradops:alpha=1", "--alpha", "0:1:3"], "swept and also "
     "fixed", None),
    (["sweep", "toy2d", "--method", "gradops", "--alpha", "0:1:3", "--pair", "nosuch,metric"],
     "nosuch, metric not among them", None),
    (["sweep", "toy2d", "--method", "gradops", "--alpha", "0:1:3", "--pair", "L1,L1"],
     "two different ones", None),
    # paired comparisons
    (["compare", "toy2d", "--methods", "sum,mgda", "--paired-with", "cagrad"],
     "is not a method of this comparison", None),
    (["sweep", "toy2d", "--method", "gradops", "--alpha", "0:1:3", "--paired-with", "7"],
     "is not in the grid", None),
    (["sweep", "toy2d", "--method", "gradops", "--alpha", "0:1:3", "--paired-with", "nosuch"],
     "unknown method 'nosuch'", None),
    (["sweep", "toy2d", "--method", "gradops", "--alpha", "0:1:3", "--paired-with",
      "single_task"], "a sweep runs no single-task", None),
    # files left by earlier runs
    ([*RUN, "sum"], "cannot be read (JSONDecodeError", _corrupt_record),
    (["run", "digits", "--method", "sum"], "holds an interrupted run of sum (seed 0): add "
     "--resume", _stale_checkpoint),
    (["run", "digits", "--method", "sum", "--checkpoint-every", "1", "--resume"],
     "the checkpoint", _stale_checkpoint),
]


@pytest.mark.parametrize(("arguments", "message", "prepare"), BAD,
                         ids=[" ".join(case[0]) for case in BAD])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(arguments, message, prepare, tmp_path,
                                                         capsys):
    out = tmp_path / "out"
    if prepare is not None:
        prepare(out)
    before = [(p, p.stat().st_mtime_ns) for p in files(tmp_path)]
    arguments = [a.replace("{out}", str(out)) for a in arguments]
    if arguments[0] not in ("methods", "demo"):  # before the case's own (--c may end it)
        common = ["--smoke", "--quiet"] + ([] if "--out" in arguments else ["--out", str(out)])
        arguments = [*arguments[:2], *common, *arguments[2:]]
    assert main(arguments) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert message in lines[0] and "Traceback" not in captured.err
    assert lines[0].startswith("deconflict") and "see deconflict --help" not in lines[0]
    assert [(p, p.stat().st_mtime_ns) for p in files(tmp_path)] == before


def test_corrupt_files_are_named_with_what_to_do(tmp_path, capsys):
    out = tmp_path / "out"
    _corrupt_record(out)
    assert main([*RUN, "sum", "--smoke", "--quiet", "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert str(_record_path(out, "toy2d", "sum")) in error and "--force" in error
    _stale_checkpoint(out)
    checkpoint = _record_path(out, "digits", "sum").with_suffix(".ckpt")
    assert main(["run", "digits", "--method", "sum", "--smoke", "--quiet", "--out", str(out),
                 "--checkpoint-every", "1", "--resume"]) == 2
    error = capsys.readouterr().err
    assert str(checkpoint) in error and "delete it" in error


# ------------------------------------------------------------------------------------ Ctrl-C
def _interrupt_training(monkeypatch, problem: str, save_checkpoint: bool) -> list[dict]:
    calls: list[dict] = []

    def train(method_factory, config, seed, device, tasks=None, progress=False, **kwargs):
        calls.append(kwargs)
        if save_checkpoint:
            kwargs["checkpoint"].path.parent.mkdir(parents=True, exist_ok=True)
            kwargs["checkpoint"].path.write_bytes(b"progress")
        raise KeyboardInterrupt

    monkeypatch.setattr(PROBLEMS[problem], "train", train)
    return calls


def test_ctrl_c_with_a_checkpoint_exits_130_with_the_resume_hint(tmp_path, capsys,
                                                                 monkeypatch):
    calls = _interrupt_training(monkeypatch, "digits", save_checkpoint=True)
    command = ["run", "digits", "--method", "sum", "--smoke", "--quiet", "--out", str(tmp_path),
               "--checkpoint-every", "1"]
    assert main(command) == 130
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(calls) == 1 and len(lines) == 1
    assert "interrupted" in lines[0] and "--resume" in lines[0] and ".ckpt" in lines[0]
    assert not list(tmp_path.rglob("*.json"))  # no record of an unfinished run
    # Rerun without --resume: refused, the checkpoint kept, nothing trained.
    assert main(command) == 2
    assert "holds an interrupted run" in capsys.readouterr().err and len(calls) == 1
    assert len(list(tmp_path.rglob("*.ckpt"))) == 1


def test_ctrl_c_without_a_checkpoint_says_so(tmp_path, capsys, monkeypatch):
    _interrupt_training(monkeypatch, "toy2d", save_checkpoint=False)
    assert main([*RUN, "sum", *FAST, "--out", str(tmp_path)]) == 130
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "interrupted" in lines[0] and "--checkpoint-every" in lines[0]
    assert files(tmp_path) == []  # toy2d keeps no checkpoint, and nothing was recorded


def test_force_starts_an_interrupted_run_over(tmp_path, capsys, monkeypatch):
    _stale_checkpoint(tmp_path)
    checkpoint = _record_path(tmp_path, "digits", "sum").with_suffix(".ckpt")
    calls = _interrupt_training(monkeypatch, "digits", save_checkpoint=False)
    assert main(["run", "digits", "--method", "sum", "--smoke", "--quiet", "--out",
                 str(tmp_path), "--force"]) == 130
    assert len(calls) == 1 and not checkpoint.exists()


# ------------------------------------------------------------------ the other method commands
@pytest.mark.parametrize("command", ["diagnose", "recon"])
def test_diagnose_and_recon_take_method_options_both_ways(command, tmp_path, monkeypatch,
                                                          capsys):
    from deconflict.experiments import conflict_commands

    parsed: list[MethodSpec] = []
    real = conflict_commands.method_spec

    def method_spec(*args, **kwargs):
        parsed.append(real(*args, **kwargs))
        return parsed[-1]

    def monitored_run(*args, **kwargs):
        raise KeyboardInterrupt  # stop before any training: only the parsing is under test

    monkeypatch.setattr(conflict_commands, "method_spec", method_spec)
    monkeypatch.setattr(conflict_commands, "monitored_run", monitored_run)
    common = ["digits", "--smoke", "--quiet", "--out", str(tmp_path)]
    assert main([command, *common, "--method", "cagrad", "--c", "0.2"]) == 130
    assert main([command, *common, "--method", "cagrad:c=0.2:rescale=0"]) == 130
    capsys.readouterr()
    options = [spec.options for spec in parsed if spec.name == "cagrad"]
    assert options == [{"c": 0.2}, {"c": 0.2, "rescale": 0}]
    assert not files(tmp_path)


def test_a_sweep_writes_no_table_when_its_plot_fails(tmp_path, monkeypatch):
    from deconflict.experiments import plots

    def broken(*args, **kwargs):
        raise RuntimeError("the figure could not be drawn")

    monkeypatch.setattr(plots, "plot_sweep", broken)
    with pytest.raises(RuntimeError, match="could not be drawn"):
        main(["sweep", "toy2d", "--method", "gradops", "--alpha", "-1:1:2", "--gating", "all",
              *FAST, "--out", str(tmp_path)])
    records = [json.loads(p.read_text()) for p in tmp_path.rglob("*.json")]
    assert sorted(r["options"]["alpha"] for r in records) == [-1.0, 1.0]
    assert all(r["options"]["gating"] == "all" for r in records)  # a fixed option, as a flag
    assert not list(tmp_path.rglob("sweep_*"))  # no CSV without its Markdown and PNG


def test_the_issues_abbreviation_cases_now_mean_what_they_say(tmp_path):
    """--c was read as --checkpoint-every and --seed as --seeds by argparse's prefix matching."""
    assert main([*RUN, "cagrad", "--c", "2", *FAST, "--out", str(tmp_path / "c")]) == 0
    (record,) = (tmp_path / "c").rglob("*.json")
    assert json.loads(record.read_text())["options"] == {"c": 2.0}
    assert not list((tmp_path / "c").rglob("*.ckpt"))
    assert main([*RUN, "pcgrad", "--seed", "7", *FAST, "--out", str(tmp_path / "s")]) == 0
    (record,) = (tmp_path / "s").rglob("*.json")  # one seed, not seven
    saved = json.loads(record.read_text())
    assert saved["options"] == {"seed": 7} and saved["seed"] == 0


def test_an_unwritable_out_is_refused_before_training(tmp_path, capsys, monkeypatch):
    from deconflict.experiments import commands

    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    # A superuser may write anywhere (CI may run as root): the permission answer is simulated.
    monkeypatch.setattr(commands.os, "access",
                        lambda path, mode: False if Path(path) == locked else real(path, mode))
    assert main([*RUN, "sum", *FAST, "--out", str(locked / "results")]) == 2
    assert f"{locked} is not writable" in capsys.readouterr().err and not files(locked)
