"""CI's check of the core alone: run in an environment that holds torch, Lightning and the mt2st-lightning wheel
installed without its extras. It runs the docs' first example (docs/callback.md, a model of its own on a tensor
data set) and fails if that imported any dependency of the app, the report or the examples."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from doc_examples import examples  # noqa: E402  (the test suite's reader of marked code blocks)

import mt2st_lightning  # noqa: E402
from mt2st_lightning.extras import EXTRAS  # noqa: E402

assert not Path(mt2st_lightning.__file__).resolve().is_relative_to(ROOT / "src"), "not the installed wheel"
optional = {module for modules in EXTRAS.values() for module in modules}
# torchmetrics is a dependency of Lightning itself, so it is installed here; the others must not be.
installed = sorted(m for m in optional - {"torchmetrics"} if importlib.util.find_spec(m) is not None)
assert not installed, f"this environment should hold torch and Lightning alone, but has {installed}"

first = examples(ROOT / "docs" / "callback.md")[0]
exec(compile(first, "docs/callback.md", "exec"), {"__name__": "__docs__"})
loaded = sorted({name.split(".")[0] for name in sys.modules} & optional - {"torchmetrics"})
assert not loaded, f"the core imported {loaded}"
print(f"core alone: the docs' first example ran with mt2st-lightning {mt2st_lightning.__version__} from the wheel")
