"""Every README code block marked `readme-example` runs as it is written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _examples() -> list[str]:
    """Each marked block; a block marked "continues" runs after the one before it (it reuses its names)."""
    examples: list[str] = []
    for marker, code in re.findall(r"<!-- readme-example([^>]*)-->\s*```python\n(.*?)```", README.read_text(), flags=re.S):
        examples.append(examples[-1] + "\n" + code if "continues" in marker and examples else code)
    return examples


EXAMPLES = _examples()


def test_readme_has_examples():
    assert EXAMPLES, "the README lost its runnable example"


@pytest.mark.slow
@pytest.mark.parametrize("code", EXAMPLES, ids=[f"example{i}" for i in range(len(EXAMPLES))])
def test_readme_example_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})


def _train_commands() -> list[str]:
    """Every `mt2st-train ...` command line in the shell blocks of the README and of the experiments' pages
    (fenced ```bash blocks, and the results pages' indented blocks)."""
    lines = []
    for path in (README, *sorted((README.parent / "experiments").glob("*.md"))):
        text = path.read_text()
        blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
        blocks += re.findall(r"^    (mt2st-train .*)$", text, flags=re.M)
        for block in blocks:
            lines += [line.split("#")[0].strip() for line in block.splitlines() if line.strip().startswith("mt2st-train")]
    return lines


TRAIN_COMMANDS = _train_commands()


def test_readme_has_train_commands():
    assert len(TRAIN_COMMANDS) >= 5


@pytest.mark.parametrize("command", TRAIN_COMMANDS)
def test_readme_train_commands_compose(command):
    # Every sweep value must compose: each one in turn, with the first value of the other swept parameters.
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="needs the optional extra [slurm]")
    from hydra import compose, initialize_config_dir

    from mt2st_lightning.app.train import CONFIG_DIR

    overrides = [arg.strip("'\"") for arg in command.split()[1:] if arg != "--multirun" and arg != "\\"]
    sweeps = {i: o.split("=", 1)[1].split(",") for i, o in enumerate(overrides) if "," in o.split("=", 1)[-1]}
    jobs = [[o.split("=", 1)[0] + "=" + sweeps[i][0] if i in sweeps else o for i, o in enumerate(overrides)]]
    for i, values in sweeps.items():
        for value in values[1:]:
            job = list(jobs[0])
            job[i] = overrides[i].split("=", 1)[0] + "=" + value
            jobs.append(job)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        for job in jobs:
            compose("train", overrides=job, return_hydra_config=any(o.startswith("hydra") for o in job))
