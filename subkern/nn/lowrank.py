"""Learned low rank with STR: soft-threshold the singular values of a factorised layer.

STR (Kusupati et al., ICML 2020, section 5 "STR for structured sparsity: low rank") applies its
soft threshold to the singular values of the FastGRNN matrices instead of to individual weights:

    W = U diag(soft(sigma)) V^T,    soft(sigma) = sign(sigma) * relu(|sigma| - sigmoid(s))

with ``U [out, r]``, ``V [in, r]``, ``sigma [r]`` and the scalar threshold parameter ``s`` all
trained. Entries of ``sigma`` whose magnitude falls under ``sigmoid(s)`` become exactly zero,
so the *effective rank* (the number of non-zero ``soft(sigma)``) is learned, just as STR learns
a per-layer sparsity; weight decay on ``s`` (shared with the other parameters, as in STR) pulls
the threshold up from a very negative ``s_init`` (full rank at the start). The gradients are
those of STR: ``d soft/d sigma = 1[|sigma| > g]`` and
``d soft/d s = -sign(sigma) g'(s) 1[|sigma| > g]`` with ``g = sigmoid``; autograd on the formula
gives exactly these (``relu'(0) = 0``, ``sign' = 0``). ``U`` and ``V`` are not kept orthogonal
(as in the paper's FastGRNN, which trains the two factors freely); ``from_dense`` starts them
orthonormal from an SVD.

* ``STRLowRankLinear``: the layer (``from_dense`` via SVD, ``effective_rank()``,
  ``weight_matrix()``, ``compress()``);
* ``FactorizedLinear``: the plain two-factor layer ``compress()`` returns (rank = the effective
  rank, ``in * r + r * out`` multiply-adds instead of ``in * out``);
* ``STRFastGRNNCell`` / ``STRFastGRNN``: FastGRNN (Kusupati et al., NeurIPS 2018) whose input
  matrix ``W`` and recurrent matrix ``U`` are low-rank STR layers:

      z_t  = sigmoid(W x_t + U h_{t-1} + b_z)
      h~_t = tanh(W x_t + U h_{t-1} + b_h)
      h_t  = (zeta (1 - z_t) + nu) * h~_t + z_t * h_{t-1},   zeta, nu = sigmoid(trained scalars)
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FactorizedLinear", "STRFastGRNN", "STRFastGRNNCell", "STRLowRankLinear",
           "soft_threshold_singular_values"]


def soft_threshold_singular_values(sigma: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``sign(sigma) * relu(|sigma| - sigmoid(s))`` (differentiable in ``sigma`` and ``s``)."""
    return torch.sign(sigma) * torch.relu(sigma.abs() - torch.sigmoid(s))


