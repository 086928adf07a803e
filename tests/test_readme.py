"""The README keeps its promises: its code example runs as it is written (and is the docs' first example), its
two commands set up everything they claim to, the docs pages it names exist, and its command lines compose.
The pages are read by ``tests/doc_examples.py``, as the docs' are."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from tests.doc_examples import check_train_command_composes, examples, run_example, train_commands

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"


EXAMPLES = examples(README)


def test_readme_has_examples():
    assert EXAMPLES, "the README lost its runnable example"


@pytest.mark.slow
@pytest.mark.parametrize("code", EXAMPLES, ids=[f"example{i}" for i in range(len(EXAMPLES))])
def test_readme_example_runs(code, tmp_path):
    run_example(code, README, tmp_path)


def test_readme_example_is_the_docs_first_example():
    # The README shows the docs' first example; the two must not drift apart.
    assert EXAMPLES[0] == examples(DOCS / "callback.md")[0]


#: The README's two commands, exactly: the main job, and the tests.
MAIN_JOB = 'pip install "torch==2.13.0" -e ".[all]" && mt2st-train --multirun experiment=paper_digits'
TESTS = 'pip install "torch==2.13.0" -e ".[test]" && python -m pytest'


@pytest.mark.parametrize("page", [README, DOCS / "getting-started.md"], ids=["README", "getting-started"])
def test_the_two_commands_are_given_as_they_are(page):
    blocks = re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S)
    assert [MAIN_JOB + "\n", TESTS + "\n"] == [block for block in blocks if block in (MAIN_JOB + "\n", TESTS + "\n")]


def test_the_two_commands_install_what_they_run():
    # [all] holds every optional part the main job needs (the app runs the example models and writes the report);
    # [test] holds all of that, and the docs tools for the docs build test.
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for part in ("app", "report", "examples", "text", "search"):
        assert set(extras[part]) <= set(extras["all"]), f"[all] misses part of [{part}]"
    for part in ("all", "docs"):
        assert set(extras[part]) <= set(extras["test"]), f"[test] misses part of [{part}]"
    # [search] runs the app (mt2st-train --multirun hparams_search=...) and draws Optuna's plots.
    assert set(extras["app"]) | set(extras["report"]) <= set(extras["search"])


def test_readme_architecture_names_the_four_packages_and_their_extras():
    import importlib.util

    from mt2st_lightning.extras import EXTRAS

    text = README.read_text()
    section = text[text.index("## Architecture"):text.index("## Documentation")]
    rows = re.findall(r"^\| `(mt2st_lightning[\w.]*)` \|.*\| (.*) \|$", section, flags=re.M)
    assert [package for package, _ in rows] == [
        "mt2st_lightning", "mt2st_lightning.app", "mt2st_lightning.report", "mt2st_lightning.examples"
    ]
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for package, install in rows:
        assert importlib.util.find_spec(package) is not None, package
        named = re.findall(r"`\[(\w+)\]`", install)
        assert all(extra in extras and extra in EXTRAS for extra in named), (package, named)
        # Each optional part names its extra; the core needs none.
        assert bool(named) == (package != "mt2st_lightning"), package


def test_readme_links_into_the_docs_exist():
    # The README names docs pages as paths (docs/....md), for readers on GitHub and in the sdist alike.
    named = re.findall(r"`(docs/[\w./-]+\.md)`", README.read_text())
    assert len(named) >= 8
    missing = [path for path in named if not (ROOT / path).is_file()]
    assert not missing, f"the README names docs pages that do not exist: {missing}"


TRAIN_COMMANDS = train_commands([README, *sorted((ROOT / "experiments").glob("*.md"))])


def test_readme_and_experiments_have_train_commands():
    assert len(TRAIN_COMMANDS) >= 5


@pytest.mark.parametrize("command", TRAIN_COMMANDS)
def test_readme_train_commands_compose(command):
    check_train_command_composes(command)
