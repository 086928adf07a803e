"""The docs site (``docs/``, ``mkdocs.yml``) builds without a broken reference, its code examples run as they are
written, its commands compose, and what it says about the code stays true (every strategy has its row, every
module its place in the architecture).

The examples and commands are found and run as the README's are, by ``tests/doc_examples.py``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.doc_examples import check_train_command_composes, examples, run_example, train_commands

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

PAGES = sorted(DOCS.rglob("*.md"))
EXAMPLES = [(page, code) for page in PAGES for code in examples(page)]
FIRST_EXAMPLE = examples(DOCS / "callback.md")[0]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _page_id(page: Path) -> str:
    return page.relative_to(DOCS).as_posix()


def test_docs_have_examples():
    assert len(EXAMPLES) >= 2, "the docs lost their runnable examples"


def test_mkdocs_build_strict(tmp_path):
    # Strict: a broken link or anchor, a page missing from the nav or the nav naming a missing page, and a module
    # or docstring the API reference cannot render all fail the build.
    pytest.importorskip("mkdocstrings_handlers.python", reason='needs the docs tools: pip install -e ".[docs]"')
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**_env(), "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    assert (tmp_path / "site" / "reference" / "callback" / "index.html").is_file()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("page", "code"), EXAMPLES, ids=[f"{_page_id(page)}-{i}" for i, (page, _) in enumerate(EXAMPLES)]
)
def test_docs_example_runs(page, code, tmp_path):
    run_example(code, page, tmp_path)


@pytest.mark.slow
def test_the_first_example_runs_with_the_core_alone(tmp_path):
    # "It runs with torch, Lightning and mt2st_lightning alone": in an interpreter where the optional parts'
    # dependencies cannot be imported (sys.modules[name] = None, as tests/test_packaging.py blocks them), and
    # without importing the app, the report or the examples.
    from tests.test_packaging import OPTIONAL

    check = textwrap.dedent(
        """
        loaded = sorted(m for m in sys.modules if m.split(".")[:2] in (
            ["mt2st_lightning", "app"], ["mt2st_lightning", "report"], ["mt2st_lightning", "examples"]))
        assert not loaded, f"the core example imported {loaded}"
        print("core alone: ok")
        """
    )
    prelude = f"import sys\nfor _name in {OPTIONAL!r}:\n    sys.modules[_name] = None\n"
    result = subprocess.run(
        [sys.executable, "-c", prelude + FIRST_EXAMPLE + check], cwd=tmp_path, capture_output=True, text=True,
        timeout=300, env=_env(),
    )
    assert result.returncode == 0 and "core alone: ok" in result.stdout, result.stderr[-3000:]


TRAIN_COMMANDS = train_commands(PAGES)


def test_docs_have_train_commands():
    assert len(TRAIN_COMMANDS) >= 6


@pytest.mark.parametrize("command", TRAIN_COMMANDS)
def test_docs_train_commands_compose(command):
    check_train_command_composes(command)


def test_the_architecture_names_every_module_and_only_existing_ones():
    # Each file under src/mt2st_lightning/ is named in a table of docs/architecture.md, itself or through its
    # folder ("examples/data/"); every path the tables name exists.
    package = ROOT / "src" / "mt2st_lightning"
    text = (DOCS / "architecture.md").read_text()
    named = {
        path
        for row in re.findall(r"^\| (`[^|]*) \|", text, flags=re.M)
        for path in re.findall(r"`([\w/.]+(?:\.py|/))`", row)
    }
    assert named, "docs/architecture.md lost its file tables"
    missing = sorted(path for path in named if not (package / path).exists())
    assert not missing, f"docs/architecture.md names files that do not exist: {missing}"
    modules = sorted(p.relative_to(package).as_posix() for p in package.rglob("*.py"))
    unnamed = [m for m in modules if m not in named and not any(m.startswith(p) for p in named if p.endswith("/"))]
    assert not unnamed, f"docs/architecture.md does not say what these files are: {unnamed}"


def test_the_missing_extra_error_is_quoted_as_the_library_gives_it(monkeypatch):
    import importlib.util

    from mt2st_lightning.extras import EXTRAS, MissingExtraError, require

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingExtraError) as error:
        require("app", "mt2st-train")
    quoted = " ".join((DOCS / "getting-started.md").read_text().split())
    assert f"`{error.value}`" in quoted
    assert EXTRAS["app"] == ("hydra", "omegaconf")


def test_the_callbacks_group_names_its_extra():
    # Moved from tests/test_app.py with the text: the rich progress bar names the extra that installs rich.
    text = (DOCS / "hydra-app.md").read_text()
    group_row = next(line for line in text.splitlines() if line.startswith("| `callbacks` |"))
    assert "`rich_progress_bar` (`pip install \"mt2st-lightning[rich]\"`)" in group_row


def test_the_slurm_multinode_command_matches_nodes_and_devices():
    # Moved from tests/test_multinode.py with the text: the cluster version of the simulated 2-node run, whose
    # SLURM nodes and tasks must agree with the Trainer's.
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="needs the optional extra [slurm]")
    from hydra import compose, initialize_config_dir

    from mt2st_lightning.app.train import CONFIG_DIR

    (line,) = [
        line for line in (DOCS / "distributed.md").read_text().splitlines()
        if line.startswith("mt2st-train") and "hydra/launcher=slurm" in line and "trainer.num_nodes" in line
    ]
    overrides = [arg for arg in line.split()[1:] if arg != "--multirun"]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    launcher, trainer = cfg.hydra.launcher, cfg.trainer
    assert launcher._target_.endswith("SlurmLauncher") and trainer.strategy == "ddp"
    assert launcher.nodes == trainer.num_nodes == 2
    assert launcher.tasks_per_node == launcher.gpus_per_node == trainer.devices


CLI_BLOCKS = re.findall(r"```yaml\n(.*?)```", (DOCS / "lightning-cli.md").read_text(), flags=re.S)


def test_lightning_cli_page_has_its_yaml():
    assert len(CLI_BLOCKS) >= 2


# Lightning 2.6's LightningCLI still calls jsonargparse APIs that jsonargparse 4.49+ deprecates (not ours to fix).
@pytest.mark.filterwarnings("ignore::DeprecationWarning:lightning.pytorch.cli")
@pytest.mark.parametrize("block", CLI_BLOCKS, ids=[f"yaml{i}" for i in range(len(CLI_BLOCKS))])
def test_lightning_cli_yaml_configures_the_callback(block, tmp_path, monkeypatch):
    # Each YAML block of the page, as trainer.callbacks of the example's config, through the example's own CLI.
    pytest.importorskip("jsonargparse", reason='needs the optional extra [cli]')
    import yaml

    from mt2st_lightning import MT2STCallback
    from tests.test_cli import CONFIG, EXAMPLE, example

    config = yaml.safe_load(CONFIG.read_text())
    config["trainer"]["callbacks"] = yaml.safe_load(block)["trainer"]["callbacks"]
    config["trainer"]["logger"] = False
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.setattr(sys, "argv", [str(EXAMPLE / "train.py")])
    cli = example.main(["--config", str(path)], run=False)
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, MT2STCallback)]
    # Both forms mean the same: the auxiliary heads leave at optimizer step 60.
    assert callback.strategy == "switch"
    callback.policy.bind(("recon",), 200, "step")
    assert list(callback.policy.finished(59, ("recon",))) == []
    assert list(callback.policy.finished(60, ("recon",))) == ["recon"]


def _strategy_rows() -> dict[str, str]:
    """The built-in strategies table of docs/strategies.md: strategy -> its parameters cell."""
    text = (DOCS / "strategies.md").read_text()
    table = text[text.index("## The built-in strategies"):].split("\n\n")[2]
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| `")]
    return {row[0].strip("| `"): row[-1].rstrip(" |") for row in rows}


def test_every_registered_strategy_has_its_row():
    from mt2st_lightning.policies import STRATEGIES

    assert [name for name in _strategy_rows() if name in STRATEGIES] == list(STRATEGIES)


def test_the_strategy_table_names_each_parameter_with_its_default():
    import ast
    import inspect

    from mt2st_lightning.policies import REGISTRY
    from mt2st_lightning.policies.params import parameters_of

    rows = _strategy_rows()
    for name, cls in REGISTRY.items():
        cell = rows[name]
        # "as `gradnorm`": the row shares that row's parameters.
        shared = re.findall(r"as `(\w+)`", cell)
        text = cell + "".join(rows[other] for other in shared)
        for parameter in parameters_of(cls):
            assert re.search(rf"`{parameter}[`=]", text), f"the {name!r} row does not name its parameter {parameter!r}"
        defaults = {p.name: p.default for p in inspect.signature(cls).parameters.values()}
        for parameter, value in re.findall(r"`(\w+)=([^`]+)`", cell):
            assert parameter in defaults, f"the {name!r} row names {parameter!r}, which {cls.__name__} does not take"
            assert ast.literal_eval(value) == defaults[parameter], f"the {name!r} row's default of {parameter!r}"


def test_the_reference_reads_napoleon_docstrings():
    # docs/_ext/napoleon.py: Sphinx roles become code, and a shared Args entry one entry per parameter (with its
    # continuation lines); anything outside an Args section is left alone.
    import importlib.util

    spec = importlib.util.spec_from_file_location("napoleon_ext", DOCS / "_ext" / "napoleon.py")
    napoleon = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(napoleon)
    docstring = textwrap.dedent(
        """\
        Uses :class:`~mt2st_lightning.policies.Policy` and :func:`mt2st_lightning.heads.drop_heads`.

        Args:
            gamma0, eta: the decay; one value or a
                mapping.
            nu: the exponent.

        Note:
            a, b: not parameters.
        """
    )
    assert napoleon._ROLE.sub(napoleon._as_code, docstring).startswith(
        "Uses ``Policy`` and ``mt2st_lightning.heads.drop_heads``."
    )
    assert napoleon._split_shared_entries(docstring).splitlines()[2:10] == [
        "Args:",
        "    gamma0: the decay; one value or a",
        "        mapping.",
        "    eta: the decay; one value or a",
        "        mapping.",
        "    nu: the exponent.",
        "",
        "Note:",
    ]
    assert "    a, b: not parameters." in napoleon._split_shared_entries(docstring)
