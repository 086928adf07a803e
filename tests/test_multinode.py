"""Multi-node DDP, simulated on one machine: 2 nodes x 1 process on localhost (gloo) through a Switch.

Each process is started as a cluster scheduler starts one per node: its own NODE_RANK, LOCAL_RANK=0, the same
MASTER_ADDR/MASTER_PORT/WORLD_SIZE. Lightning's ``LightningEnvironment`` then launches nothing itself and the
two processes form one process group of world size 2 (global rank = node rank).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "multinode_switch.py"
SWITCH_AT = 5  # of 12 optimizer steps (3 epochs x 4 batches of 16 per node)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_env(node_rank: int, port: int) -> dict[str, str]:
    # Nothing from a real scheduler may leak in: Lightning would pick SLURM's or torchelastic's environment.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_", "PMI_", "OMPI_"))}
    env.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", NODE_RANK=str(node_rank), LOCAL_RANK="0",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])), OMP_NUM_THREADS="1",
    )
    env.pop("RANK", None)
    return env


@pytest.mark.slow
def test_two_nodes_switch_together_and_keep_dropped_heads_frozen(tmp_path):
    port = _free_port()
    nodes = [
        subprocess.Popen(
            [sys.executable, str(SCRIPT), str(tmp_path), str(SWITCH_AT)], env=_node_env(rank, port), cwd=ROOT,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for rank in (0, 1)
    ]
    outputs = []
    try:
        for node in nodes:
            outputs.append(node.communicate(timeout=300))
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    for rank, (node, (_, err)) in enumerate(zip(nodes, outputs)):
        assert node.returncode == 0, f"node {rank} failed:\n{err[-3000:]}"

    states = [torch.load(tmp_path / f"node{r}.pt", weights_only=False) for r in (0, 1)]
    for rank, state in enumerate(states):
        assert state["env"] == "LightningEnvironment" and state["backend"] == "gloo"
        assert (state["num_nodes"], state["world_size"], state["node_rank"], state["global_rank"]) == (2, 2, rank, rank)
        assert state["global_step"] == 12
        steps = sorted(state["active"])
        assert steps == list(range(12))
        # The same drop step on both nodes: every auxiliary head ran before SWITCH_AT and none from it on.
        assert all(len(state["active"][t]) == 3 for t in steps if t < SWITCH_AT)
        assert all(state["active"][t] == ("label",) for t in steps if t >= SWITCH_AT)
        dropped = [n for n in state["final"] if n.startswith(("heads.recon", "heads.parity"))]
        assert dropped and not any(state["requires_grad"][n] for n in dropped)
        # Frozen for good: bit-identical from the drop to the end of training, ...
        for name in dropped:
            assert torch.equal(state["final"][name], state["at_drop"][name]), f"node {rank}: {name} moved after the drop"
        # ... while the encoder and the primary head went on training.
        assert not torch.equal(state["final"]["heads.label.0.weight"], state["at_drop"]["heads.label.0.weight"])
    assert states[0]["active"] == states[1]["active"]
    for name, p in states[0]["final"].items():
        assert torch.equal(p, states[1]["final"][name]), f"{name} differs between the nodes"
        assert torch.equal(states[0]["at_drop"][name], states[1]["at_drop"][name]), f"{name} differs at the drop"
