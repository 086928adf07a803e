"""A bidirectional LSTM whose FLOPs ``torch.utils.flop_counter`` sees.

``nn.LSTM`` runs as one fused kernel (``mkldnn_rnn_layer`` on CPU, cuDNN on GPU) that the FLOP counter has no
formula for: it would count an LSTM as free, and make every comparison of training FLOPs wrong. This LSTM is
built from matrix products (one for the inputs of all time steps, one per step for the recurrence), which the
counter counts, forward and backward. Same equations as ``nn.LSTM`` (gates i, f, g, o).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["CountedBiLSTM"]


class CountedBiLSTM(nn.Module):
    """One bidirectional LSTM layer over ``(B, T, input_size)`` with a ``(B, T)`` mask of real tokens; returns
    the last real state of each direction, concatenated: ``(B, 2 * hidden_size)`` (``out_features``)."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.input = nn.ModuleList([nn.Linear(input_size, 4 * hidden_size) for _ in range(2)])
        self.recurrent = nn.ModuleList([nn.Linear(hidden_size, 4 * hidden_size, bias=False) for _ in range(2)])
        self.out_features = 2 * hidden_size

    def _direction(self, x: Tensor, mask: Tensor, d: int, reverse: bool) -> Tensor:
        b, t, _ = x.shape
        gates_in = self.input[d](x)  # all time steps in one product
        h = x.new_zeros(b, self.hidden_size)
        c = x.new_zeros(b, self.hidden_size)
        steps = range(t - 1, -1, -1) if reverse else range(t)
        for s in steps:
            i, f, g, o = (gates_in[:, s] + self.recurrent[d](h)).chunk(4, dim=1)
            c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h_new = torch.sigmoid(o) * torch.tanh(c_new)
            keep = mask[:, s : s + 1]  # padding leaves the state as it was: the final state is the last real one
            c = torch.where(keep, c_new, c)
            h = torch.where(keep, h_new, h)
        return h

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return torch.cat([self._direction(x, mask, 0, False), self._direction(x, mask, 1, True)], dim=1)
