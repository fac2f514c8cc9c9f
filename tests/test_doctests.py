"""The examples in the docstrings run, and every public function and method class has one.

The API reference (docs/api) is built from these docstrings, so an example that no longer runs
is a wrong page of the documentation. ``test_docstring_examples_run`` runs ``doctest`` over every
module of the package that imports here; ``test_public_api_has_examples`` asserts that every
public function and class of ``deconflict`` shows at least one ``>>>`` example. The docstrings
cite the math in docs/methods.md by section anchor; the last tests check that every cited
anchor exists, that every registered method has its section, and that no docstring cites a file
the repository does not hold.
"""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import inspect
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

import deconflict

OPTION_FLAGS = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS
ROOT = Path(__file__).resolve().parents[1]
METHODS_PAGE = ROOT / "docs" / "methods.md"

# Third-party packages that only an optional extra installs: a module that needs one is skipped
# when it is missing (the extra is what the user would install), never silently passed.
OPTIONAL_PACKAGES = {
    "matplotlib": "experiments",
    "tqdm": "experiments",
    "sklearn": "experiments",
    "tensorboard": "tensorboard",
    "lightning": "lightning",
    "pytorch_lightning": "lightning",
}

# Public names that need no example of their own, each with the reason.
WITHOUT_EXAMPLE = {
    "__version__": "a string, not a callable",
    "StepRecord": "a frozen record that backward returns; its fields are shown by the examples "
                  "of backward and ConflictMonitor",
    "StepConflicts": "a frozen record that step_conflicts returns; shown by its example",
}


def _module_names() -> list[str]:
    names = ["deconflict"]
    for info in pkgutil.walk_packages(deconflict.__path__, prefix="deconflict."):
        names.append(info.name)
    return sorted(names)


