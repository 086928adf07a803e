"""LightningCLI: ``MT2STCallback`` configured from a YAML file (``trainer.callbacks``, ``class_path``/``init_args``).

The example lives in ``examples/lightning_cli/``; these tests drive it through its own ``LightningCLI``
subclass, so the parser is exactly the one a user gets.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import importlib.util
import inspect
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from mt2st_lightning import MT2STCallback
from mt2st_lightning.arguments import strategy_parameters
from mt2st_lightning.policies import REGISTRY, STRATEGIES, policy_for
from mt2st_lightning.policies.params import parameters_of
from mt2st_lightning.schedules import Constant, Diminish, Product, Switch

# Lightning 2.6's LightningCLI still calls jsonargparse APIs that jsonargparse 4.49+ deprecates (not ours to fix).
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:lightning.pytorch.cli")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "lightning_cli"
CONFIG = EXAMPLE / "config.yaml"


def _load_example():
    spec = importlib.util.spec_from_file_location("mt2st_lightning_cli_example", EXAMPLE / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


example = _load_example()


@pytest.fixture(autouse=True)
def _example_argv(monkeypatch):
    # LightningCLI warns when it is given args while sys.argv holds other arguments (pytest's).
    monkeypatch.setattr(sys, "argv", [str(EXAMPLE / "train.py")])


def _cli(tmp_path: Path, init_args: Mapping[str, Any]):
    """The example's CLI, not run, from the example's config with the MT2ST callback's ``init_args`` replaced by
    ``init_args`` (a command-line override would merge with the file's ``init_args`` instead)."""
    config = yaml.safe_load(CONFIG.read_text())
    config["trainer"]["callbacks"] = [{"class_path": "mt2st_lightning.MT2STCallback", "init_args": dict(init_args)}]
    config["trainer"]["logger"] = False
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return example.main(["--config", str(path)], run=False)


# --------------------------------------------------------------------------- the example, end to end
@pytest.mark.slow
def test_example_config_trains_through_the_switch(tmp_path):
    # The documented command, as a user runs it (the switch lies at step 60 of 80).
    cmd = [
        sys.executable, str(EXAMPLE / "train.py"), "fit", "--config", str(CONFIG), "--trainer.max_steps=80",
        f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.enable_progress_bar=false",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # a small model: more threads only contend on a busy CPU
    result = subprocess.run(cmd, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "lightning_logs" / "version_0"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    init_args = saved["trainer"]["callbacks"][0]["init_args"]
    assert init_args["switch_at"] == 60 and isinstance(init_args["switch_at"], int)
    # The weights the callback logged: 1 up to the switch, 0 from step 60 on, one active task left.
    with open(run / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["mt2st/weight/recon"]]
    before = [r for r in rows if int(r["step"]) < 60]
    after = [r for r in rows if int(r["step"]) >= 60]
    assert before and after
    assert all(float(r[f"mt2st/weight/{t}"]) == 1.0 for r in before for t in ("recon", "edges", "moments"))
    assert all(float(r[f"mt2st/weight/{t}"]) == 0.0 for r in after for t in ("recon", "edges", "moments"))
    assert [float(r["mt2st/active_tasks"]) for r in after] == [1.0] * len(after)
    # The model's hyperparameters (tasks linked from the data module) were written as plain YAML.
    hparams = yaml.safe_load((run / "hparams.yaml").read_text())
    assert hparams["tasks"]["digit"] == {"kind": "classification", "out_features": 10}
    assert list((run / "checkpoints").glob("*.ckpt"))


def test_example_config_builds_the_callback_it_names():
    cli = example.main(["--config", str(CONFIG), "--trainer.logger=false"], run=False)
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, MT2STCallback)]
    assert callback.strategy == "switch"
    assert cli.model.primary_task == "digit"
    assert set(cli.model.auxiliary_tasks) == {"recon", "edges", "moments"}


# --------------------------------------------------------------------------- every argument, from YAML
def _product_check(value: Any) -> None:
    assert isinstance(value["recon"], Product)
    assert value["recon"].factors == (Diminish(eta=0.1), Switch(at=50))
    assert type(value["recon"].factors[1].at) is int


def _policy_check(value: Any) -> None:
    from mt2st_lightning.policies.base import Policy

    assert isinstance(value, Policy) and type(value).__name__ == "PlateauSwitch"


# name -> cases; each case: (init_args as a YAML user writes them, the argument's expected value in Python, or a
# check). The expected value is compared with its type: ``switch_at: 5`` must stay the int 5. Every argument of
# the callback's own needs a case here; the strategies' parameters are covered by each strategy's Hydra preset
# (below, derived from the registry), and the cases here pin the typed forms of the built-in ones.
CASES: dict[str, list[tuple[str, Any]]] = {
    "strategy": [("strategy: diminish", "diminish")],
    "schedules": [
        (
            """
            schedules:
              recon: {class_path: mt2st_lightning.Diminish, init_args: {eta: 0.1}}
              edges: {class_path: mt2st_lightning.Switch, init_args: {at: 5}}
              moments: {class_path: mt2st_lightning.Constant, init_args: {value: 0.5}}
            """,
            {"recon": Diminish(eta=0.1), "edges": Switch(at=5), "moments": Constant(0.5)},
        ),
        (
            """
            schedules:
              recon:
                class_path: mt2st_lightning.Product
                init_args:
                  factors:
                    - {class_path: mt2st_lightning.Diminish, init_args: {eta: 0.1}}
                    - {class_path: mt2st_lightning.Switch, init_args: {at: 50}}
              edges: {class_path: mt2st_lightning.Switch, init_args: {at: 0.5}}
              moments: {class_path: mt2st_lightning.Constant, init_args: {value: 0.0}}
            """,
            lambda v: (_product_check(v), v["edges"] == Switch(at=0.5)),
        ),
    ],
    "gamma0": [("{strategy: mtl, gamma0: 0.5}", 0.5), ("{strategy: mtl, gamma0: {recon: 2, edges: 0.5}}", {"recon": 2, "edges": 0.5})],
    "eta": [("{strategy: diminish, eta: 0.02}", 0.02)],
    "nu": [("{strategy: diminish, nu: 2}", 2), ("{strategy: diminish, nu: 0.5}", 0.5)],
    "switch_at": [
        ("{strategy: switch, switch_at: 5}", 5),
        ("{strategy: switch, switch_at: 0.3}", 0.3),
        ("{strategy: switch, switch_at: {recon: 5, edges: 0.5, moments: 7}}", {"recon": 5, "edges": 0.5, "moments": 7}),
    ],
    "prune_below": [("{strategy: diminish, prune_below: 0.05}", 0.05)],
    "unit": [("{strategy: switch, switch_at: 2, unit: epoch}", "epoch")],
    "budget": [
        ("{strategy: gradnorm, budget: raw}", "raw"),
        ("{strategy: fisher, budget: 2.0}", 2.0),
        ("{strategy: noise, budget: 2}", 2),
    ],
    "adapt_every": [("{strategy: noise, adapt_every: 5}", 5)],
    "adapt_decay": [("{strategy: noise, adapt_decay: 0.5}", 0.5)],
    "measure_on": [("{strategy: gradnorm, measure_on: parameters}", "parameters")],
    "on_nonfinite": [("{strategy: switch, switch_at: 5, on_nonfinite: skip}", "skip")],
    "save_single_task": [("{strategy: switch, switch_at: 5, save_single_task: single.ckpt}", "single.ckpt")],
    "log_weights": [("{strategy: switch, switch_at: 5, log_weights: false}", False)],
    "release_heads": [("{strategy: switch, switch_at: 5, release_heads: true}", True)],
    # The data-driven switches.
    "monitor": [("{strategy: plateau, monitor: val/loss, mode: min}", "val/loss")],
    "mode": [("{strategy: plateau, monitor: val/loss, mode: min}", "min")],
    "patience": [("{strategy: plateau, monitor: val/loss, patience: 4}", 4)],
    "patience_steps": [
        ("{strategy: plateau, monitor: val/loss, patience_steps: 60}", 60),
        ("{strategy: plateau, monitor: val/loss, patience_steps: 0.15}", 0.15),
    ],
    "min_delta": [("{strategy: plateau, monitor: val/loss, min_delta: 0.01}", 0.01)],
    "min_delta_mode": [("{strategy: plateau, monitor: val/loss, min_delta: 0.05, min_delta_mode: rel}", "rel")],
    "min_step": [("{strategy: plateau, monitor: val/loss, min_step: 20}", 20)],
    "max_step": [("{strategy: plateau, monitor: val/loss, max_step: 150}", 150)],
    "threshold": [("{strategy: conflict, threshold: -0.1}", -0.1)],
    "window": [("{strategy: conflict, window: 3}", 3)],
    "policy": [
        (
            "policy: {class_path: mt2st_lightning.policies.plateau.PlateauSwitch, init_args: {monitor: val/loss, mode: min}}",
            _policy_check,
        )
    ],
}

ARGUMENTS = [name for name in inspect.signature(MT2STCallback).parameters]
STRATEGY_PARAMETERS = [p.name for p in strategy_parameters()]
PRESETS = {name: yaml.safe_load((ROOT / "conf" / "strategy" / f"{name}.yaml").read_text()) for name in STRATEGIES}


def test_every_constructor_argument_has_a_yaml_case():
    own = [name for name in ARGUMENTS if name not in STRATEGY_PARAMETERS]
    missing = [name for name in own if name not in CASES]
    assert not missing, (
        f"MT2STCallback has new argument(s) {missing}: add a YAML case for each to CASES in tests/test_cli.py, so "
        "that LightningCLI users are known to be able to set it"
    )


def test_the_signature_lists_every_registered_strategys_parameters():
    # jsonargparse reads MT2STCallback's signature: every strategy parameter is in it, typed, default None.
    signature = inspect.signature(MT2STCallback)
    for name, cls in REGISTRY.items():
        for param in parameters_of(cls):
            assert param in signature.parameters, f"{name}'s {param} is not in MT2STCallback's signature"
            assert signature.parameters[param].default is None
            assert signature.parameters[param].kind is inspect.Parameter.KEYWORD_ONLY
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())


