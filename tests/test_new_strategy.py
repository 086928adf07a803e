"""A strategy added through the registry alone: its policy class (with a parameter of its own), its registry
entry and its Hydra preset. Nothing in the callback, the app or the report changes, and it runs from Python
and from the app's configs."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import pytest
from hydra import compose, initialize_config_dir

from mt2st_lightning import MT2STCallback
from mt2st_lightning.policies import REGISTRY, Policy, policy_for
from mt2st_lightning.policies.params import check_gamma0, check_time_bound, gamma0_per_task, resolve_time_bound
from tests.conftest import toy_loader, toy_model, toy_trainer


class ToyPolicy(Policy):
    """A strategy of its own: the auxiliary weight is ``gamma0 * share`` until ``leave_at``, then the heads leave.

    Args:
        share: the toy's own parameter, a fraction in (0, 1].
        leave_at: a time bound (the shared parser: a step, or a fraction of the run).
        gamma0: the shared per-task weight.
    """

    name = "toy"

    def __init__(self, share: float = 0.5, leave_at: int | float = 0.5, gamma0: float | Mapping[str, float] = 1.0):
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
            raise ValueError(f"share must be a number in (0, 1], got {share!r}")
        check_time_bound("leave_at", leave_at)
        check_gamma0(gamma0)
        self.share, self.leave_at, self.gamma0 = share, leave_at, gamma0
        self._leave = 0
        self._gamma0: dict[str, float] = {}

    def bind(self, tasks: Sequence[str], total: float | None, unit: str) -> None:
        self._leave = resolve_time_bound("leave_at", self.leave_at, total, unit)
        self._gamma0 = gamma0_per_task(self.gamma0, tasks)

    def weights(self, t: int, active: Sequence[str]) -> Mapping[str, float]:
        return {task: self._gamma0[task] * self.share for task in active}

    def finished(self, t: int, active: Sequence[str]) -> Collection[str]:
        return tuple(active) if t >= self._leave else ()


PRESET = """\
# A toy strategy: auxiliary weight gamma0 * share until leave_at, then the heads leave.
_target_: mt2st_lightning.MT2STCallback
strategy: toy
share: 0.25
leave_at: 2
gamma0: 1.0
unit: step
"""


@pytest.fixture
def toy_registered(monkeypatch):
    monkeypatch.setitem(REGISTRY, "toy", ToyPolicy)  # removed again after the test
    yield
    assert "toy" in REGISTRY


def test_a_registered_strategy_runs_from_python(tmp_path, toy_registered, recorder):
    callback = MT2STCallback("toy", share=0.25, leave_at=3, gamma0={"recon": 2.0, "parity": 1.0})
    assert type(callback.policy) is ToyPolicy and callback.strategy == "toy"
    model = toy_model()
    toy_trainer(tmp_path, [callback, recorder], max_epochs=1).fit(model, toy_loader())
    assert [r["weights"] for r in recorder.rows[:3]] == [{"label": 1.0, "recon": 0.5, "parity": 0.25}] * 3
    assert callback.drop_times == {"recon": 3, "parity": 3} and model.active_tasks == ("label",)
    # Its parameters are checked as any strategy's: an ignored one is named, a bad value refused.
    with pytest.raises(ValueError, match="strategy='toy' ignores eta"):
        MT2STCallback("toy", eta=0.1)
    with pytest.raises(ValueError, match="share must be a number"):
        policy_for("toy", share=2.0)
    with pytest.raises(ValueError, match=r"leave_at=1.5: a float is a fraction of the run"):
        MT2STCallback("toy", leave_at=1.5)


def test_a_registered_strategy_runs_from_a_hydra_preset(tmp_path, toy_registered):
    from mt2st_lightning.app.train import CONFIG_DIR, train

    extra = tmp_path / "extra_conf"
    (extra / "strategy").mkdir(parents=True)
    (extra / "strategy" / "toy.yaml").write_text(PRESET)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                f"hydra.searchpath=[file://{extra}]",
                "strategy=toy",
                "strategy.leave_at=3",
                f"paths.output_dir={tmp_path / 'run'}",
                "trainer.max_steps=6",
                "trainer.max_epochs=1",
                "trainer.limit_val_batches=1",
                "test=false",
                "progress=none",
            ],
        )
    assert cfg.strategy.strategy == "toy" and cfg.strategy.share == 0.25
    summary = train(cfg)  # the app's whole run: build, fit, summarise
    assert summary["strategy"] == "toy"
    assert summary["drop_times"] == {"recon": 3, "edges": 3, "moments": 3}


def test_the_registry_is_restored_after_the_tests_that_add_to_it():
    # Runs after the two above (pytest keeps a file's order): the toy strategy is gone again.
    assert "toy" not in REGISTRY
    with pytest.raises(ValueError, match="unknown MT2ST strategy 'toy'"):
        MT2STCallback("toy", share=0.25)