def _import_or_skip(name: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        missing = (error.name or "").split(".")[0]
        if missing in OPTIONAL_PACKAGES:
            pytest.skip(f"{name} needs the optional {OPTIONAL_PACKAGES[missing]!r} extra "
                        f"({missing} is not installed)")
        raise


def test_every_module_is_collected():
    names = _module_names()
    # Guards the walk itself: a package without __init__ or a broken path would drop modules.
    for expected in ("deconflict.gramian", "deconflict.methods.gradops",
                     "deconflict.diagnostics.monitor", "deconflict.recon.branch"):
        assert expected in names


@pytest.mark.parametrize("name", _module_names())
def test_docstring_examples_run(name):
    module = _import_or_skip(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=OPTION_FLAGS)
    report: list[str] = []
    for test in finder.find(module, name):
        runner.run(test, out=report.append)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, "".join(report)


def test_methods_page_examples_run():
    text = METHODS_PAGE.read_text(encoding="utf-8")
    test = doctest.DocTestParser().get_doctest(text, {}, "docs/methods.md", str(METHODS_PAGE), 0)
    assert test.examples  # the page keeps a worked example
    runner = doctest.DocTestRunner(optionflags=OPTION_FLAGS)
    report: list[str] = []
    runner.run(test, out=report.append)
    assert runner.summarize(verbose=False).failed == 0, "".join(report)


def _is_exception(value: object) -> bool:
    return inspect.isclass(value) and issubclass(value, BaseException)


def _lacks_example(value: object) -> bool:
    # The object's own docstring, not an inherited one: a subclass must show itself.
    own = value.__dict__.get("__doc__") if inspect.isclass(value) else value.__doc__
    return ">>>" not in (own or "")


def test_public_api_has_examples():
    missing = []
    for name in deconflict.__all__:
        if name in WITHOUT_EXAMPLE:
            continue
        value = getattr(deconflict, name)
        if _is_exception(value):
            continue  # raised by the library, documented by the examples that raise them
        if not callable(value):
            missing.append(f"{name} (not callable: list it in WITHOUT_EXAMPLE with a reason)")
        elif _lacks_example(value):
            missing.append(name)
    assert not missing, f"public names without a >>> example: {', '.join(missing)}"


def test_the_example_check_can_fail():
    def undocumented() -> None:
        """No example here."""

    def documented() -> None:
        """An example.

        >>> 1 + 1
        2
        """

    class Base:
        """An example.

        >>> Base()  # doctest: +ELLIPSIS
        <...>
        """

    class Child(Base):
        pass

    assert _lacks_example(undocumented)
    assert not _lacks_example(documented)
    assert not _lacks_example(Base)
    assert _lacks_example(Child)  # an inherited docstring does not count
    assert _is_exception(deconflict.ShapeError)
    assert _is_exception(deconflict.ZeroUpdateWarning)
    assert not _is_exception(deconflict.GradOPS)


def _anchors(page: Path) -> set[str]:
    """The explicit anchors of a Markdown page, and the ids GitHub gives its headings."""
    text = page.read_text(encoding="utf-8")
    explicit = set(re.findall(r'<a id="([^"]+)"></a>', text))
    headings = {re.sub(r"[^a-z0-9 _-]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
                for line in text.splitlines() if line.startswith("#")}
    return explicit | headings


def _citations() -> list[tuple[str, str]]:
    """(where, anchor) for every ``methods.md#anchor`` in the package and the docs."""
    files = [*sorted((ROOT / "src" / "deconflict").rglob("*.py")),
             *sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]
    found = []
    for path in files:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for anchor in re.findall(r"methods\.md#([A-Za-z0-9_-]+)", line):
                found.append((f"{path.relative_to(ROOT)}:{number}", anchor))
    return found


def test_cited_sections_exist():
    anchors = _anchors(METHODS_PAGE)
    citations = _citations()
    assert len(citations) > 10  # the scan found the citations
    missing = [f"{where} cites #{anchor}" for where, anchor in citations if anchor not in anchors]
    assert not missing, "docs/methods.md has no such section:\n" + "\n".join(missing)


def test_links_within_the_methods_page_resolve():
    anchors = _anchors(METHODS_PAGE)
    links = re.findall(r"\]\(#([A-Za-z0-9_-]+)\)", METHODS_PAGE.read_text(encoding="utf-8"))
    assert len(links) > 20
    assert not sorted(set(links) - anchors)


def test_every_registered_method_has_a_section():
    anchors = _anchors(METHODS_PAGE)
    missing = [name for name in deconflict.available() if name not in anchors]
    assert not missing, f"docs/methods.md has no section for {missing}"


def test_docstrings_cite_nothing_outside_the_repository():
    # METHODS.md and EXPERIMENTS.md were working notes that the package does not ship.
    stale = []
    for path in sorted((ROOT / "src" / "deconflict").rglob("*.py")):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if "METHODS.md" in line or "EXPERIMENTS.md" in line or "shared/papers" in line:
                stale.append(f"{path.relative_to(ROOT)}:{number}")
    assert not stale, "cite docs/methods.md#<anchor> instead: " + ", ".join(stale)


def test_the_anchor_scan_reads_headings_and_ids(tmp_path):
    page = tmp_path / "page.md"
    page.write_text('# The methods at a glance\n<a id="gradops"></a>\n## gradops: GradOPS\n')
    anchors = _anchors(page)
    assert {"gradops", "the-methods-at-a-glance", "gradops-gradops"} <= anchors
    assert "pcgrad" not in anchors


def _plain_math():
    spec = importlib.util.spec_from_file_location("plain_math", ROOT / "docs" / "api" /
                                                  "plain_math.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plain_math_escapes_formulas_and_keeps_code():
    lines = ["The norm ||g_i|| of L*_i, see ``weights_`` and weights_.",
             "",
             ">>> abs(-2) * 3   # |x| stays code",
             "6",
             "",
             "Example::",
             "",
             "    x = |a|"]
    _plain_math().escape_lines(lines)
    assert lines[0] == r"The norm \|\|g_i\|\| of L\*_i, see ``weights_`` and weights\_."
    assert lines[2:4] == [">>> abs(-2) * 3   # |x| stays code", "6"]
    assert lines[7] == "    x = |a|"


def test_api_reference_builds(tmp_path):
    pytest.importorskip("sphinx", reason="building the API reference needs the 'docs' extra")
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "-q", "-b", "html", str(ROOT / "docs" / "api"),
         str(tmp_path)], capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    pages = "".join(path.read_text(encoding="utf-8") for path in tmp_path.glob("*.html"))
    documented = set(re.findall(r'id="deconflict\.(?:[\w.]+\.)?(\w+)"', pages))
    public = {name for name in deconflict.__all__ if callable(getattr(deconflict, name))}
    missing = sorted(public - documented)
    assert not missing, f"docs/api documents no {missing}: add them to its pages"
    assert "&gt;&gt;&gt;" in pages  # the examples are shown


def test_a_missing_extra_skips_and_a_missing_dependency_fails(monkeypatch):
    def missing(package):
        def import_module(name):
            raise ModuleNotFoundError(f"No module named {package!r}", name=package)
        return import_module

    monkeypatch.setattr(importlib, "import_module", missing("matplotlib.pyplot"))
    with pytest.raises(pytest.skip.Exception, match="'experiments' extra"):
        _import_or_skip("deconflict.diagnostics.plots")
    monkeypatch.setattr(importlib, "import_module", missing("scipy"))
    with pytest.raises(ModuleNotFoundError):
        _import_or_skip("deconflict.linalg")
