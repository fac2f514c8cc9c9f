"""The command line: `deconflict methods` and a short `deconflict demo`."""

from __future__ import annotations

import json
import subprocess
import sys

import deconflict
from deconflict.cli import main
from deconflict.demo import DEMO_METHODS


def test_methods_lists_every_registered_method(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in deconflict.available():
        assert f"\n{name} " in out
    lines = {line.split()[0]: line for line in out.splitlines()[1:] if line and line[0] != " "}
    assert "Gramian" in lines["gradops"] and "losses only" in lines["uw"]
    assert "last-layer Gramian" in lines["gradnorm"]
    assert "task gradients" in lines["graddrop"] and " yes " in lines["famo"]
    assert "Zhu et al." in out


def test_methods_markdown_table(capsys):
    assert main(["methods", "--markdown"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| `")]
    assert len(rows) == len(deconflict.available())


def test_short_demo_writes_plot_table_and_json(tmp_path, capsys):
    assert main(["demo", "--steps", "40", "--workers", "1", "--quiet", "--out",
                 str(tmp_path)]) == 0
    table = (tmp_path / "toy2d_results.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 1 + 3 * len(DEMO_METHODS)
    png = (tmp_path / "toy2d_trajectories.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 50_000
    results = json.loads((tmp_path / "toy2d_results.json").read_text())
    assert results["steps"] == 40 and len(results["results"]) == 3 * len(DEMO_METHODS)
    assert "| GradOPS (alpha=-2) | (9, 9) |" in capsys.readouterr().out


def test_two_worker_processes_give_the_same_trajectories(tmp_path):
    from deconflict.demo import Job, run_trajectories
    from deconflict.experiments.toy2d import START_POINTS

    jobs = [Job(label, name, options, start)
            for label, name, options in DEMO_METHODS[:4] for start in START_POINTS]
    one = run_trajectories(jobs, 30, workers=1, show_progress=False)
    two = run_trajectories(jobs, 30, workers=2, show_progress=False)
    assert (one == two).all()


def test_bad_option_gives_a_one_line_error():
    result = subprocess.run([sys.executable, "-m", "deconflict.cli", "demo", "--steps", "-3"],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert "expected a positive integer" in result.stderr


def test_results_files_follow_the_umask(tmp_path):
    import os

    from deconflict.io import write_text

    path = write_text(tmp_path / "result.md", "x\n")
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask


def test_docs_methods_table_is_current(capsys):
    from pathlib import Path

    assert main(["methods", "--markdown"]) == 0
    table = capsys.readouterr().out.strip()
    docs = (Path(__file__).resolve().parents[1] / "docs" / "methods.md").read_text()
    assert table in docs, "docs/methods.md is stale: paste `deconflict methods --markdown`"
