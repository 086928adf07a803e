"""MT2ST overhead benchmark (GitHub issue #4): ``python benchmarks/run.py`` (< 10 min on 2 CPU cores),
``python benchmarks/run.py --quick`` (about a minute, smoke run, writes nothing unless --out is given).

For each model size and each row of ``variants.VARIANTS``: the median training-step time against its
hand-written baseline (the lockstep sessions of ``harness.run_lockstep``), FLOPs per step in each phase,
the bytes held by the training state after the switch, and on a GPU the host-device synchronisations, the
peak memory and the same ratios under bf16-mixed + torch.compile. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

import harness  # noqa: E402
import variants as V  # noqa: E402

RESULTS = HERE / "RESULTS.md"
SYNC_STEPS = 55  # sync-probe fits: Lightning's logging step 49 (log_every_n_steps=50) is in them
#: The rows whose library syncs are counted: every strategy with its default settings (adaptive ones: both modes at
#: the default adapt_every=10; every 1 only measures more often), and the settings that change what a step reads.
SYNC_ROWS = ("stl", "mtl", "diminish", "switch, post-switch", "switch, post-switch, quiet", "diminish+prune, all pruned",
             "plateau", "gradnorm, representation, every 10", "gradnorm, parameters, every 10",
             "fisher, representation, every 10", "noise, every 10", "conflict, every 10")
MEASURE_STEPS = 9  # FLOP/memory fits: steps 0..8 cover every phase (switch at 3, last prune at 7)
NO_ARITHMETIC = {*V.QUIET, "release_heads"}  # callback settings that change no FLOP of a step
MEASURING_STRATEGIES = ("gradnorm", "fisher", "noise", "conflict")  # observe 1 step in adapt_every (default 10)


# ============================================================================== settings
@dataclass
class Settings:
    models: list[str]
    sessions: int  # lockstep sessions per model (fresh fits each)
    timed: int  # timed steps per fit, after the warm-up
    warmup: int  # steps not timed at the start of each fit (the switch and the pruning happen in them)
    round_len: int  # a "round": this many consecutive lockstep cycles; the spread is over rounds
    threads: int
    quick: bool
    clock: str = "cpu"  # "cpu": the fit thread's CPU time (time.thread_time); "wall": time.perf_counter
    variant_filter: list[str] = field(default_factory=list)
    section: str = ""  # only the rows of this table section ("pre"/"post"), with their baselines
    jobs: int = 1  # parallel processes (one per model and table section)

    @property
    def steps(self) -> int:
        return self.warmup + self.timed + 1  # +1: the last timed step's iteration ends at the next step's start


def parse() -> tuple[Settings, argparse.Namespace]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: 16 timed steps per fit (about a minute)")
    ap.add_argument("--models", default=",".join(V.MODELS), help=f"comma-separated, from {list(V.MODELS)}")
    ap.add_argument("--variants", default="", help="only rows whose name contains one of these (comma-separated);"
                    " the baselines are always kept")
    ap.add_argument("--sessions", type=int, default=None, help="lockstep sessions (fresh fits) per model (2; quick 1)")
    ap.add_argument("--timed", type=int, default=None, help="timed steps per fit and session (100; quick 16)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    ap.add_argument("--out", default=None, help="Markdown file to update (default: benchmarks/RESULTS.md for a"
                    " full run, nothing for --quick)")
    ap.add_argument("--dump", default=None, help="also write every timed step's times (JSON) to this file")
    ap.add_argument("--jobs", type=int, default=1,
                    help="run the models and table sections in this many parallel processes (each one in lockstep "
                    "as before; on a loaded machine the whole run takes less wall-clock time)")
    ap.add_argument("--part", default=None, help=argparse.SUPPRESS)  # internal: MODEL:SECTION or compile
    ap.add_argument("--save", default=None, help=argparse.SUPPRESS)  # internal: pickle the part's results here
    ap.add_argument("--no-compile", action="store_true",
                    help="leave out the CPU torch.compile section (its fits compile with inductor: minutes)")
    ap.add_argument("--smoke-gpu-path", action="store_true",
                    help="run the GPU suite's code path (bf16-mixed + torch.compile) on the CPU, quick, no output")
    a = ap.parse_args()
    quick = a.quick or a.smoke_gpu_path
    s = Settings(
        models=[m for m in a.models.split(",") if m],
        sessions=a.sessions or (1 if quick else 2),
        # 100 timed steps after 10 warm-up steps: steps 10..109, so adapt_every=10 measures in exactly 1 in 10.
        timed=a.timed or (16 if quick else 100),
        warmup=a.warmup or (8 if quick else 10),
        round_len=8 if quick else 20,
        threads=a.threads,
        quick=quick,
        variant_filter=[v for v in a.variants.split(",") if v],
        jobs=max(1, a.jobs),
    )
    unknown = [m for m in s.models if m not in V.MODELS]
    if unknown:
        ap.error(f"unknown model(s) {unknown}; choose from {list(V.MODELS)}")
    if s.warmup <= 7:
        ap.error("--warmup must be > 7: the last auxiliary head of the pruning row is dropped at step 7")
    return s, a


def select(s: Settings, gpu: bool, model: str) -> list[V.Variant]:
    rows = [v for v in V.VARIANTS if v.models is None or model in v.models]
    if gpu:
        rows = [v for v in rows if v.gpu]
    if s.variant_filter or s.section:
        keep = {v.name for v in rows if (not s.variant_filter or any(f in v.name for f in s.variant_filter))
                and (not s.section or v.section == s.section)}
        keep |= {v.name for v in rows if v.baseline is None}  # the baselines stay: the model table needs them
        by = {v.name: v for v in rows}
        for name in list(keep):  # and every row a kept row is divided by (e.g. `mtl` for the adaptive rows)
            while by[name].baseline is not None:
                name = by[name].baseline
                keep.add(name)
        rows = [v for v in rows if v.name in keep]
    V.by_name(rows)  # checks names and baselines
    return rows


# ============================================================================== environment
def sh(*cmd: str) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, cwd=HERE.parent, timeout=20).stdout.strip()
    except Exception:  # noqa: BLE001
        return ""


def environment(s: Settings) -> dict[str, str]:
    import lightning

    model = next((line.split(":", 1)[1].strip() for line in sh("lscpu").splitlines()
                  if line.startswith("Model name")), platform.processor() or "?")
    commit = sh("git", "rev-parse", "--short", "HEAD") or "?"
    if sh("git", "status", "--porcelain"):
        commit += " (dirty)"
    return {
        "cpu": model,
        "cores": str(os.cpu_count()),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "python": platform.python_version(),
        "commit": commit,
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "threads": f"torch.set_num_threads({s.threads}), set_num_interop_threads(1)",
        "load": " / ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


# ============================================================================== measuring
@dataclass
class ModelResult:
    model: V.ModelSpec
    logs: dict[str, list[harness.StepLog]]  # variant -> one log per session
    paired: dict[str, list[harness.StepLog]]  # row -> its own copy of its baseline, one log per session
    flops: dict[str, dict[int, int]]  # variant -> step -> FLOPs
    flop_phases: dict[str, dict[int, int]]  # variant -> aux heads running -> FLOPs of that phase
    memory: dict[str, dict[str, int]]  # variant -> training-state bytes after the last probe step
    cuda_peak: dict[str, int] = field(default_factory=dict)
    syncs: dict[str, float] = field(default_factory=dict)
    library_syncs: dict[str, harness.SyncCount] = field(default_factory=dict)  # CPU: sync_probe's counts
    params: int = 0
    encoder_params: int = 0
    aux_heads: int = 0  # auxiliary heads of the multi-task model


def measure_model(name: str, s: Settings, rows: list[V.Variant], opts: harness.FitOptions, log,
                  timing_only: bool = False) -> ModelResult:
    spec = V.MODELS[name]
    data = harness.digits_data(spec.batch_size)
    gpu = opts.accelerator == "gpu"
    res = ModelResult(spec, {}, {}, {}, {}, {})
    # FLOPs do not depend on torch.compile, and FlopCounterMode does not see inside compiled graphs: eager.
    probe_opts = replace(opts, steps=MEASURE_STEPS, compile_encoder=False)

    # FLOPs of every step of a short fit (not timed): the phases, and the adaptive measurement step (step 0).
    # Rows that differ only in logging, the non-finite check or releasing dropped heads share one FLOP probe.
    t0 = time.perf_counter()
    probed: dict[tuple, harness.StepLog] = {}
    for v in rows:
        key = flop_key(v)
        if key not in probed:
            probed[key] = harness.run_fit(spec, v, data, probe_opts, count_flops=True)
        slog = probed[key]
        res.flops[v.name] = dict(slog.flops)
        res.flop_phases[v.name] = {}
        for step, aux in zip(slog.step, slog.active_aux):
            if step > 0:  # step 0 of an adaptive strategy is a measurement step
                res.flop_phases[v.name].setdefault(aux, slog.flops[step])
    # Memory: the training state once the last head is gone; on a GPU also the peak, and the synchronisations
    # of every row (those depend on logging and on the non-finite check, so every row gets its own fit).
    extra = MEASURE_STEPS + 4
    for v in [] if timing_only else rows:
        # The baselines and the callback's post-switch rows; a quiet row holds what its loud twin holds.
        in_memory_table = v.module != "mt2st" and v.baseline is None or (
            v.module == "mt2st" and v.with_callback and v.phase == "post" and not set(v.callback) & set(V.QUIET)
            and v.target is not None)  # not the diagnostic "defaults vs quiet": it holds what its twin holds
        if not (in_memory_table or gpu):
            continue
        kw: dict = dict(measure_state_at=extra - 1)
        if gpu:
            kw.update(cuda_peak_from=MEASURE_STEPS, sync_from=MEASURE_STEPS)
        slog = harness.run_fit(spec, v, data, replace(opts, steps=extra), **kw)
        if in_memory_table:
            res.memory[v.name] = slog.state_bytes
            if gpu:
                res.cuda_peak[v.name] = slog.cuda_peak_bytes or 0
        if gpu:
            res.syncs[v.name] = statistics.mean(slog.syncs) if slog.syncs else float("nan")
    log(f"  {name}: FLOP and memory probes {time.perf_counter() - t0:.1f}s")
    if not gpu and not timing_only:  # the GPU suite counts real CUDA synchronisations instead (above)
        t0 = time.perf_counter()
        counted: dict[str, harness.SyncCount] = {}
        for v in rows:
            if v.name not in SYNC_ROWS:
                continue
            key = repr(sorted(V.resolve_callback(v, SYNC_STEPS).items()))
            if key not in counted:
                counted[key] = harness.count_library_syncs(spec, v, data, replace(opts, steps=SYNC_STEPS))
            res.library_syncs[v.name] = counted[key]
        log(f"  {name}: sync probes {time.perf_counter() - t0:.1f}s")

    # Timing: lockstep sessions. Each row is paired with its own copy of its baseline: a row's step i and the
    # baseline's step i run back to back, a few ms apart, on the same batch, so that they see the same machine (on
    # a shared VM the speed of a core drifts over tens of ms). The order of the pairs and which of the two goes
    # first are drawn afresh every cycle (see harness.Baton), so neither side keeps a place in the cycle.
    units: list[list[tuple[str, V.Variant]]] = []
    by = {v.name: v for v in rows}
    for j, v in enumerate(r for r in rows if r.baseline is not None):
        units.append([(v.name, v), (f"{v.baseline}#{j}", by[v.baseline])])
    for k in range(s.sessions):
        t0 = time.perf_counter()
        logs = harness.run_lockstep(spec, units, data, replace(opts, steps=s.steps), seed=k)
        slots = [slot for unit in units for slot in unit]
        for (key, v), (base_key, base) in units:
            res.logs.setdefault(key, []).append(logs[key])
            res.paired.setdefault(key, []).append(logs[base_key])
            if base.name not in res.logs or len(res.logs[base.name]) <= k:
                res.logs.setdefault(base.name, []).append(logs[base_key])
        log(f"  {name}: lockstep session {k + 1}/{s.sessions}, {len(slots)} fits x {s.steps} steps, "
            f"{time.perf_counter() - t0:.1f}s")
    module = harness.build_module(spec, by["plain multi-task"], data, 0)
    res.params = sum(p.numel() for p in module.parameters())
    res.encoder_params = sum(p.numel() for p in module.encoder.parameters())
    res.aux_heads = len(module.aux)
    return res


def flop_key(v: V.Variant) -> tuple:
    """Rows with equal keys do the same arithmetic: logging, the non-finite check and releasing the dropped heads'
    storage add none."""
    cb = {k: val for k, val in V.resolve_callback(v, 10**6).items() if k not in NO_ARITHMETIC}
    return v.module, repr(sorted(cb.items())), v.with_callback, v.predrop, v.drop_at


# ============================================================================== statistics
@dataclass
class Ratio:
    variant_ms: float  # median step of the row
    baseline_ms: float  # median step of the row's own baseline copy
    added_us: float  # median over steps of (row step i - baseline step i)
    ratio: float  # median over steps of (row step i / baseline step i): the headline; the target applies to it
    ci: tuple[float, float]  # 95% bootstrap interval of ``ratio`` (steps resampled)
    rounds: list[float]  # ``ratio`` within each round (round_len consecutive lockstep cycles)
    of_medians: float  # median row step / median baseline step (unpaired)
    wall: float  # ``ratio`` on wall-clock time (time.perf_counter)
    window: float  # ``ratio`` on the hook window (first on_train_batch_start .. last on_train_batch_end)
    mean: float  # mean / mean: charges the adaptive strategies' measuring steps to the row
    n: int


def _times(log: harness.StepLog, s: Settings, kind: str = "iteration", clock: str | None = None) -> list[float]:
    clock = clock or s.clock
    return [getattr(log, kind)(i, clock) for i in range(s.warmup, s.warmup + s.timed)]


def bootstrap_ci(values: list[float], n: int = 1000, seed: int = 0) -> tuple[float, float]:
    rng = random.Random(seed)
    k = len(values)
    meds = sorted(statistics.median(rng.choices(values, k=k)) for _ in range(n))
    return meds[int(0.025 * n)], meds[int(0.975 * n) - 1]


def ratio(res: ModelResult, v: V.Variant, s: Settings) -> Ratio:
    mine, base = res.logs[v.name], res.paired[v.name]
    for log in mine:
        aux = log.active_aux[s.warmup : s.warmup + s.timed]
        if v.phase == "post" and any(aux):
            raise AssertionError(f"{v.name}: an auxiliary head ran in a timed step ({aux})")
        if v.phase == "pre" and min(aux) < res.aux_heads:
            raise AssertionError(f"{v.name}: an auxiliary head was dropped before a timed step ({aux})")
    med = statistics.median

    def paired(kind: str = "iteration", clock: str | None = None) -> list[float]:
        return [x / y for la, lb in zip(mine, base)
                for x, y in zip(_times(la, s, kind, clock), _times(lb, s, kind, clock))]

    a = [t for log in mine for t in _times(log, s)]
    b = [t for log in base for t in _times(log, s)]
    ratios = paired()
    rounds = []
    for k in range(len(mine)):
        chunk = ratios[k * s.timed : (k + 1) * s.timed]
        rounds += [med(chunk[r : r + s.round_len]) for r in range(0, s.timed - s.round_len + 1, s.round_len)]
    return Ratio(
        variant_ms=med(a) * 1e3, baseline_ms=med(b) * 1e3, added_us=med([x - y for x, y in zip(a, b)]) * 1e6,
        ratio=med(ratios), ci=bootstrap_ci(ratios), rounds=rounds, of_medians=med(a) / med(b),
        wall=med(paired(clock="wall")), window=med(paired(kind="window")),
        mean=statistics.fmean(a) / statistics.fmean(b), n=len(a),
    )


# ============================================================================== the report
def fmt_flops(x: float | None) -> str:
    if x is None:
        return "?"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= div:
            return f"{x / div:.3g} {unit}"
    return f"{x:.0f}"


def fmt_bytes(x: int) -> str:
    return f"{x / 1024:,.1f} KiB" if x < 1024**2 else f"{x / 1024**2:,.2f} MiB"


def verdict(value: float, target: float | None, of: str = "") -> str:
    if target is None:
        return "no target (reported)"
    what = f"{of} " if of else ""
    return f"{what}<= {target}: **met**" if value <= target else f"{what}<= {target}: **NOT met**"


def flop_cells(res: ModelResult, v: V.Variant) -> tuple[str, str]:
    base = res.flop_phases[v.baseline]
    bflops = base[0] if v.phase == "post" else base[max(base)]  # a baseline of MT2ST rows has phases too
    phases = res.flop_phases[v.name]
    mine = phases[0] if v.phase == "post" else phases[max(phases)]
    cell = fmt_flops(mine)
    cfg = V.resolve_callback(v, 10**6)
    if cfg.get("strategy") in MEASURING_STRATEGIES:
        every = int(cfg.get("adapt_every", 10))
        m = res.flops[v.name][0]
        cell += f"; measuring step (1 in {every}): {fmt_flops(m)}"
        return cell, f"{mine / bflops:.3f} (mean {((every - 1) * mine + m) / every / bflops:.3f})"
    return cell, f"{mine / bflops:.3f}"


def timing_table(results: list[ModelResult], rows: list[V.Variant], s: Settings, section: str) -> list[str]:
    out = [
        "| model | row | vs | median step, ms (row / baseline) | added per step | **ratio** | 95% CI | rounds: "
        "min / median / max | ratio of medians | wall-clock | hook window | mean | FLOPs/step (row) | FLOP ratio "
        "| target |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        for v in rows:
            if v.section != section or v.name not in res.logs:
                continue
            r = ratio(res, v, s)
            fl, fr = flop_cells(res, v)
            out.append(
                f"| {res.model.name} | {v.name} | {v.baseline} | {r.variant_ms:.2f} / {r.baseline_ms:.2f} "
                f"| {r.added_us:+.0f} us | **{r.ratio:.3f}** | {r.ci[0]:.3f}-{r.ci[1]:.3f} "
                f"| {min(r.rounds):.3f} / {statistics.median(r.rounds):.3f} / {max(r.rounds):.3f} "
                f"| {r.of_medians:.3f} | {r.wall:.3f} | {r.window:.3f} | {r.mean:.3f} | {fl} | {fr} "
                f"| {verdict(r.mean, v.target, 'mean') if v.mean_target else verdict(r.ratio, v.target)} |"
            )
    return out


def sync_table(results: list[ModelResult], rows: list[V.Variant]) -> list[str]:
    """Table 3 on the CPU: ``benchmarks/sync_probe.py``'s count of the tensor-to-Python conversions made by
    mt2st_lightning's own code, per kind of step."""
    out = [
        f"Counted with `benchmarks/sync_probe.py` (`count_syncs`): every tensor-to-Python conversion (`item`, "
        f"`__bool__`, `__float__`, `tolist`, `cpu`, ..., `torch.equal`/`allclose`) made while a frame of "
        f"mt2st_lightning's library code is on the stack, in one fit of {SYNC_STEPS} steps per row (default "
        "settings of the row, a `DummyLogger`, `log_every_n_steps=50`). On a GPU each one is a host-device "
        "synchronisation, except conversions of tensors that are already on the host (a measuring step's "
        "statistics, once copied to the CPU, count again here: the figure is an upper bound). *ordinary*: no "
        "measurement, no drop, not a logging step; *logging*: Lightning's logging steps, where the non-finite "
        "guard (`on_nonfinite='raise'`) reads its flag; *measuring*: an adaptive or conflict policy observed the "
        "step; *drop*: a head left in that step; *outside*: between steps (epoch and train end, in total); "
        "*mean*: all conversions of the fit / its steps. Lightning's own conversions (its logging) are not "
        "counted; the plain baselines make none from mt2st_lightning.",
        "",
        "| model | row | ordinary: per step (steps) | logging: per step (steps) | measuring: per step (steps) "
        "| drop: per step (steps) | outside steps | mean per step | where (whole fit) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(c: harness.SyncCount, kind: str) -> str:
        per = c.per_step(kind)
        return "-" if per is None else f"{per:.2f} ({c.steps[kind]})"

    for res in results:
        for v in rows:
            c = res.library_syncs.get(v.name)
            if c is None:
                continue
            where = ", ".join(f"{k.replace('mt2st_lightning.', '')} x{n}"
                              for k, n in sorted(c.where.items(), key=lambda kv: -kv[1])[:3]) or "-"
            if len(c.where) > 3:
                where += f", +{len(c.where) - 3} more"
            out.append(f"| {res.model.name} | {v.name} | {cell(c, 'ordinary')} | {cell(c, 'logging')} "
                       f"| {cell(c, 'measuring')} | {cell(c, 'drop')} | {c.outside} | {c.mean:.3f} | {where} |")
    return out


def memory_table(results: list[ModelResult], rows: list[V.Variant], gpu: bool) -> list[str]:
    out = ["| model | row | params | grads | optimizer state | buffers | total | vs plain single-task | target |",
           "|---|---|---|---|---|---|---|---|---|"]
    if gpu:
        out = ["| model | row | training state | torch.cuda.max_memory_allocated | vs plain single-task | target |",
               "|---|---|---|---|---|---|"]
    for res in results:
        base = res.memory.get("plain single-task")
        for name, m in res.memory.items():
            if gpu:
                peak, bpeak = res.cuda_peak[name], res.cuda_peak["plain single-task"]
                ok = verdict(peak / bpeak, 1.01) if name != "plain single-task" and "multi" not in name else ""
                out.append(f"| {res.model.name} | {name} | {fmt_bytes(m['total'])} | {fmt_bytes(peak)} "
                           f"| {peak / bpeak:.3f} | {ok} |")
                continue
            ok = verdict(m["total"] / base["total"], 1.01) if name not in ("plain single-task", "plain multi-task") else ""
            out.append(
                f"| {res.model.name} | {name} | {fmt_bytes(m['params'])} | {fmt_bytes(m['grads'])} "
                f"| {fmt_bytes(m['optimizer'])} | {fmt_bytes(m['buffers'])} | {fmt_bytes(m['total'])} "
                f"| {m['total'] / base['total']:.3f} | {ok} |"
            )
    return out


def phase_table(results: list[ModelResult]) -> list[str]:
    out = ["| model | 3 aux heads (steps 0-2) | 2 (steps 3-4) | 1 (steps 5-6) | 0 (step 7 on) | plain single-task "
           "| plain multi-task |", "|---|---|---|---|---|---|---|"]
    name = "diminish+prune, all pruned"
    for res in results:
        if name not in res.flop_phases:
            continue
        ph = res.flop_phases[name]
        st = res.flop_phases["plain single-task"][0]
        cells = [f"{fmt_flops(ph[k])} ({ph[k] / st:.3f}x)" if k in ph else "?" for k in (3, 2, 1, 0)]
        mt = next(iter(res.flop_phases["plain multi-task"].values()))
        out.append(f"| {res.model.name} | " + " | ".join(cells) + f" | {fmt_flops(st)} | {fmt_flops(mt)} |")
    return out


def models_table(results: list[ModelResult]) -> list[str]:
    out = ["| model | encoder | batch | params (encoder / all heads) | FLOPs/step single-task / multi-task |",
           "|---|---|---|---|---|"]
    for res in results:
        st = res.flop_phases["plain single-task"][0]
        mt = next(iter(res.flop_phases["plain multi-task"].values()))
        out.append(f"| {res.model.name} | {res.model.about} | {res.model.batch_size} "
                   f"| {res.encoder_params / 1e6:.3f} M / {(res.params - res.encoder_params) / 1e6:.3f} M "
                   f"| {fmt_flops(st)} / {fmt_flops(mt)} |")
    return out


def report(results: list[ModelResult], rows: list[V.Variant], s: Settings, env: dict[str, str], gpu: bool,
           wall: float) -> str:
    title = "GPU (bf16-mixed, torch.compile on the encoder)" if gpu else "CPU"
    lines = [
        f"### {title}: {env['date']}, {'quick smoke run' if s.quick else 'full run'}",
        "",
        f"- machine: {env['cpu']}, {env['cores']} cores"
        + (f", {torch.cuda.get_device_name()}" if gpu else "")
        + f"; load average at start {env['load']}",
        f"- torch {env['torch']}, lightning {env['lightning']}, Python {env['python']}; commit {env['commit']}",
        f"- {env['threads']}; {s.sessions} lockstep session(s) per model x {s.timed} timed steps per fit after "
        f"{s.warmup} warm-up steps = {s.sessions * s.timed} timed steps per row; whole run {wall:.0f} s",
        "- **How**: every row and every baseline is a real `Trainer.fit` (AdamW, a `DummyLogger` (Lightning's logging path every 50 steps, no file I/O), no progress bar, "
        "no checkpointing, no validation). All fits of a model" + (" and table section" if s.jobs > 1 else "")
        + " run in one process" + (f" (up to {s.jobs} such processes in parallel, `--jobs {s.jobs}`)" if s.jobs > 1
                                   else "") + ", in *lockstep*: one thread "
        "per fit, and a baton lets exactly one fit run one training step at a time; each row is paired with "
        "its own copy of its baseline, and the order of the pairs and which of the two goes first are drawn "
        "afresh every cycle. So step i of a row and step i of its baseline run back to back, a few ms apart, on "
        "the same data batch.",
        "- **step** = one training-loop iteration timed by callbacks placed first and last in `callbacks`: from "
        "`on_train_batch_start` to the next step's (the logger connector's end-of-batch work and the next batch's "
        "fetch are in it); clock: " + ("this fit thread's CPU time (`time.thread_time`: time lost to other processes on this shared 2-core VM is left out; the wall-clock ratio is a column)" if s.clock == "cpu" else "wall-clock time, with `torch.cuda.synchronize()` at both ends") + ". *hook window* = first `on_train_batch_start` .. "
        "last `on_train_batch_end` (the definition in the issue).",
        f"- **ratio** = median over the timed steps of (row step i / baseline step i), the target applies to it; "
        f"*95% CI* = bootstrap over steps; *rounds* = the same median within each run of {s.round_len} consecutive "
        "cycles (min / median / max over rounds); *ratio of medians* = median row step / median baseline step; "
        "*added per step* = median of (row step i - baseline step i); *mean* = mean / mean (charges the adaptive "
        "strategies' measuring steps, 1 in `adapt_every`; the issue's targets for them apply to it, divided by the "
        "`mtl` row's step). The **A/A** rows (a baseline against its own copy) show what "
        "the method reads when there is no difference. The CI covers the step-to-step noise; fresh fits of the "
        "same row differ by up to about 1.5% more (memory layout, which fits share a cycle), hence one fresh set "
        "of fits per session.",
        "",
        "Models (real sklearn digits, 8x8, 3 auxiliary targets recon (64) / edges (64) / moments (5); heads "
        "Linear-ReLU-Linear, hidden 64; AdamW lr 1e-3; same seed, data order and batch size on both sides):",
        "",
        *models_table(results),
        "",
        "#### 1 and 6. After the switch (and after Diminish has pruned every head) vs. the single-task model",
        "",
        *timing_table(results, rows, s, "post"),
        "",
        "#### 2. Before the switch vs. a hand-written multi-task step (fixed weights)",
        "",
        *timing_table(results, rows, s, "pre"),
        "",
        "#### 3. Host-device synchronisations per step made by the library"
        + (" (CUDA, `torch.cuda.set_sync_debug_mode`)" if gpu else " (CPU-side probe: tensor-to-Python conversions)"),
        "",
    ]
    if gpu:
        lines += ["| model | row | syncs/step | plain baseline | added |", "|---|---|---|---|---|"]
        for res in results:
            for name, n in res.syncs.items():
                v = next((r for r in rows if r.name == name), None)
                if v is None or v.baseline is None:
                    continue
                b = res.syncs.get(v.baseline, float("nan"))
                lines.append(f"| {res.model.name} | {name} | {n:.2f} | {b:.2f} | {n - b:+.2f} |")
    else:
        lines += sync_table(results, rows)
    lines += [
        "",
        "#### 4. Memory after the switch vs. the single-task model (target <= 1.01)",
        "",
        ("torch.cuda.max_memory_allocated over steps 9-12, reset at step 9." if gpu else
         "Measured: bytes of the storages held by the training state at the end of step 12 (after the optimizer "
         "step, before the next zero_grad): parameters + existing `.grad` tensors + optimizer state tensors + "
         "module buffers, each storage counted once. Not measured: activations and allocator caches (peak RSS "
         "is not a reliable measure on CPU, so none is given)."),
        "",
        "A dropped head's gradients and optimizer state are freed; its frozen weights stay in memory unless the "
        "callback has `release_heads=True` (the `release_heads` rows).",
        "",
        *memory_table(results, rows, gpu),
        "",
        "#### 5 and 6. FLOPs per step by phase (count of FlopCounterMode over one real training step: forward + "
        "backward), Diminish with staggered pruning",
        "",
        "FLOPs per step are also in the timing tables above, next to the time ratios.",
        "",
        *phase_table(results),
        "",
    ]
    return "\n".join(lines)


KEPT = "The GPU results below are from an earlier session:"


def write_section(path: Path, which: str, body: str, keep_measured: bool = False) -> None:
    """Replace the ``which`` (cpu/gpu) section of RESULTS.md, keeping the other one. With ``keep_measured``
    (a GPU section written without a GPU), earlier measurements stay below the new first line."""
    start, end = f"<!-- {which}:start -->", f"<!-- {which}:end -->"
    text = path.read_text() if path.exists() else ""
    old = re.search(re.escape(start) + "(.*?)" + re.escape(end), text, flags=re.S)
    if keep_measured and old:
        earlier = [ln for ln in old.group(1).strip().splitlines()]
        while earlier and (earlier[0].startswith("missing:") or earlier[0] in ("", KEPT)):
            earlier.pop(0)
        if earlier:
            body = f"{body.strip()}\n\n{KEPT}\n\n" + "\n".join(earlier)
    if "<!-- cpu:start -->" not in text:
        text = ("# MT2ST benchmark results\n\nWritten by `python benchmarks/run.py` (see benchmarks/README.md); each run "
                "replaces its own section.\n\n## CPU\n\n<!-- cpu:start -->\n<!-- cpu:end -->\n\n## GPU\n\n"
                "<!-- gpu:start -->\nmissing: no GPU was available in any session so far.\n<!-- gpu:end -->\n")
    new = f"{start}\n{body.strip()}\n{end}"
    text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: new, text, flags=re.S)
    path.write_text(text)


