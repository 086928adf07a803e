"""What is measured: the model sizes and the table of variants.

A new strategy (or a new setting of an existing one) is one more ``Variant`` in ``VARIANTS``: ``run.py`` times
it in the same interleaved rounds as the others, divides by its ``baseline`` and adds a row to the tables.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

from mt2st_lightning.examples.models import ConvEncoder, MLPEncoder, TransformerEncoder


# ============================================================================== model sizes
@dataclass(frozen=True)
class ModelSpec:
    name: str
    make_encoder: Callable[[], nn.Module]
    batch_size: int
    head_hidden: int = 64  # every head is Linear(d, 64) -> ReLU -> Linear(64, out), as MultiTaskModel builds it
    about: str = ""


MODELS: dict[str, ModelSpec] = {
    m.name: m
    for m in (
        ModelSpec("mlp", lambda: MLPEncoder(in_features=64, hidden=128, depth=2), batch_size=64,
                  about="MLPEncoder 64-128-128; heads about as large as the encoder"),
        ModelSpec("cnn", lambda: ConvEncoder(in_channels=1, channels=(32, 64)), batch_size=32,
                  about="ConvEncoder (32, 64) on 8x8; encoder dominates"),
        ModelSpec("transformer", lambda: TransformerEncoder(image_size=8, d_model=256, nhead=8, num_layers=4,
                                                            dim_feedforward=1024), batch_size=8,
                  about="TransformerEncoder d_model 256, 4 layers, ff 1024 (8 row tokens); encoder dominates"),
    )
}

# ============================================================================== the variants
Module = Literal["mt2st", "plain-stl", "plain-mtl"]
Phase = Literal["pre", "post"]

SWITCH_AT = 3  # optimizer step of the switch: the "post" variants time only steps after it and the warm-up
# Diminish with pruning, staggered: exp(-eta t) < 0.05 from t = 3, 5 and 7 on; every head is gone at step 7.
PRUNE = dict(gamma0=1.0, eta={"recon": 1.2, "edges": 0.7, "moments": 0.45}, nu=1.0, prune_below=0.05)
QUIET = dict(log_weights=False, on_nonfinite="off")
#: The issue's targets for the adaptive strategies: the *mean* step, measuring steps included, divided by the
#: mean step of ``mtl`` (MultiTaskModel under MT2STCallback("mtl"), paired in lockstep like every baseline).
ADAPTIVE_TARGETS: dict[tuple[str, int], float] = {("representation", 1): 1.10, ("representation", 10): 1.03}
QUIET_ABOUT = "log_weights=False, on_nonfinite='off': what the default path's logging and non-finite guard cost"


@dataclass(frozen=True)
class Variant:
    """One row.

    module: ``"mt2st"`` is ``MultiTaskModel`` (the mixin) under ``MT2STCallback(**callback)``; ``"plain-stl"``
        and ``"plain-mtl"`` are hand-written LightningModules (encoder + primary head, or all heads with fixed
        weights 1), with no mixin and no callback.
    baseline: the variant it is divided by (``None``: a baseline itself).
    phase: ``"post"`` asserts that no auxiliary head ran in any timed step (after the switch or the pruning),
        ``"pre"`` that every auxiliary head ran in every timed step.
    models: the model sizes the row runs on (``None``: all of them).
    with_callback: ``False`` runs the ``"mt2st"`` module without ``MT2STCallback`` (an ablation row).
    predrop: drop every auxiliary head before the fit (``MT2STMixin.drop_task``), as the callback would.
    drop_at: drop every auxiliary head at the start of this step with ``MT2STMixin.drop_task``, from a callback
        of one hook (an ablation row: the mixin's post-switch step, with what the steps before the drop logged).
    empty_callback: add a callback that does nothing (an ablation row: what any callback costs in Lightning).
    gpu: whether the row is also run in the GPU (bf16-mixed + torch.compile) suite.
    mean_target: the target applies to the *mean* column (mean step / mean baseline step, measuring steps
        included), not to the median ratio: the adaptive rows, whose cost sits in 1 step in ``adapt_every``.
    """

    name: str
    module: Module
    baseline: str | None = None
    callback: Mapping[str, Any] = field(default_factory=dict)
    phase: Phase = "pre"
    target: float | None = 1.02
    section: str = ""
    about: str = ""
    models: tuple[str, ...] | None = None
    gpu: bool = True
    with_callback: bool = True
    predrop: bool = False
    drop_at: int | None = None
    empty_callback: bool = False
    mean_target: bool = False


VARIANTS: list[Variant] = [
    # --- the hand-written baselines
    Variant("plain single-task", "plain-stl", about="encoder + primary head, plain LightningModule"),
    Variant("plain multi-task", "plain-mtl", about="all heads, losses summed with fixed weights 1"),
    # --- A/A controls: a baseline against its own copy; shows the method's bias and noise
    Variant("A/A: plain single-task", "plain-stl", "plain single-task", phase="post", section="post", target=None,
            about="control: identical module on both sides"),
    Variant("A/A: plain multi-task", "plain-mtl", "plain multi-task", section="pre", target=None,
            about="control: identical module on both sides"),
    # --- 1. after the switch vs. the single-task model
    Variant("switch, post-switch", "mt2st", "plain single-task", dict(strategy="switch", switch_at=SWITCH_AT),
            phase="post", section="post", about="defaults: log_weights=True, on_nonfinite='raise'"),
    Variant("switch, post-switch, release_heads", "mt2st", "plain single-task",
            dict(strategy="switch", switch_at=SWITCH_AT, release_heads=True), phase="post", section="post",
            about="the dropped heads' weights freed"),
    Variant("switch, post-switch, quiet", "mt2st", "plain single-task",
            dict(strategy="switch", switch_at=SWITCH_AT, **QUIET), phase="post", section="post",
            about=QUIET_ABOUT),
    # The default path's own cost, paired directly: defaults against their quiet twin (the two fits differ in
    # log_weights and the non-finite guard only, so the ratio does not carry the mixin's or Lightning's share).
    Variant("defaults vs quiet, post-switch", "mt2st", "switch, post-switch, quiet",
            dict(strategy="switch", switch_at=SWITCH_AT), phase="post", section="post", target=None,
            about="log_weights=True, on_nonfinite='raise' against both off"),
    Variant("stl", "mt2st", "plain single-task", dict(strategy="stl"), phase="post", section="post",
            about="heads dropped at step 0", models=("mlp", "cnn")),
    # --- 6. Diminish with pruning, once every auxiliary weight is below prune_below
    Variant("diminish+prune, all pruned", "mt2st", "plain single-task", dict(strategy="diminish", **PRUNE),
            phase="post", section="post", about="staggered pruning at steps 3/5/7"),
    Variant("diminish+prune, all pruned, release_heads", "mt2st", "plain single-task",
            dict(strategy="diminish", **PRUNE, release_heads=True), phase="post", section="post",
            about="the pruned heads' weights freed"),
    # --- ablations: where the post-switch cost comes from (the smallest model shows a fixed per-step cost best)
    Variant("ablation: plain single-task + an empty callback", "plain-stl", "plain single-task", phase="post",
            section="post", empty_callback=True, target=None, models=("mlp",), gpu=False,
            about="Lightning's per-hook dispatch of one more callback"),
    Variant("ablation: MultiTaskModel, heads dropped before fit, no callback", "mt2st", "plain single-task",
            phase="post", section="post", with_callback=False, predrop=True, target=None, models=("mlp",),
            gpu=False, about="the mixin and MultiTaskModel's step, without the callback"),
    Variant("ablation: MultiTaskModel, heads dropped at step 3 by a one-hook callback", "mt2st", "plain single-task",
            phase="post", section="post", with_callback=False, drop_at=SWITCH_AT, target=None, models=("mlp",),
            gpu=False, about="as the post-switch row, minus MT2STCallback: the mixin, and Lightning's logging of the "
            "keys the first steps logged (the auxiliary losses) for the rest of the epoch"),
    # --- 2. before the switch vs. the hand-written multi-task step
    Variant("mtl", "mt2st", "plain multi-task", dict(strategy="mtl"), section="pre"),
    Variant("switch, pre-switch", "mt2st", "plain multi-task", dict(strategy="switch", switch_at="last"),
            section="pre", about="switch at the fit's last step, which is not timed"),
    Variant("switch, pre-switch, quiet", "mt2st", "plain multi-task",
            dict(strategy="switch", switch_at="last", **QUIET), section="pre", about=QUIET_ABOUT),
    Variant("defaults vs quiet, pre-switch", "mt2st", "switch, pre-switch, quiet",
            dict(strategy="switch", switch_at="last"), section="pre", target=None,
            about="log_weights=True, on_nonfinite='raise' against both off"),
    Variant("diminish", "mt2st", "plain multi-task", dict(strategy="diminish", eta=0.001), section="pre",
            about="weights change every step, no pruning"),
    # --- the adaptive strategies vs. the `mtl` row's step (the figure), measuring steps included (the "mean"
    # column charges them; the targets apply to it). MultiTaskModel passes
    # its encoder output to mt2st_loss(losses, features=h), so gradnorm/fisher measure on the representation by
    # default (one autograd.grad through the heads only); measure_on="parameters" is the old encoder backward.
    *[
        Variant(f"{strategy}, {mode}, every {every}", "mt2st", "mtl",
                dict(strategy=strategy, adapt_every=every, **({"measure_on": "parameters"} if mode == "parameters" else {})),
                section="pre", target=ADAPTIVE_TARGETS.get((mode, every)), mean_target=True, gpu=False,
                about=f"measure_on={mode!r}, adapt_every={every}: " + (
                    "the squared gradient norms of every task's loss w.r.t. the shared features h, one "
                    "autograd.grad through the heads only" if mode == "representation" else
                    "the squared gradient norms w.r.t. the encoder's parameters, one encoder backward per task"))
        for strategy in ("gradnorm", "fisher")
        for mode in ("representation", "parameters")
        for every in (1, 10)
        # fisher takes the same gradients as gradnorm (adaptive.squared_grad_norms) and differs only in the few
        # scalar operations that turn them into factors: its parameter mode every step would repeat gradnorm's.
        if (strategy, mode, every) != ("fisher", "parameters", 1)
    ],
    *[
        Variant(f"noise, every {every}", "mt2st", "mtl", dict(strategy="noise", adapt_every=every),
                section="pre", target=None, gpu=False, about=f"adapt_every={every}: loss statistics only")
        for every in (1, 10)
    ],
    *[
        Variant(f"conflict, every {every}", "mt2st", "mtl",
                # threshold -1: a cosine is never below it, so every head stays for the whole fit (the "pre" check).
                dict(strategy="conflict", adapt_every=every, threshold=-1.0), section="pre", target=None, gpu=False,
                about=f"adapt_every={every}: feature-gradient cosines, one autograd.grad through the heads; "
                      "threshold=-1 (never drops)")
        for every in (1, 10)
    ],
    Variant("plateau", "mt2st", "plain multi-task",
            dict(strategy="plateau", monitor="val/primary_metric", mode="max", patience=3), section="pre",
            about="no validation in the fits: the ordinary step of a plateau switch that has not fired"),
]


def resolve_callback(variant: Variant, steps: int) -> dict[str, Any]:
    """The callback's kwargs for a fit of ``steps`` steps. ``switch_at="last"`` is the fit's last step (the
    latest switch the callback accepts): that step is not timed, it only ends the last timed step's clock."""
    kwargs = dict(variant.callback)
    if kwargs.get("switch_at") == "last":
        kwargs["switch_at"] = steps - 1
    return kwargs


def by_name(variants: list[Variant]) -> dict[str, Variant]:
    names = [v.name for v in variants]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise ValueError(f"duplicate variant names {sorted(dupes)}")
    out = {v.name: v for v in variants}
    for v in variants:
        if v.baseline is not None and v.baseline not in out:
            raise ValueError(f"variant {v.name!r}: unknown baseline {v.baseline!r}")
    return out