# --------------------------------------------------------------------------- every strategy, from the registry
@pytest.mark.parametrize("name", STRATEGIES)
def test_each_strategy_preset_names_every_parameter_of_its_policy(name):
    assert PRESETS[name]["_target_"] == "mt2st_lightning.MT2STCallback" and PRESETS[name]["strategy"] == name
    missing = sorted(set(parameters_of(REGISTRY[name])) - set(PRESETS[name]))
    assert not missing, f"conf/strategy/{name}.yaml does not list {missing}: document each with its default"


@pytest.mark.parametrize("name", STRATEGIES)
def test_each_strategy_preset_as_flat_init_args(tmp_path, recorded_kwargs, name):
    # The Hydra preset's keys, as LightningCLI init_args: each value arrives with its type.
    init_args = {key: value for key, value in PRESETS[name].items() if key != "_target_"}
    cli = _cli(tmp_path, init_args)
    for key, value in init_args.items():
        _same(recorded_kwargs[0][key], value, key)
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, MT2STCallback)]
    assert type(callback.policy) is REGISTRY[name]


@pytest.mark.parametrize("name", STRATEGIES)
def test_each_strategy_as_a_policy_class_path(tmp_path, name):
    # The Lightning-native form: the policy class itself, its parameters as its init_args.
    cls = REGISTRY[name]
    init_args = {key: value for key, value in PRESETS[name].items() if key in parameters_of(cls)}
    cli = _cli(tmp_path, {"policy": {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": init_args}})
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, MT2STCallback)]
    assert type(callback.policy) is cls and callback.strategy == name
    assert callback.policy.state_dict().keys() == policy_for(name, **init_args).state_dict().keys()


def test_a_policy_class_path_refuses_a_parameter_it_does_not_take(tmp_path, capsys):
    args = {"policy": {"class_path": "mt2st_lightning.policies.SwitchPolicy", "init_args": {"switch_at": 5, "eta": 0.1}}}
    with pytest.raises(SystemExit):
        _cli(tmp_path, args)
    assert "'eta' is not accepted" in capsys.readouterr().err


def _same(value: Any, expected: Any, where: str) -> None:
    """Equal, and of the same type (an int stays an int), through mappings and dataclasses."""
    assert type(value) is type(expected) or (isinstance(value, Mapping) and isinstance(expected, Mapping)), (
        f"{where}: {value!r} ({type(value).__name__}) should be {expected!r} ({type(expected).__name__})"
    )
    if isinstance(expected, Mapping):
        assert set(value) == set(expected), where
        for key in expected:
            _same(value[key], expected[key], f"{where}.{key}")
    elif dataclasses.is_dataclass(expected):
        for field in dataclasses.fields(expected):
            _same(getattr(value, field.name), getattr(expected, field.name), f"{where}.{field.name}")
    else:
        assert value == expected, f"{where}: {value!r} != {expected!r}"


@pytest.fixture
def recorded_kwargs(monkeypatch) -> list[dict[str, Any]]:
    """The keyword arguments each MT2STCallback was built with (the constructor's signature is kept)."""
    calls: list[dict[str, Any]] = []
    original = MT2STCallback.__init__

    @functools.wraps(original)
    def init(self, *args, **kwargs):
        calls.append(inspect.signature(original).bind(self, *args, **kwargs).arguments)
        original(self, *args, **kwargs)

    monkeypatch.setattr(MT2STCallback, "__init__", init)
    return calls


@pytest.mark.parametrize(
    "name, init_args, expected",
    [(name, text, exp) for name in ARGUMENTS for text, exp in CASES.get(name, [])],
    ids=[f"{name}-{i}" for name in ARGUMENTS for i, _ in enumerate(CASES.get(name, []))],
)
def test_argument_from_yaml_reaches_the_callback(tmp_path, recorded_kwargs, name, init_args, expected):
    cli = _cli(tmp_path, yaml.safe_load(inspect.cleandoc(init_args)))
    assert len(recorded_kwargs) == 1
    assert name in recorded_kwargs[0], f"{name} was not passed to MT2STCallback"
    value = recorded_kwargs[0][name]
    if callable(expected) and not isinstance(expected, type):
        expected(value)
    else:
        _same(value, expected, name)
    assert [c for c in cli.trainer.callbacks if isinstance(c, MT2STCallback)]


# --------------------------------------------------------------------------- bad values: the library's message
BAD = [
    ("{strategy: swich, switch_at: 5}", r"unknown MT2ST strategy 'swich'"),
    ("{strategy: switch, switch_at: -5}", r"must be >= 0"),
    ("{strategy: switch, switch_at: 1.5}", r"a float is a fraction of the run and must lie in \(0, 1\)"),
    ("{strategy: switch, switch_at: 5, unit: epochs}", r"unit must be 'step' or 'epoch'"),
    ("{strategy: switch, switch_at: 5, on_nonfinite: ignore}", r"on_nonfinite must be"),
    ("{strategy: diminish, eta: -0.1}", r"eta must be a finite number >= 0"),
    ("{strategy: noise, adapt_decay: 1.5}", r"adapt_decay must .*\[0, 1\)"),
    ("{strategy: gradnorm, measure_on: weights}", r"measure_on must be"),
    ("{strategy: plateau, monitor: val/loss, mode: maximum}", r"mode must be 'min' or 'max'"),
    ("{strategy: plateau, monitor: val/loss, min_delta_mode: relative}", r"min_delta_mode must be 'abs'"),
    ("{strategy: switch, switch_at: 5, eta: 0.1}", r"strategy='switch' ignores eta"),
]


@pytest.mark.parametrize("init_args, message", BAD, ids=[b[0] for b in BAD])
def test_bad_value_from_yaml_gives_the_library_error(tmp_path, init_args, message):
    with pytest.raises(ValueError, match=message):
        _cli(tmp_path, yaml.safe_load(init_args))