def dump(results: list[ModelResult], s: Settings, path: Path) -> None:
    import json

    def times(log):
        return {f"{kind}_{clock}": _times(log, s, kind, clock) for kind in ("iteration", "window")
                for clock in ("cpu", "wall")}

    raw = {res.model.name: {name: {"row": [times(log) for log in logs],
                                   "baseline": [times(log) for log in res.paired.get(name, [])]}
                            for name, logs in res.logs.items()} for res in results}
    path.write_text(json.dumps(raw))


# ============================================================================== main
def suite(s: Settings, opts: harness.FitOptions, log, timing_only: bool = False
          ) -> tuple[list[ModelResult], list[V.Variant]]:
    gpu = opts.accelerator == "gpu"
    results, all_rows = [], {}
    for name in s.models:
        rows = select(s, gpu=gpu or opts.compile_encoder, model=name)
        all_rows.update({v.name: v for v in rows})
        results.append(measure_model(name, s, rows, opts, log, timing_only=timing_only))
    return results, list(all_rows.values())


def compile_suite(s: Settings, log) -> tuple | None:
    cs = replace(s, sessions=1, variant_filter=list(COMPILE_ROWS), section="",
                 models=[m for m in s.models if m in COMPILE_MODELS])
    if not cs.models:
        return None
    log("torch.compile on the CPU (inductor, the encoder of every fit compiled)")
    t_c = time.perf_counter()
    c_results, c_rows = suite(cs, harness.FitOptions(steps=0, compile_encoder=True), log, timing_only=True)
    return c_results, c_rows, cs, time.perf_counter() - t_c