def _check_size(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _check_s_init(s_init: Any) -> float:
    if isinstance(s_init, bool) or not isinstance(s_init, (int, float)) or \
            not math.isfinite(float(s_init)):
        raise ValueError(f"s_init must be a finite real number, got {s_init!r}")
    return float(s_init)


class FactorizedLinear(nn.Module):
    """``y = (x A^T) B^T + b`` with ``A [rank, in]`` and ``B [out, rank]``: a rank-``rank``
    linear layer (``rank = 0`` gives ``y = b``, or zeros without bias)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        self.in_features = _check_size("in_features", in_features, 0)
        self.out_features = _check_size("out_features", out_features, 0)
        self.rank = _check_size("rank", rank, 0)
        factory = {"device": device, "dtype": dtype}
        self.first = nn.Parameter(torch.zeros(rank, in_features, **factory))
        self.second = nn.Parameter(torch.zeros(out_features, rank, **factory))
        self.bias = nn.Parameter(torch.zeros(out_features, **factory)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input's last dimension must be in_features={self.in_features}, "
                             f"got shape {tuple(x.shape)}")
        return F.linear(F.linear(x, self.first), self.second, self.bias)

    def weight_matrix(self) -> torch.Tensor:
        """The dense ``[out, in]`` matrix ``B A``."""
        return self.second @ self.first

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, bias={self.bias is not None}")


class STRLowRankLinear(nn.Module):
    """Linear layer ``y = x W^T + b`` with ``W = U diag(soft(sigma)) V^T`` (STR low rank).

    Args:
        in_features, out_features: the layer's sizes.
        rank: number of factors ``r`` (default ``min(in_features, out_features)``, full rank).
        bias: learn an additive bias.
        s_init: initial threshold parameter (default -10: ``sigmoid(-10) = 4.5e-5``, every
            singular value survives at the start).

    The initial factors are the SVD of a default-initialised ``nn.Linear`` weight, so the layer
    starts as an ordinary randomly initialised dense layer (truncated to ``rank``).
    """

    def __init__(self, in_features: int, out_features: int, rank: int | None = None,
                 bias: bool = True, s_init: float = -10.0, device: Any = None,
                 dtype: Any = None) -> None:
        super().__init__()
        self.in_features = _check_size("in_features", in_features)
        self.out_features = _check_size("out_features", out_features)
        full = min(in_features, out_features)
        rank = full if rank is None else _check_size("rank", rank)
        if rank > full:
            raise ValueError(f"rank must be <= min(in_features, out_features) = {full}, "
                             f"got {rank}")
        self.rank = rank
        factory = {"device": device, "dtype": dtype}
        self.U = nn.Parameter(torch.empty(out_features, rank, **factory))
        self.V = nn.Parameter(torch.empty(in_features, rank, **factory))
        self.sigma = nn.Parameter(torch.empty(rank, **factory))
        self.s = nn.Parameter(torch.tensor(_check_s_init(s_init), **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Factors from the SVD of a default ``nn.Linear`` init (``kaiming_uniform(a=sqrt(5))``);
        the bias as ``nn.Linear``'s."""
        dense = torch.empty(self.out_features, self.in_features, dtype=torch.float64)
        nn.init.kaiming_uniform_(dense, a=math.sqrt(5))
        self._set_from_matrix(dense)
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    @torch.no_grad()
    def _set_from_matrix(self, matrix: torch.Tensor) -> None:
        u, sv, vh = torch.linalg.svd(matrix.to(torch.float64), full_matrices=False)
        r = self.rank
        self.U.copy_(u[:, :r])
        self.sigma.copy_(sv[:r])
        self.V.copy_(vh[:r].T)

    def threshold(self) -> torch.Tensor:
        """``sigmoid(s)`` (detached)."""
        return torch.sigmoid(self.s.detach())

    def singular_values(self) -> torch.Tensor:
        """``soft(sigma)``, the thresholded singular values (with gradient)."""
        return soft_threshold_singular_values(self.sigma, self.s)

    @torch.no_grad()
    def effective_rank(self) -> int:
        """Number of non-zero thresholded singular values."""
        return int(torch.count_nonzero(self.singular_values()))

    def weight_matrix(self) -> torch.Tensor:
        """The dense ``[out, in]`` weight ``U diag(soft(sigma)) V^T`` (with gradient)."""
        return (self.U * self.singular_values()) @ self.V.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input's last dimension must be in_features={self.in_features}, "
                             f"got shape {tuple(x.shape)}")
        return F.linear(F.linear(x, self.V.T) * self.singular_values(), self.U, self.bias)

    @classmethod
    def from_dense(cls, module: nn.Linear, rank: int | None = None,
                   s_init: float = -10.0) -> STRLowRankLinear:
        """The layer whose factors are the (rank-``rank`` truncated) SVD of ``module.weight``;
        the bias is copied. The layer's weight is that SVD with every singular value shrunk by
        ``sigmoid(s_init)`` (4.5e-5 for the default -10): exact up to that, or exactly
        ``module.weight`` for ``rank = min(in, out)`` and a very negative ``s_init`` (-100)."""
        if not isinstance(module, nn.Linear):
            raise TypeError(f"from_dense expects an nn.Linear, got {type(module).__name__}")
        layer = cls(module.in_features, module.out_features, rank=rank,
                    bias=module.bias is not None, s_init=s_init,
                    device=module.weight.device, dtype=module.weight.dtype)
        layer._set_from_matrix(module.weight.detach())
        if module.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(module.bias)
        return layer

    @torch.no_grad()
    def compress(self) -> FactorizedLinear:
        """A plain ``FactorizedLinear`` of the effective rank computing the same function
        (``diag(soft(sigma))`` folded into the second factor; zero singular values dropped)."""
        values = self.singular_values().detach()
        keep = torch.nonzero(values, as_tuple=True)[0]
        out = FactorizedLinear(self.in_features, self.out_features, int(keep.numel()),
                               bias=self.bias is not None, device=self.U.device,
                               dtype=self.U.dtype)
        out.first.copy_(self.V[:, keep].T)
        out.second.copy_(self.U[:, keep] * values[keep])
        if self.bias is not None:
            out.bias.copy_(self.bias)
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, bias={self.bias is not None}")


