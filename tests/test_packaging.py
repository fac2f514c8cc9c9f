"""The package as users install it: a lean core, the experiments extra, a typed wheel.

``pip install deconflict`` brings torch, NumPy, SciPy, numba and threadpoolctl only; matplotlib,
tqdm and scikit-learn come with ``deconflict[experiments]``. Without them ``import deconflict``
and ``deconflict.backward`` work, and every command that needs them says in one line what to
install. Missing distributions are simulated in a subprocess by a meta-path finder that refuses
them, as an interpreter without them would.
"""

from __future__ import annotations

import json
import shutil
import site
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import numpy as np
import pytest
from packaging.requirements import Requirement
from properties import gamma

from deconflict import cli

ROOT = Path(__file__).resolve().parent.parent
CORE = {"torch", "numpy", "scipy", "numba", "threadpoolctl"}
# The experiments extra by distribution name, and the module each installs.
EXPERIMENTS = {"matplotlib": "matplotlib", "tqdm": "tqdm", "scikit-learn": "sklearn"}
OPTIONAL = (*EXPERIMENTS.values(), "tensorboard", "lightning")
NEEDS_EXTRA = ("deconflict {command}: needs the experiments extra: pip install "
               "'deconflict[experiments]' (missing: matplotlib, tqdm, sklearn)")

# Run in a fresh interpreter: argv = blocked top-level modules, an output folder. Prints JSON.
PROBE = r'''
import contextlib, importlib.abc, io, json, sys

BLOCKED = set(sys.argv[1].split(","))
OUT = sys.argv[2]


class NotInstalled(importlib.abc.MetaPathFinder):
    """Refuses the blocked distributions' modules as an interpreter without them would."""

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, NotInstalled())

import torch
from torch import nn

import deconflict

report = {"file": deconflict.__file__, "version": deconflict.__version__,
          "loaded": sorted(m for m in sys.modules
                           if m.partition(".")[0] in BLOCKED or m.startswith(
                               ("deconflict.experiments", "deconflict.cli", "deconflict.demo")))}

torch.manual_seed(0)
trunk = nn.Linear(5, 4).double()
heads = [nn.Linear(4, 1).double() for _ in range(3)]
features = trunk(torch.randn(16, 5, dtype=torch.float64))
losses = [(head(features).squeeze(-1) - t).pow(2).mean() for t, head in enumerate(heads)]
J = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(
    loss, list(trunk.parameters()), retain_graph=True)]) for loss in losses])
record = deconflict.backward(losses, trunk, deconflict.GradOPS(alpha=-1.0))
report["J"] = J.tolist()
report["weights"] = record.weights.tolist()
report["update"] = torch.cat([p.grad.flatten() for p in trunk.parameters()]).tolist()

from deconflict.cli import main

commands = {
    "demo": ["demo", "--steps", "2", "--quiet"],
    "run": ["run", "toy2d", "--method", "sum", "--smoke", "--quiet"],
    "compare": ["compare", "toy2d", "--methods", "sum,mgda", "--smoke", "--quiet"],
    "sweep": ["sweep", "toy2d", "--method", "gradops", "--alpha", "-1:1:3", "--smoke"],
    "diagnose": ["diagnose", "digits", "--method", "sum", "--smoke", "--quiet"],
    "recon": ["recon", "digits", "--method", "sum", "--smoke", "--quiet"],
    "methods": ["methods"],
}
report["cli"] = {}
for name, argv in commands.items():
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        status = main([*argv, "--out", f"{OUT}/{name}"] if name != "methods" else argv)
    report["cli"][name] = {"status": status, "stderr": stderr.getvalue(),
                           "stdout_lines": len(stdout.getvalue().splitlines())}
print(json.dumps(report))
'''


