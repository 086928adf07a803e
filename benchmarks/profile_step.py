"""Where a row's extra time per step goes: cProfile over the same Lightning fit as run.py, row vs. its baseline.

    python benchmarks/profile_step.py --model mlp --row "switch, post-switch"

Each side is profiled over two fits (``--steps`` and 3x as many); the difference of the two divided by the extra
steps removes the fit's setup and leaves the per-step cost. Prints the functions whose per-step own time
(tottime) grows most from the baseline to the row, with their per-step call counts. cProfile inflates Python
calls several-fold: read the ranking and the call counts, and take the magnitudes from run.py.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import harness  # noqa: E402
import variants as V  # noqa: E402


def per_step(model: V.ModelSpec, variant: V.Variant, data: harness.Data, steps: int) -> dict[str, tuple[float, float]]:
    runs = []
    for n in (steps, 3 * steps):
        prof = cProfile.Profile()
        prof.enable()
        harness.run_fit(model, variant, data, harness.FitOptions(steps=n))
        prof.disable()
        stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
        runs.append({f"{k[0].split('site-packages/')[-1].split('/src/')[-1]}:{k[1]}({k[2]})": (v[1], v[2])
                     for k, v in stats.items()})
    short, long = runs
    extra = 2 * steps
    return {k: ((long.get(k, (0, 0))[0] - short.get(k, (0, 0))[0]) / extra,
                (long.get(k, (0, 0))[1] - short.get(k, (0, 0))[1]) / extra * 1e6) for k in set(short) | set(long)}


def main() -> None:
    rows = V.by_name(V.VARIANTS)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mlp", choices=list(V.MODELS))
    ap.add_argument("--row", default="switch, post-switch", help=f"one of {list(rows)}")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args()
    torch.set_num_threads(1)
    row = rows[a.row]
    base = rows[row.baseline] if row.baseline else row
    model = V.MODELS[a.model]
    data = harness.digits_data(model.batch_size)
    harness.run_fit(model, row, data, harness.FitOptions(steps=20))  # warm the imports and caches
    mine, theirs = per_step(model, row, data, a.steps), per_step(model, base, data, a.steps)
    total_mine = sum(t for _, t in mine.values())
    total_theirs = sum(t for _, t in theirs.values())
    print(f"{a.model}: '{row.name}' vs '{base.name}', per step under cProfile: {total_mine:.0f} us vs "
          f"{total_theirs:.0f} us of own time\n")
    print(f"{'+us/step':>9} {'calls/step':>14}  function")
    diff = sorted(((mine.get(k, (0, 0))[1] - theirs.get(k, (0, 0))[1], k) for k in set(mine) | set(theirs)),
                  reverse=True)
    for d, k in diff[: a.top]:
        cm, ct = mine.get(k, (0, 0))[0], theirs.get(k, (0, 0))[0]
        print(f"{d:9.1f} {ct:6.1f} -> {cm:5.1f}  {k[:120]}")


if __name__ == "__main__":
    main()