class STRFastGRNNCell(nn.Module):
    """FastGRNN cell with low-rank STR matrices ``W`` (input) and ``U`` (recurrent).

    Args:
        input_size, hidden_size: sizes of ``x_t`` and ``h_t``.
        rank_w, rank_u: factors of ``W`` and ``U`` (default: full rank).
        s_init: initial threshold parameter of both matrices.
        zeta_init, nu_init: initial pre-sigmoid ``zeta`` and ``nu`` (FastGRNN's 1.0 and -4.0).

    ``W`` and ``U`` have no bias; the gate and update biases ``b_z``, ``b_h`` (zeros at start)
    are separate, as in FastGRNN. ``compress()`` returns a copy with ``FactorizedLinear``
    matrices of the effective ranks.
    """

    def __init__(self, input_size: int, hidden_size: int, rank_w: int | None = None,
                 rank_u: int | None = None, s_init: float = -10.0, zeta_init: float = 1.0,
                 nu_init: float = -4.0) -> None:
        super().__init__()
        self.input_size = _check_size("input_size", input_size)
        self.hidden_size = _check_size("hidden_size", hidden_size)
        self.W: nn.Module = STRLowRankLinear(input_size, hidden_size, rank_w, bias=False,
                                             s_init=s_init)
        self.U: nn.Module = STRLowRankLinear(hidden_size, hidden_size, rank_u, bias=False,
                                             s_init=s_init)
        self.bias_z = nn.Parameter(torch.zeros(hidden_size))
        self.bias_h = nn.Parameter(torch.zeros(hidden_size))
        self.zeta = nn.Parameter(torch.tensor(float(zeta_init)))
        self.nu = nn.Parameter(torch.tensor(float(nu_init)))

    def step(self, wx: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """One step from the precomputed input projection ``wx = W x_t``."""
        pre = wx + self.U(h)
        z = torch.sigmoid(pre + self.bias_z)
        candidate = torch.tanh(pre + self.bias_h)
        return (torch.sigmoid(self.zeta) * (1.0 - z) + torch.sigmoid(self.nu)) * candidate \
            + z * h

    def forward(self, x: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
        """``h_t`` from ``x_t [batch, input_size]`` and ``h_{t-1}`` (zeros when ``None``)."""
        if h is None:
            h = x.new_zeros(x.shape[0], self.hidden_size)
        return self.step(self.W(x), h)

    def ranks(self) -> dict[str, int]:
        """Effective rank of ``W`` and ``U`` (the factor count once compressed)."""
        return {name: (m.effective_rank() if isinstance(m, STRLowRankLinear) else m.rank)
                for name, m in (("W", self.W), ("U", self.U))}

    def compress(self) -> STRFastGRNNCell:
        """A copy whose ``W`` and ``U`` are ``FactorizedLinear`` of the effective ranks."""
        out = copy.deepcopy(self)
        for name in ("W", "U"):
            module = getattr(self, name)
            if isinstance(module, STRLowRankLinear):
                setattr(out, name, module.compress())
        return out


class STRFastGRNN(nn.Module):
    """Runs an ``STRFastGRNNCell`` over a sequence ``x [batch, time, input_size]``
    (``batch_first``); returns all hidden states ``[batch, time, hidden]`` and the last one."""

    def __init__(self, input_size: int, hidden_size: int, rank_w: int | None = None,
                 rank_u: int | None = None, s_init: float = -10.0) -> None:
        super().__init__()
        self.cell = STRFastGRNNCell(input_size, hidden_size, rank_w, rank_u, s_init)

    def forward(self, x: torch.Tensor,
                h: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() != 3 or x.shape[-1] != self.cell.input_size:
            raise ValueError(f"x must be [batch, time, {self.cell.input_size}], "
                             f"got shape {tuple(x.shape)}")
        if h is None:
            h = x.new_zeros(x.shape[0], self.cell.hidden_size)
        wx = self.cell.W(x)           # the input projection of every step at once
        states = []
        for t in range(x.shape[1]):
            h = self.cell.step(wx[:, t], h)
            states.append(h)
        outputs = torch.stack(states, 1) if states else x.new_zeros(x.shape[0], 0,
                                                                     self.cell.hidden_size)
        return outputs, h

    def compress(self) -> STRFastGRNN:
        """A copy with the cell compressed (``STRFastGRNNCell.compress``)."""
        out = copy.deepcopy(self)
        out.cell = self.cell.compress()
        return out
