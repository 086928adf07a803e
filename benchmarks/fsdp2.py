"""MT2ST under FSDP2 (issue 15, part 3): ``python benchmarks/fsdp2.py`` (a few minutes on 2 CPU cores).

Two processes over gloo, started by this script as torchrun would (``RANK``, ``WORLD_SIZE``, ``MASTER_PORT``,
...), train ``MultiTaskModel`` sharded by its own ``configure_model`` (``fully_shard_tasks``: the encoder and
each head an FSDP2 unit of its own, the module the root) under Lightning's ``ModelParallelStrategy(data_parallel_size=2,
tensor_parallel_size=1)``, on the real 8x8 digits of ``benchmarks/run.py`` (``variants.MODELS``).

1. **Memory, per rank**: the bytes of parameters, gradients, optimizer state and buffers each rank holds
   (``harness.training_state_bytes``; a sharded parameter counts its local shard) after the switch (step
   ``SWITCH_AT + 2``), against the same model trained single-task (only the primary head) under the same
   sharding, with and without ``release_heads``; and before the switch (step 1) against the model trained
   multi-task without MT2ST.
2. **Post-switch step time** against single-task under the same strategy, paired: every fit of a session runs
   in one pair of processes (one thread per fit in each), in lockstep (``harness.Baton``, seeded alike on both
   ranks, so both run the same fit's step at the same time and the collectives match); each row is paired with
   its own copy of the baseline, with an A/A row (single-task against single-task) as the control.

``--out FILE`` writes the report there (default: the FSDP2 section of ``benchmarks/RESULTS.md``; ``--quick``:
printed only). See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.loggers.logger import DummyLogger  # noqa: E402
from lightning.pytorch.strategies import ModelParallelStrategy  # noqa: E402

import harness  # noqa: E402
import run  # noqa: E402
import variants as V  # noqa: E402
from mt2st_lightning import MT2STCallback  # noqa: E402
from mt2st_lightning.examples.models import MultiTaskModel  # noqa: E402

WORLD = 2
SWITCH_AT = V.SWITCH_AT
AFTER, BEFORE = SWITCH_AT + 2, 1  # the steps whose training state is measured

#: Each kind of fit: the model's heads, and MT2STCallback's arguments (None: no callback).
KINDS: dict[str, tuple[str, dict | None]] = {
    "multi-task": ("all", None),
    "single-task": ("primary", None),
    "switch": ("all", dict(strategy="switch", switch_at=SWITCH_AT)),
    "switch, release_heads": ("all", dict(strategy="switch", switch_at=SWITCH_AT, release_heads=True)),
}
#: The timed pairs: (row, baseline); the row's fit is a kind, "A/A: ..." a copy of the baseline's kind.
PAIRS = (("switch, post-switch", "switch"), ("switch, post-switch, release_heads", "switch, release_heads"),
         ("A/A: single-task", "single-task"))


# ============================================================================== one rank
def build(spec: V.ModelSpec, kind: str, data: harness.Data, seed: int = 0) -> MultiTaskModel:
    """The fit's module; every kind of one model starts from the same weights (the single-task model copies the
    encoder and primary head of a freshly seeded multi-task one, as ``harness.build_module`` does)."""
    torch.manual_seed(seed)
    model = MultiTaskModel(spec.make_encoder(), data.task_specs, primary=harness.PRIMARY, head_hidden=spec.head_hidden, lr=1e-3)
    if KINDS[kind][0] == "all":
        return model
    single = MultiTaskModel(copy.deepcopy(model.encoder), {harness.PRIMARY: data.task_specs[harness.PRIMARY]},
                            primary=harness.PRIMARY, head_hidden=spec.head_hidden, lr=1e-3)
    single.heads[harness.PRIMARY].load_state_dict(model.heads[harness.PRIMARY].state_dict())
    return single


def make_trainer(steps: int, callbacks: list, root: str) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", devices=WORLD, strategy=ModelParallelStrategy(data_parallel_size=WORLD, tensor_parallel_size=1),
        max_steps=steps, logger=DummyLogger(), enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=root,
        callbacks=callbacks,
    )


@dataclass
class _Fit:
    trainer: pl.Trainer
    module: MultiTaskModel
    log: harness.StepLog
    loader: torch.utils.data.DataLoader


def prepare(spec: V.ModelSpec, kind: str, data: harness.Data, steps: int, root: str, **probe_kwargs) -> _Fit:
    module = build(spec, kind, data)
    log = harness.StepLog()
    probe = harness.Probe(log, **probe_kwargs)
    callback = KINDS[kind][1]
    extra = [MT2STCallback(**callback)] if callback is not None else []
    trainer = make_trainer(steps, [probe.first, *extra, probe.last], root)
    # Lightning's DistributedSampler gives each rank every other batch: WORLD x steps batches in all.
    return _Fit(trainer, module, log, data.loader(WORLD * steps))


def measure_memory(spec: V.ModelSpec, data: harness.Data) -> dict[str, dict[str, int]]:
    """Training-state bytes on this rank: ``<kind>@<step>`` -> params/grads/optimizer/buffers/total."""
    out = {}
    for kind, at in (("single-task", AFTER), ("multi-task", BEFORE), ("switch", BEFORE), ("switch", AFTER),
                     ("switch, release_heads", AFTER)):
        with tempfile.TemporaryDirectory() as root:
            fit = prepare(spec, kind, data, AFTER + 1, root, measure_state_at=at)
            fit.trainer.fit(fit.module, fit.loader)
        out[f"{kind}@{at}"] = fit.log.state_bytes
    return out


def measure_timing(spec: V.ModelSpec, data: harness.Data, steps: int, session: int) -> dict[str, list[list[float]]]:
    """One lockstep session: every row next to its own copy of the baseline. Returns each slot's step times
    (``iteration`` on the CPU and the wall clock, every step of the fit)."""
    slots = [(row, kind) for row, kind in PAIRS] + [(f"{row} | baseline", "single-task") for row, _ in PAIRS]
    units = [[k, k + len(PAIRS)] for k in range(len(PAIRS))]
    baton = harness.Baton(units, seed=session)  # the same seed on both ranks: the same order of steps
    with tempfile.TemporaryDirectory() as root:
        fits = [prepare(spec, kind, data, steps, f"{root}/{k}", baton=baton, slot=k) for k, (_, kind) in enumerate(slots)]
        harness.fit_in_lockstep(fits, baton, [name for name, _ in slots])
    out = {}
    for (name, _), fit in zip(slots, fits):
        n = len(fit.log.c_next)
        out[name] = {
            "cpu": [fit.log.iteration(i, "cpu") for i in range(n)],
            "wall": [fit.log.iteration(i, "wall") for i in range(n)],
            "active_aux": fit.log.active_aux[:n],
        }
    return out


def worker(a: argparse.Namespace) -> None:
    logging.getLogger("mt2st_lightning").setLevel(logging.WARNING)  # one "heads left" line per drop and rank
    torch.set_num_threads(a.threads)
    torch.set_num_interop_threads(1)
    rank = int(os.environ["RANK"])
    result: dict = {"rank": rank, "memory": {}, "timing": {}}
    for name in a.models.split(","):
        spec = V.MODELS[name]
        data = harness.digits_data(spec.batch_size)
        result["memory"][name] = measure_memory(spec, data)
        result["timing"][name] = [measure_timing(spec, data, a.warmup + a.timed + 1, s) for s in range(a.sessions)]
        if rank == 0:
            print(f"[{time.strftime('%H:%M:%S')}] {name}: done", flush=True)
    Path(f"{a.save}.rank{rank}.json").write_text(json.dumps(result))


# ============================================================================== the two processes
def launch(a: argparse.Namespace, save: str) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [sys.executable, __file__, "--worker", "--save", save, "--models", a.models, "--sessions", str(a.sessions),
            "--timed", str(a.timed), "--warmup", str(a.warmup), "--threads", str(a.threads)]
    procs = []
    for rank in range(WORLD):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(WORLD),
               "RANK": str(rank), "LOCAL_RANK": str(rank), "NODE_RANK": "0", "PYTHONWARNINGS": "ignore"}
        procs.append(subprocess.Popen(args, env=env))
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"a worker failed: exit codes {codes}")
    return [json.loads(Path(f"{save}.rank{rank}.json").read_text()) for rank in range(WORLD)]


# ============================================================================== the report
def timing_rows(per_rank: list[dict], name: str, a: argparse.Namespace) -> list[str]:
    out = []
    timed = slice(a.warmup, a.warmup + a.timed)
    for row, kind in PAIRS:
        cells = []
        for clock in ("cpu", "wall"):
            ratios, mine, base = [], [], []
            for result in per_rank:
                for session in result["timing"][name]:
                    r, b = session[row], session[f"{row} | baseline"]
                    if "post-switch" in row:
                        assert not any(r["active_aux"][timed]), f"{row}: an auxiliary head ran in a timed step"
                    mine += r[clock][timed]
                    base += b[clock][timed]
                    ratios += [x / y for x, y in zip(r[clock][timed], b[clock][timed])]
            lo, hi = run.bootstrap_ci(ratios)
            cells.append((statistics.median(mine) * 1e3, statistics.median(base) * 1e3, statistics.median(ratios), lo, hi))
        (cm, cb, cr, clo, chi), (wm, wb, wr, wlo, whi) = cells
        out.append(f"| {name} | {row} | single-task | {cm:.2f} / {cb:.2f} | **{cr:.3f}** | {clo:.3f}-{chi:.3f} "
                   f"| {wm:.2f} / {wb:.2f} | {wr:.3f} | {wlo:.3f}-{whi:.3f} | {len(ratios)} |")
    return out


def memory_rows(per_rank: list[dict], name: str) -> list[str]:
    rows = (("switch, after the switch", "switch@%d" % AFTER, "single-task@%d" % AFTER, None),
            ("switch, release_heads, after the switch", "switch, release_heads@%d" % AFTER, "single-task@%d" % AFTER, 1.01),
            ("switch, before the switch", "switch@%d" % BEFORE, "multi-task@%d" % BEFORE, None),
            ("single-task", "single-task@%d" % AFTER, None, None),
            ("multi-task (no MT2ST)", "multi-task@%d" % BEFORE, None, None))
    out = []
    for label, key, base, target in rows:
        for result in per_rank:
            m = result["memory"][name][key]
            ratio = f"{m['total'] / result['memory'][name][base]['total']:.3f} vs {base.split('@')[0]}" if base else ""
            out.append(
                f"| {name} | {label} | {result['rank']} | {run.fmt_bytes(m['params'])} | {run.fmt_bytes(m['grads'])} "
                f"| {run.fmt_bytes(m['optimizer'])} | {run.fmt_bytes(m['buffers'])} | {run.fmt_bytes(m['total'])} "
                f"| {ratio} | {run.verdict(m['total'] / result['memory'][name][base]['total'], target) if target else ''} |"
            )
    return out


def report(per_rank: list[dict], a: argparse.Namespace, env: dict[str, str], load_end: str, wall: float) -> str:
    models = a.models.split(",")
    lines = [
        f"### FSDP2, 2 CPU processes: {env['date']}{', quick run' if a.quick else ''}",
        "",
        f"- machine: {env['cpu']}, {env['cores']} cores (the shared 2-core VM); load average at start {env['load']}, "
        f"at the end {load_end}",
        f"- torch {env['torch']}, lightning {env['lightning']}, Python {env['python']}; commit {env['commit']}",
        f"- command: `python benchmarks/fsdp2.py{' --quick' if a.quick else ''}` ({wall:.0f} s)",
        f"- 2 processes over gloo, `ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)`, "
        f"`MultiTaskModel.configure_model` -> `fully_shard_tasks` (the encoder, each head an FSDP2 unit, the module the root); each "
        f"rank trains on every other batch; {env['threads']} in each process",
        "- GPU: not measured; this script runs the 2-process CPU (gloo) case only, and no machine with 2 GPUs was "
        "available",
        "",
        "#### Training state per rank",
        "",
        f"Bytes of the storages behind each rank's parameters (its local shards), `.grad`s, optimizer state and "
        f"buffers (`harness.training_state_bytes`), at the end of step {AFTER} (the switch is at step {SWITCH_AT}) "
        f"or, before it, step {BEFORE}. *single-task*: `MultiTaskModel` with the primary head only, sharded the "
        "same way, no callback; *multi-task*: all heads, no callback.",
        "",
        "| model | row | rank | params | grads | optimizer state | buffers | total | ratio | target |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in models:
        lines += memory_rows(per_rank, name)
    lines += [
        "",
        "#### Step time after the switch",
        "",
        f"{a.sessions} lockstep session(s) x {a.timed} timed steps per fit after {a.warmup} warm-up steps, both "
        "ranks pooled. In each process one thread per fit; a baton seeded alike on both ranks lets one fit run one "
        "step at a time, each row next to its own copy of the baseline, in an order drawn afresh every cycle, so "
        "that both ranks run the same fit's step together. **ratio** = median over steps and ranks of (row step i / "
        "baseline step i), on the fit thread's CPU time (the gloo collectives run in gloo's own threads: not in "
        "it) and on the wall clock (the collectives and the wait for the other rank in it); 95% CI: bootstrap.",
        "",
        "| model | row | vs | CPU median step, ms (row / baseline) | **ratio (CPU)** | 95% CI | wall median step, ms "
        "| ratio (wall) | 95% CI | steps |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in models:
        lines += timing_rows(per_rank, name, a)
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="mlp,transformer", help=f"comma-separated, from {list(V.MODELS)}")
    ap.add_argument("--sessions", type=int, default=None, help="lockstep sessions (fresh fits) per model (2; quick 1)")
    ap.add_argument("--timed", type=int, default=None, help="timed steps per fit and session (100; quick 12)")
    ap.add_argument("--warmup", type=int, default=10, help=f"steps not timed (> {SWITCH_AT}: the switch is in them)")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads in each process (default 1)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 session of 12 timed steps; prints only")
    ap.add_argument("--out", default=None, help="Markdown file whose FSDP2 section to write (default: "
                    "benchmarks/RESULTS.md for a full run, nothing for --quick)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # internal: one rank
    ap.add_argument("--save", default=None, help=argparse.SUPPRESS)  # internal: where a rank writes its results
    a = ap.parse_args()
    a.sessions = a.sessions or (1 if a.quick else 2)
    a.timed = a.timed or (12 if a.quick else 100)
    if a.warmup <= SWITCH_AT:
        ap.error(f"--warmup must be > {SWITCH_AT}: the switch is at step {SWITCH_AT}")
    unknown = [m for m in a.models.split(",") if m not in V.MODELS]
    if unknown:
        ap.error(f"unknown model(s) {unknown}; choose from {list(V.MODELS)}")
    if a.worker:
        worker(a)
        return
    start = time.perf_counter()
    env = run.environment(run.Settings(models=[], sessions=a.sessions, timed=a.timed, warmup=a.warmup, round_len=0,
                                       threads=a.threads, quick=a.quick))
    print(f"{env['cpu']}, {env['cores']} cores, torch {env['torch']}, lightning {env['lightning']}, load {env['load']}",
          flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        per_rank = launch(a, f"{tmp}/fsdp2")
    load_end = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    body = report(per_rank, a, env, load_end, time.perf_counter() - start)
    print(body)
    out = Path(a.out) if a.out else (None if a.quick else run.RESULTS)
    if out is not None:
        run.write_section(out, "fsdp2", body)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
