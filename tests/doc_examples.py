"""The one reader of the Markdown pages' code, for the README (``tests/test_readme.py``), the docs
(``tests/test_docs.py``) and CI's core-only check (``.ci/core_only.py``): :func:`examples` finds a page's
runnable blocks and :func:`run_example` runs one; :func:`train_commands` finds a page's ``mt2st-train`` command
lines and :func:`check_train_command_composes` composes one.

Standard library only at import time: ``.ci/core_only.py`` imports it where only torch and Lightning are
installed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

#: A runnable block: ```python right after an HTML comment that starts with "example" (neither GitHub nor MkDocs
#: shows the comment). "<!-- example continues ... -->" runs after the block before it, on the same page, and may
#: use its names.
_MARKED_BLOCK = re.compile(r"<!-- example([^>]*)-->\s*```python\n(.*?)```", flags=re.S)


def examples(page: Path) -> list[str]:
    """The code of each marked block of ``page``, a continued block prefixed with the blocks it continues."""
    found: list[str] = []
    for marker, code in _MARKED_BLOCK.findall(page.read_text()):
        found.append(found[-1] + "\n" + code if "continues" in marker and found else code)
    return found


def run_example(code: str, page: Path, workdir: Path) -> None:
    """Run one example as a reader would paste it, in ``workdir`` (it may write checkpoints); a traceback names
    ``page``."""
    previous = Path.cwd()
    os.chdir(workdir)
    try:
        exec(compile(code, str(page), "exec"), {"__name__": "__example__"})
    finally:
        os.chdir(previous)


def train_commands(pages: Iterable[Path]) -> list[str]:
    """Every ``mt2st-train ...`` command line in the shell blocks of ``pages`` (fenced ```bash blocks, and the
    results pages' indented blocks), without its comment."""
    lines = []
    for page in pages:
        text = page.read_text()
        blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
        blocks += re.findall(r"^    (mt2st-train .*)$", text, flags=re.M)
        for block in blocks:
            block = re.sub(r"\\\n\s*", " ", block)  # a command continued over lines (trailing \) is one command
            lines += [line.split("#")[0].strip() for line in block.splitlines() if line.strip().startswith("mt2st-train")]
    return lines


def check_train_command_composes(command: str) -> None:
    """Compose every job of ``command`` with Hydra: each sweep value in turn, with the first value of the other
    swept parameters. (Skips where the SLURM launcher's extra is missing: some commands use it.)"""
    import pytest

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