def run_part(s: Settings, a: argparse.Namespace, log) -> None:
    import pickle

    def portable(results: list[ModelResult]) -> list[ModelResult]:
        for res in results:
            res.model = res.model.name  # type: ignore[assignment]  # a ModelSpec holds lambdas; restored by name
        return results

    if a.part == "compile":
        compiled = compile_suite(s, log)
        out = {"compiled": None if compiled is None else (portable(compiled[0]), [v.name for v in compiled[1]],
                                                          *compiled[2:])}
    else:
        model, section = a.part.split(":")
        ps = replace(s, models=[model], section=section)
        results, rows = suite(ps, harness.FitOptions(steps=0), log)
        out = {"results": portable(results), "rows": [v.name for v in rows]}
    Path(a.save).write_bytes(pickle.dumps(out))


def _merge(into: ModelResult, part: ModelResult) -> None:
    for name in ("logs", "paired", "flops", "flop_phases", "memory", "cuda_peak", "syncs", "library_syncs"):
        getattr(into, name).update(getattr(part, name))


def run_jobs(s: Settings, a: argparse.Namespace, log) -> tuple[list[ModelResult], list[V.Variant], tuple | None]:
    """Each model's two table sections (and the compile section) in a process of its own, up to ``s.jobs`` at a
    time; every process runs its fits in lockstep exactly as a single run does. Returns the merged results."""
    import pickle
    import tempfile

    parts = [f"{m}:{sec}" for m in s.models for sec in ("post", "pre")] + ([] if a.no_compile else ["compile"])
    passed = [f"--models={','.join(s.models)}", f"--sessions={s.sessions}", f"--timed={s.timed}",
              f"--warmup={s.warmup}", f"--threads={s.threads}"] + (["--quick"] if s.quick else [])
    if a.variants:
        passed.append(f"--variants={a.variants}")
    with tempfile.TemporaryDirectory() as tmp:
        pending = list(enumerate(parts))
        running: list[tuple[int, str, subprocess.Popen]] = []
        while pending or running:
            while pending and len(running) < s.jobs:
                k, part = pending.pop(0)
                cmd = [sys.executable, str(Path(__file__).resolve()), *passed, f"--part={part}", f"--save={tmp}/{k}.pkl"]
                running.append((k, part, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
                log(f"started part {part}")
            time.sleep(1.0)
            for item in list(running):
                k, part, proc = item
                if proc.poll() is None:
                    continue
                running.remove(item)
                output = proc.stdout.read() if proc.stdout else ""
                if proc.returncode != 0:
                    for _, _, other in running:
                        other.kill()
                    raise RuntimeError(f"part {part} failed (exit {proc.returncode}):\n{output[-4000:]}")
                log(f"finished part {part}: " + " | ".join(ln.strip() for ln in output.splitlines() if ln.startswith("[")))
        return load_parts([Path(f"{tmp}/{k}.pkl") for k in range(len(parts))], s.models)


def load_parts(files: list[Path], models: list[str]) -> tuple[list[ModelResult], list[V.Variant], tuple | None]:
    """Merge the results that ``--part`` processes saved."""
    import pickle

    loaded = [pickle.loads(f.read_bytes()) for f in files]
    merged: dict[str, ModelResult] = {}
    names: set[str] = set()
    compiled = None
    by = {v.name: v for v in V.VARIANTS}
    for part in loaded:
        for res in part.get("results") or (part["compiled"] or [[]])[0]:
            res.model = V.MODELS[res.model]
        if "compiled" in part:
            if part["compiled"] is not None:
                c_results, c_names, *rest = part["compiled"]
                compiled = (c_results, [by[n] for n in c_names], *rest)
            continue
        names |= set(part["rows"])
        for res in part["results"]:
            if res.model.name in merged:
                _merge(merged[res.model.name], res)
            else:
                merged[res.model.name] = res
    rows = [v for v in V.VARIANTS if v.name in names]
    return [merged[m] for m in models if m in merged], rows, compiled


#: The CPU compile section: MT2ST after the switch vs. the plain single-task model, both with the encoder compiled;
#: on the two small models (inductor takes minutes to compile the Transformer's forward and backward on 2 cores).
COMPILE_ROWS = ("switch, post-switch", "A/A: plain single-task")
COMPILE_MODELS = ("mlp", "cnn")


def compile_section(results: list[ModelResult], rows: list[V.Variant], s: Settings, wall: float) -> list[str]:
    rows = [v for v in rows if v.name in COMPILE_ROWS]
    return [
        "#### 7 (CPU). `torch.compile`: after the switch vs. the single-task model, both compiled",
        "",
        f"Every fit's encoder is `torch.compile`d (default inductor backend, `fullgraph=False`), on both sides, in "
        f"lockstep as above; float32; {s.sessions} session x {s.timed} timed steps after {s.warmup} warm-up steps "
        f"(compilation falls in them; the switch, at step {V.SWITCH_AT}, changes nothing the compiled encoder sees); "
        f"{wall:.0f} s in all. The GPU suite runs the same comparison under bf16-mixed when a GPU is present.",
        "",
        *timing_table(results, rows, s, "post"),
        "",
    ]


def main() -> None:
    s, a = parse()
    torch.set_num_threads(s.threads)
    torch.set_num_interop_threads(1)
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", flush=True)

    env = environment(s)
    log(f"{env['cpu']}, {env['cores']} cores, torch {env['torch']}, lightning {env['lightning']}, {env['threads']}, "
        f"load {env['load']}")

    if a.part is not None:  # one part of a --jobs run: measure, save, no report
        run_part(s, a, log)
        return
    if s.jobs > 1 and not a.smoke_gpu_path:
        results, rows, compiled = run_jobs(s, a, log)
    else:
        results, rows, compiled = None, None, None

    if a.smoke_gpu_path:
        opts = harness.FitOptions(steps=0, accelerator="cpu", precision="bf16-mixed", compile_encoder=True)
        results, rows = suite(s, opts, log)
        print(report(results, rows, s, env, gpu=False, wall=time.perf_counter() - t_start))
        return

    if results is None:
        results, rows = suite(s, harness.FitOptions(steps=0), log)
        compiled = None if a.no_compile else compile_suite(s, log)
    if a.dump:
        dump(results, s, Path(a.dump))
    cpu_body = report(results, rows, s, env, gpu=False, wall=time.perf_counter() - t_start)
    if compiled is not None:
        cpu_body += "\n" + "\n".join(compile_section(*compiled)) + "\n"
    out = Path(a.out) if a.out else (None if s.quick else RESULTS)
    print(cpu_body)
    if torch.cuda.is_available():
        log("GPU suite: bf16-mixed + torch.compile")
        gs = replace(s, clock="wall")
        t_gpu = time.perf_counter()
        g_results, g_rows = suite(gs, harness.FitOptions(steps=0, accelerator="gpu", precision="bf16-mixed",
                                                         compile_encoder=True), log)
        gpu_body = report(g_results, g_rows, gs, env, gpu=True, wall=time.perf_counter() - t_gpu)
    else:
        gpu_body = f"missing: no GPU was available in this session ({env['date']}, commit {env['commit']})."
    print("\n## GPU\n\n" + gpu_body)
    if out is not None:
        write_section(out, "cpu", cpu_body)
        write_section(out, "gpu", gpu_body, keep_measured=not torch.cuda.is_available())
        log(f"wrote {out}")
    log("done")


if __name__ == "__main__":
    main()