def probe(tmp_path: Path, blocked: tuple[str, ...], *, wheel_dir: Path | None = None) -> dict:
    """Run PROBE with ``blocked`` refused; from the source tree, or from an unpacked wheel.

    With ``wheel_dir`` the interpreter starts without ``site`` (so the editable install's path
    entry is not read), the wheel's files come first on the path and the environment's
    site-packages after them, for the dependencies.
    """
    out = tmp_path / "out"
    command = [sys.executable, "-c", PROBE, ",".join(blocked), str(out)]
    if wheel_dir is not None:
        paths = [str(wheel_dir), *site.getsitepackages()]
        prelude = f"import sys; sys.path[1:1] = {paths!r}\n"
        command = [sys.executable, "-S", "-c", prelude + PROBE, ",".join(blocked), str(out)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path,
                            timeout=600, check=False,
                            env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert not out.exists(), "a command refused for the missing extra wrote files"
    return report


def assert_core_works(report: dict) -> None:
    """``import deconflict`` loaded none of the optional modules, nor the experiments or CLI;
    the step wrote J^T c, and each experiment command said what to install in one line."""
    assert report["loaded"] == []
    J, c, D = (np.array(report[key]) for key in ("J", "weights", "update"))
    assert J.shape == (3, 24) and np.isfinite(D).all() and np.abs(D).max() > 0
    # Two float64 evaluations of sum_i c_i g_i (T = 3 terms) differ by at most twice
    # gamma_T sum_i |c_i| |g_i| in each coordinate.
    bound = 2 * gamma(3) * (np.abs(J).T @ np.abs(c))
    assert np.all(np.abs(D - J.T @ c) <= bound), np.max(np.abs(D - J.T @ c) - bound)
    for command, outcome in report["cli"].items():
        if command == "methods":  # needs nothing of the extra
            assert outcome == {"status": 0, "stderr": "", "stdout_lines": outcome["stdout_lines"]}
            assert outcome["stdout_lines"] > 20
            continue
        assert outcome["status"] == 2, (command, outcome)
        assert outcome["stderr"] == NEEDS_EXTRA.format(command=command) + "\n", outcome


def test_the_cli_names_the_extra_it_lists():
    """The CLI checks the modules that the metadata's experiments extra installs."""
    assert set(cli.EXPERIMENTS_EXTRA) == set(EXPERIMENTS.values())
    assert set(cli.EXPERIMENT_COMMANDS) == {"demo", "run", "compare", "sweep", "diagnose",
                                            "recon"}


def test_core_imports_and_steps_without_the_optional_packages(tmp_path):
    report = probe(tmp_path, OPTIONAL)
    assert Path(report["file"]).is_relative_to(ROOT / "src")
    assert_core_works(report)


def test_a_command_whose_extra_is_broken_says_what_to_install(monkeypatch, capsys):
    """An extra found but failing at import (a broken install) gets the same one line."""
    from deconflict.experiments import commands

    def broken(args):
        raise ModuleNotFoundError("No module named 'tqdm.std'", name="tqdm.std")

    monkeypatch.setattr(commands, "command_run", broken)
    assert cli.main(["run", "toy2d", "--method", "sum"]) == 2
    assert capsys.readouterr().err == (
        "deconflict run: needs the experiments extra: pip install 'deconflict[experiments]' "
        "(missing: tqdm)\n")

    def unrelated(args):
        raise ModuleNotFoundError("No module named 'yaml'", name="yaml")

    monkeypatch.setattr(commands, "command_run", unrelated)
    with pytest.raises(ModuleNotFoundError, match="yaml"):
        cli.main(["run", "toy2d", "--method", "sum"])


def test_missing_modules_finds_without_importing(monkeypatch):
    monkeypatch.delitem(sys.modules, "json", raising=False)
    assert cli.missing_modules(("json", "deconflict_no_such_module")) == [
        "deconflict_no_such_module"]
    assert "json" not in sys.modules  # found by its spec, not imported


# ------------------------------------------------------------------------------------ the wheel
@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built as `pip wheel` builds it, from a copy of the sources (the build writes
    build/ and egg-info beside them, which must not touch the checkout)."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "src", source / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps",
                    "--no-build-isolation", "--no-index", "-q", "-w", str(work / "dist")],
                   check=True, capture_output=True, timeout=600)
    (built,) = (work / "dist").glob("deconflict-*.whl")
    return built


def metadata(wheel: Path) -> tuple[set[str], dict[str, set[str]], str]:
    """The wheel's unconditional requirements, each extra's, and its entry points."""
    with zipfile.ZipFile(wheel) as archive:
        (name,) = (n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        fields = Parser().parsestr(archive.read(name).decode())
        entry_points = archive.read(name.replace("METADATA", "entry_points.txt")).decode()
    core: set[str] = set()
    extras: dict[str, set[str]] = {extra: set() for extra in fields.get_all("Provides-Extra")}
    for line in fields.get_all("Requires-Dist"):
        requirement = Requirement(line)
        if requirement.marker is None:
            core.add(requirement.name)
            continue
        for extra in extras:
            if requirement.marker.evaluate({"extra": extra}):
                extras[extra].add(requirement.name)
    return core, extras, entry_points


def test_the_wheel_requires_the_core_only(wheel):
    core, extras, entry_points = metadata(wheel)
    assert core == CORE
    assert extras["experiments"] == set(EXPERIMENTS)
    assert extras["tensorboard"] == {"tensorboard"} and extras["lightning"] == {"lightning"}
    assert {"deconflict", "pytest", "mypy", "tensorboard", "lightning"} <= extras["test"]
    assert "deconflict = deconflict.cli:main" in entry_points


def test_the_wheel_ships_every_module_and_py_typed(wheel):
    with zipfile.ZipFile(wheel) as archive:
        shipped = {n for n in archive.namelist() if n.startswith("deconflict/")}
    sources = {path.relative_to(ROOT / "src").as_posix()
               for path in (ROOT / "src" / "deconflict").rglob("*.py")}
    assert "deconflict/py.typed" in shipped
    assert sources <= shipped
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in shipped)


def test_the_installed_wheel_works_without_the_optional_packages(wheel, tmp_path):
    """The wheel installed alone (--no-deps: the dependencies are this environment's) imports
    and steps from its own files, with the optional packages refused."""
    target = tmp_path / "installed"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q",
                    "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=600)
    report = probe(tmp_path, OPTIONAL, wheel_dir=target)
    assert Path(report["file"]).is_relative_to(target)
    assert report["version"] == "0.1.0"  # read from the installed wheel's metadata
    assert_core_works(report)
