"""Inference layers for unstructured-sparse weights: :class:`SparseLinear`, :class:`SparseConv2d`.

A trained sparse layer (STR, Kusupati et al. 2020, ``W_eff = sign(W) relu(|W| - sigmoid(s))``;
magnitude pruning; an edge-popup subnetwork) is frozen at deployment, so its weight is stored once
in a compressed format and every forward multiplies it with a dense activation. The formats are
those of :mod:`subkern.ops.sparse_linear` (held as buffers, so ``state_dict`` round trips):

* ``"csr"``: ``row_ptr`` int64 ``[out + 1]``, ``col_idx`` int16 (unsigned 16-bit columns, when
  the fan-in is <= 65536) or int32 ``[nnz]``, ``values [nnz]``;
* ``"bitmap"`` (Linear only): ``bitmap`` int64 ``[out, ceil(in / 64)]``, ``row_ptr``, ``values``;
* ``"dense"``: ``weight`` (past the density where the sparse kernels stop winning).

Values are float32, bfloat16 or float16 (``value_dtype``); a ``bias`` buffer is float32. The
output has the input's dtype, accumulated in float32 by the sparse kernels (the dense format
computes in the value dtype, e.g. bf16 with the CPU's matrix unit).

Forward (the registered ops ``torch.ops.subkern.*``, so ``torch.export`` and ``torch.compile``
see through it; plain CPU inference calls the same C++ kernels without the dispatcher,
:mod:`subkern.ops._direct`):

* :class:`SparseLinear`: ``y = x W^T + b`` by ``csr_linear`` / ``bitmap_linear`` on ``x`` viewed
  ``[B, in]`` (any leading dims, ``B`` may be 0);
* :class:`SparseConv2d`: a convolution is ``Y = W_mat @ im2col(x)`` with ``W_mat [out, C kh kw]``
  (``csr_matmul``, weight stationary). A 1x1 stride-1 convolution of one image needs no im2col:
  ``X`` is the activation viewed ``[C, H W]``; other convolutions build the explicit im2col
  matrix (``kh kw`` times the input's memory) with one strided copy of the padded input (see
  ``SparseConv2d._columns``; faster than ``F.unfold``). A batch of ``N`` images is one product
  over ``X [K, N L]``. A stride-1 convolution of one float32 image needs no im2col either: the
  CSR columns are remapped to offsets into the flattened zero-padded image, which ``csr_matmul``
  reads as an overlapping ``X`` view (``SparseConv2d._forward_implicit``). Bias and an optional
  fused ReLU (``relu=True``, :func:`fuse_relu_`) run in ``csr_matmul``'s epilogue. Grouped
  convolutions store the block-diagonal ``[out, C kh kw]`` matrix (the zeros outside the groups
  are not stored, so the cost is the same), so every ``groups`` is supported.

:func:`SparseLinear.from_dense` / :func:`SparseConv2d.from_dense` build a layer from a dense
module or weight, choosing the format (``format="auto"``) with
:func:`subkern.ops.sparse_linear.choose_format` (Linear, by density, shape and batch) or
:func:`choose_conv_format` (a cost model of ``csr_matmul`` + im2col against mkldnn);
``to_dense()`` gives the equivalent ``nn.Linear`` / ``nn.Conv2d``. Bad arguments raise
``ValueError`` / ``TypeError`` naming them; ``check_structure()`` validates loaded buffers.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..ops._direct import direct_ok, run_op
from ..ops.library import has_kernel
from ..ops.sparse_linear import (
    MAX_INT16_COLUMNS,
    choose_format,
    columns_of,
    pack_bitmap,
    pack_csr,
    unpack_bitmap,
    unpack_csr,
)
from ..ops.sparse_permuted import PERMUTED_MAX_BATCH, permuted_layout, permuted_linear
from ..ops.ternary import words_for
from ._tensor_cache import cached_on

__all__ = ["SparseLinear", "SparseConv2d", "FORMATS", "CONV_FORMATS", "effective_weight",
           "fuse_relu_",
           "choose_conv_format", "CONV_DENSE_PS_PER_MAC", "CONV_CSR_PS_PER_NNZ_MAC",
           "CONV_IM2COL_PS_PER_ELEMENT"]

#: Storage formats of :class:`SparseLinear`.
FORMATS = ("csr", "bitmap", "dense")
#: Storage formats of :class:`SparseConv2d` (there is no bitmap SpMM op).
CONV_FORMATS = ("csr", "dense")
#: Cost model of :func:`choose_conv_format` (picoseconds, CPU, float32): dense ``F.conv2d``
#: (mkldnn) per multiply-add of the dense weight, ``csr_matmul`` per multiply-add of a nonzero,
#: and the explicit im2col copy per element of the ``[C kh kw, N L]`` matrix and unit of the
#: horizontal stride (a stride-2 gather costs about twice a stride-1 copy). Measured per layer on
#: the ResNet-50 layers at 224x224, batch 1, 1 thread (2-core Xeon, AVX-512; loaded machine,
#: rough): dense 11.2 ps/MAC, csr_matmul 57 ps per nonzero MAC (30-60 GFLOP/s), im2col 350-600
#: ps per element at stride 1, 700-850 at stride 2 (``subkern bench --ops sparse_e2e`` measures
#: the end-to-end effect).
CONV_DENSE_PS_PER_MAC = 11.2
CONV_CSR_PS_PER_NNZ_MAC = 57.0
CONV_IM2COL_PS_PER_ELEMENT = 400.0

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_INDEX = {"int16": torch.int16, "int32": torch.int32}
_MISSING: Any = object()


def _dtype_name(dtype: torch.dtype | str | None, default: str = "float32") -> str:
    if dtype is None:
        return default
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
    else:
        name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise TypeError(f"value_dtype must be float32, bfloat16 or float16, got {dtype!r}")
    return name


def _index_name(index_dtype: torch.dtype | str | None, fan_in: int) -> str:
    if index_dtype is None:
        return "int16" if fan_in <= MAX_INT16_COLUMNS else "int32"
    name = (index_dtype if isinstance(index_dtype, str) else str(index_dtype)).removeprefix(
        "torch.")
    if name not in _INDEX:
        raise TypeError(f"index_dtype must be int16 or int32, got {index_dtype!r}")
    if name == "int16" and fan_in > MAX_INT16_COLUMNS:
        raise ValueError(f"int16 column indices need a fan-in <= {MAX_INT16_COLUMNS}, got "
                         f"{fan_in}; use index_dtype=torch.int32")
    return name


def _check_format(fmt: str, allowed: tuple[str, ...], what: str) -> str:
    if fmt not in allowed:
        raise ValueError(f"{what} format must be one of {allowed}, got {fmt!r}")
    return fmt


def _int(name: str, v: Any, minimum: int = 0) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {v!r}")
    return v


def effective_weight(module: nn.Module) -> torch.Tensor:
    """The weight a trained layer multiplies with: ``effective_weight()`` (STR), else
    ``weight_orig * weight_mask`` (``torch.nn.utils.prune``), else ``weight``."""
    fn = getattr(module, "effective_weight", None)
    if callable(fn):
        w = fn()
    elif hasattr(module, "weight_orig") and hasattr(module, "weight_mask"):
        w = module.weight_orig * module.weight_mask
    else:
        w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{type(module).__name__} has no weight tensor")
    return w.detach()


def choose_conv_format(out_channels: int, fan_in: int, nnz: int, im2col: bool = True,
                       stride: int = 1) -> str:
    """``"csr"`` when ``csr_matmul`` (plus the im2col copy) is expected to beat dense
    ``F.conv2d`` on the CPU, else ``"dense"``.

    Per multiply-add of the dense weight ``[out, fan_in]`` with density ``d = nnz / (out fan_in)``:
    ``csr = d * CONV_CSR_PS_PER_NNZ_MAC + (CONV_IM2COL_PS_PER_ELEMENT * stride / out if im2col
    else 0)`` against ``dense = CONV_DENSE_PS_PER_MAC`` (the im2col copy of ``X`` is shared by
    the ``out`` rows; a 1x1 stride-1 convolution without padding has none; ``stride``: the
    horizontal stride). Break-evens: about 20 % density for 1x1 stride-1 convolutions, 8 % for a
    3x3 stride-1 convolution with 64 output channels, 18 % with 512. Empty layers are ``"csr"``.
    """
    for name, v in (("out_channels", out_channels), ("fan_in", fan_in), ("nnz", nnz)):
        _int(name, v)
    _int("stride", stride, 1)
    total = out_channels * fan_in
    if total == 0 or nnz == 0:
        return "csr"
    if nnz > total:
        raise ValueError(f"nnz ({nnz}) exceeds out_channels * fan_in ({total})")
    csr = nnz / total * CONV_CSR_PS_PER_NNZ_MAC
    if im2col:
        csr += CONV_IM2COL_PS_PER_ELEMENT * stride / out_channels
    return "csr" if csr <= CONV_DENSE_PS_PER_MAC else "dense"


class _SparseBase(nn.Module):
    """Buffers and helpers shared by the two layers (rows = output channels)."""

    format: str
    fan_in: int
    rows: int

    def _register(self, fmt: str, nnz: int, value_dtype: str, index_dtype: str, bias: bool
                  ) -> None:
        self.format = fmt
        self.nnz = nnz
        self.value_dtype = value_dtype
        self.index_dtype = index_dtype
        vdt = _DTYPES[value_dtype]
        if fmt == "dense":
            self.register_buffer("weight", torch.zeros(self._dense_shape(), dtype=vdt))
        else:
            self.register_buffer("row_ptr", torch.zeros(self.rows + 1, dtype=torch.int64))
            if fmt == "csr":
                self.register_buffer("col_idx", torch.zeros(nnz, dtype=_INDEX[index_dtype]))
            else:
                self.register_buffer("bitmap", torch.zeros(self.rows, words_for(self.fan_in),
                                                           dtype=torch.int64))
            self.register_buffer("values", torch.zeros(nnz, dtype=vdt))
        if bias:
            self.register_buffer("bias", torch.zeros(self.rows, dtype=torch.float32))
        else:
            self.bias = None

    def _dense_shape(self) -> tuple[int, ...]:
        return (self.rows, self.fan_in)

    def _fill(self, matrix: torch.Tensor, dense_weight: torch.Tensor,
              bias: torch.Tensor | None) -> None:
        """Pack ``matrix [rows, fan_in]`` (``dense_weight``: the same in the dense shape)."""
        vdt = _DTYPES[self.value_dtype]
        with torch.no_grad():
            if self.format == "dense":
                self.weight.copy_(dense_weight.to(vdt))
            elif self.format == "csr":
                packed = pack_csr(matrix, _INDEX[self.index_dtype], vdt)
                for name, t in packed.items():
                    getattr(self, name).copy_(t)
            else:
                for name, t in pack_bitmap(matrix, vdt).items():
                    getattr(self, name).copy_(t)
            if bias is not None:
                self.bias.copy_(bias.detach().to(torch.float32))

    def matrix(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight as a dense ``[rows, fan_in]`` matrix (conv: block-diagonal for groups)."""
        if self.format == "dense":
            return self._dense_to_matrix(self.weight.to(dtype))
        if self.format == "csr":
            return unpack_csr({"row_ptr": self.row_ptr, "col_idx": self.col_idx,
                               "values": self.values}, (self.rows, self.fan_in), dtype)
        return unpack_bitmap({"bitmap": self.bitmap, "row_ptr": self.row_ptr,
                              "values": self.values}, (self.rows, self.fan_in), dtype)

    def _dense_to_matrix(self, w: torch.Tensor) -> torch.Tensor:
        return w.reshape(self.rows, -1)

    def density(self) -> float:
        """Fraction of nonzero weights (stored zeros of the dense format count as zeros)."""
        total = self.rows * self._true_fan_in()
        if total == 0:
            return 0.0
        nnz = int((self.weight != 0).sum()) if self.format == "dense" else self.nnz
        return nnz / total

    def _true_fan_in(self) -> int:
        return self.fan_in

    def check_structure(self) -> None:
        """Raise ``ValueError`` if the packed buffers are inconsistent (e.g. a hand-edited file):
        ``row_ptr`` must start at 0, never decrease and end at ``nnz``; columns must be in range;
        a bitmap row's popcount must equal its ``row_ptr`` span."""
        if self.format == "dense":
            return
        rp = self.row_ptr
        if int(rp[0]) != 0 or int(rp[-1]) != self.values.shape[0] or bool((rp[1:] < rp[:-1]
                                                                            ).any()):
            raise ValueError(f"{type(self).__name__}: row_ptr must start at 0, be "
                             f"non-decreasing and end at nnz = {self.values.shape[0]}")
        if self.format == "csr":
            cols = columns_of(self.col_idx)
            if cols.numel() and (int(cols.min()) < 0 or int(cols.max()) >= self.fan_in):
                raise ValueError(f"{type(self).__name__}: column index out of range "
                                 f"[0, {self.fan_in})")
        else:
            bits = self.bitmap.reshape(-1).view(torch.uint8)
            counts = torch.bitwise_and(bits.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8),
                                       1).reshape(self.rows, -1).sum(1)
            if not torch.equal(counts, rp[1:] - rp[:-1]):
                raise ValueError(f"{type(self).__name__}: bitmap popcounts do not match row_ptr")

    def _common_config(self) -> dict[str, Any]:
        return {"format": self.format, "nnz": self.nnz, "value_dtype": self.value_dtype,
                "index_dtype": self.index_dtype, "bias": self.bias is not None}


class SparseLinear(_SparseBase):
    """``y = x W^T + b`` with a frozen sparse ``W [out, in]`` (module docstring).

    Construct with :meth:`from_dense`; the constructor makes empty buffers of the right shapes
    (``nnz`` nonzeros) for :meth:`load_state_dict` (deployment artifacts).
    """

    def __init__(self, in_features: int, out_features: int, format: str = "csr", nnz: int = 0,
                 bias: bool = True, value_dtype: torch.dtype | str = "float32",
                 index_dtype: torch.dtype | str | None = None) -> None:
        super().__init__()
        self.in_features = _int("in_features", in_features)
        self.out_features = _int("out_features", out_features)
        self.rows, self.fan_in = self.out_features, self.in_features
        fmt = _check_format(format, FORMATS, "SparseLinear")
        nnz = _int("nnz", nnz)
        if nnz > self.rows * self.fan_in:
            raise ValueError(f"nnz ({nnz}) exceeds out_features * in_features")
        self._register(fmt, nnz, _dtype_name(value_dtype), _index_name(index_dtype, self.fan_in),
                       bias)

    @classmethod
    def from_dense(cls, module_or_weight: nn.Module | torch.Tensor, format: str = "auto",
                   value_dtype: torch.dtype | str | None = None, bias: Any = _MISSING, *,
                   batch_hint: int = 1, index_dtype: torch.dtype | str | None = None
                   ) -> SparseLinear:
        """Pack a dense ``nn.Linear`` (or STR / pruned Linear: :func:`effective_weight`) or a
        weight ``[out, in]``. Exact zeros are dropped. ``format="auto"``:
        :func:`~subkern.ops.sparse_linear.choose_format` for ``batch_hint`` rows per call.
        ``bias``: default the module's (None for a bare weight); ``value_dtype`` default float32.
        """
        if isinstance(module_or_weight, torch.Tensor):
            weight = module_or_weight.detach()
            module_bias = None
        elif isinstance(module_or_weight, nn.Module):
            weight = effective_weight(module_or_weight)
            module_bias = getattr(module_or_weight, "bias", None)
        else:
            raise TypeError("module_or_weight must be an nn.Module or a tensor, got "
                            f"{type(module_or_weight).__name__}")
        if weight.dim() != 2 or not weight.dtype.is_floating_point:
            raise ValueError(f"a Linear weight must be a 2-D float tensor [out, in], got "
                             f"{tuple(weight.shape)} {weight.dtype}")
        b = module_bias if bias is _MISSING else bias
        if b is not None and (not isinstance(b, torch.Tensor) or b.shape != (weight.shape[0],)):
            raise ValueError(f"bias must be None or a tensor of shape ({weight.shape[0]},)")
        weight = weight.cpu()
        vname = _dtype_name(value_dtype)
        nnz = int((weight != 0).sum())
        out, inp = weight.shape
        if format == "auto":
            format = choose_format(out, inp, nnz, batch_hint, _DTYPES[vname])
        layer = cls(inp, out, format, nnz if format != "dense" else 0, b is not None, vname,
                    index_dtype)
        layer._fill(weight, weight, None if b is None else b.cpu())
        return layer

    def to_dense(self) -> nn.Linear:
        """The equivalent float32 ``nn.Linear``."""
        dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                          device=self._device())
        with torch.no_grad():
            dense.weight.copy_(self.matrix())
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        return dense

    def _device(self) -> torch.device:
        return self.weight.device if self.format == "dense" else self.values.device

    def deploy_config(self) -> dict[str, Any]:
        """Constructor keyword arguments (JSON-able) for :mod:`subkern.deploy.tree`."""
        return {"in_features": self.in_features, "out_features": self.out_features,
                **self._common_config()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must have shape [..., {self.in_features}], got "
                             f"{tuple(x.shape)}")
        if self.format == "dense":
            w = self.weight
            b = None if self.bias is None else self.bias.to(w.dtype)
            return F.linear(x.to(w.dtype), w, b).to(x.dtype)
        flat = x.dim() == 2
        x2 = x if flat else x.reshape(math.prod(x.shape[:-1]), self.in_features)
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        buffers = self._buffers  # (nn.Module.__getattr__ costs about 0.5 us per buffer)
        values, bias = buffers["values"], buffers.get("bias")
        if self.format == "csr":
            y = None
            ok = x2.shape[0] <= PERMUTED_MAX_BATCH and direct_ok(x2, values, bias)
            if ok:
                layout = self._permuted_layout()
                if layout is not None:
                    y = permuted_linear(x2, layout, self.in_features, self.out_features, bias)
            if y is None:
                y = run_op("csr_linear", x2, (values, bias), x2, buffers["row_ptr"],
                           buffers["col_idx"], values, self.in_features, bias, known_ok=ok)
        else:
            y = run_op("bitmap_linear", x2, (values, bias), x2, buffers["bitmap"],
                       buffers["row_ptr"], values, self.in_features, bias)
        return y if flat else y.reshape(*x.shape[:-1], self.out_features)

    def _permuted_layout(self) -> tuple[tuple[torch.Tensor, ...], int] | None:
        """The permuted-chunk layout of the CSR buffers (:mod:`subkern.ops.sparse_permuted`), or
        None where the CSR kernel stays faster; built on first use and cached while
        ``row_ptr``, ``col_idx`` and ``values`` stay the same tensors with the same versions."""
        buffers = self._buffers  # (nn.Module.__getattr__ costs about 0.5 us per buffer)
        rp, ci, va = buffers["row_ptr"], buffers["col_idx"], buffers["values"]
        return cached_on(self, "_permuted_cache", (rp, ci, va), lambda: (
            permuted_layout(rp, ci, va, self.in_features) if va.device.type == "cpu" else None))

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_permuted_cache", None)   # a cache: not pickled / deep-copied
        return state

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"format={self.format!r}, nnz={self.nnz}, value_dtype={self.value_dtype}, "
                f"bias={self.bias is not None}")


def _pair(name: str, v: Any) -> tuple[int, int]:
    t = (v, v) if isinstance(v, int) else tuple(v)
    if len(t) != 2 or not all(isinstance(i, int) and not isinstance(i, bool) for i in t):
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    return (int(t[0]), int(t[1]))


class SparseConv2d(_SparseBase):
    """A frozen sparse ``Conv2d`` (zero padding), computed as ``csr_matmul(W, im2col(x))``.

    The CSR matrix is ``[out_channels, in_channels * kh * kw]`` with columns in ``F.unfold``'s
    order ``(c, i, j)``; for ``groups > 1`` output channel ``o`` of group ``g`` has nonzeros only in
    the columns of input channels ``g * C / groups ...``, i.e. the block-diagonal expansion of the
    grouped weight ``[out, C / groups, kh, kw]``. The ``"dense"`` format keeps the grouped weight
    and runs ``F.conv2d``. ``relu=True`` computes ``relu(conv(x) + b)`` (a folded BatchNorm's
    shift is the bias): in the CSR format bias and ReLU are applied by ``csr_matmul``'s fused
    epilogue, so the output is written once.
    """

    def __init__(self, in_channels: int, out_channels: int,
                 kernel_size: int | tuple[int, int], stride: int | tuple[int, int] = 1,
                 padding: int | tuple[int, int] = 0, dilation: int | tuple[int, int] = 1,
                 groups: int = 1, bias: bool = True, format: str = "csr", nnz: int = 0,
                 value_dtype: torch.dtype | str = "float32",
                 index_dtype: torch.dtype | str | None = None, relu: bool = False) -> None:
        super().__init__()
        if not isinstance(relu, bool):
            raise TypeError(f"relu must be a bool, got {type(relu).__name__}")
        #: Apply a ReLU to the output (a following ``nn.ReLU`` fused into the layer; the CSR
        #: format fuses it, with the bias, into ``csr_matmul``'s store).
        self.relu = relu
        self.in_channels = _int("in_channels", in_channels, 1)
        self.out_channels = _int("out_channels", out_channels, 1)
        self.groups = _int("groups", groups, 1)
        if self.in_channels % self.groups or self.out_channels % self.groups:
            raise ValueError(f"in_channels ({in_channels}) and out_channels ({out_channels}) "
                             f"must be divisible by groups ({groups})")
        self.kernel_size = _pair("kernel_size", kernel_size)
        self.stride = _pair("stride", stride)
        self.padding = _pair("padding", padding)
        self.dilation = _pair("dilation", dilation)
        if min(self.kernel_size) < 1 or min(self.stride) < 1 or min(self.dilation) < 1 or min(
                self.padding) < 0:
            raise ValueError("kernel_size, stride and dilation must be >= 1, padding >= 0")
        kh, kw = self.kernel_size
        self.rows = self.out_channels
        self.fan_in = self.in_channels * kh * kw            # columns of the CSR matrix
        fmt = _check_format(format, CONV_FORMATS, "SparseConv2d")
        nnz = _int("nnz", nnz)
        if nnz > self.rows * self._true_fan_in():
            raise ValueError(f"nnz ({nnz}) exceeds the weight's size")
        self._register(fmt, nnz, _dtype_name(value_dtype), _index_name(index_dtype, self.fan_in),
                       bias)

    def _true_fan_in(self) -> int:
        return self.fan_in // self.groups

    def _dense_shape(self) -> tuple[int, ...]:
        return (self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    def _expand(self, w: torch.Tensor) -> torch.Tensor:
        """Grouped weight ``[out, C/g, kh, kw]`` -> block-diagonal matrix ``[out, C kh kw]``."""
        out = self.out_channels
        if self.groups == 1:
            return w.reshape(out, -1)
        g = self.groups
        cg, og = self.in_channels // g, out // g
        kk = self.kernel_size[0] * self.kernel_size[1]
        full = w.new_zeros(g, og, g, cg * kk)
        blocks = w.reshape(g, og, cg * kk)
        idx = torch.arange(g)
        full[idx, :, idx] = blocks
        return full.reshape(out, g * cg * kk)

    def _dense_to_matrix(self, w: torch.Tensor) -> torch.Tensor:
        return self._expand(w)

    def grouped_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight in ``nn.Conv2d``'s shape ``[out, C / groups, kh, kw]``."""
        if self.format == "dense":
            return self.weight.to(dtype)
        full = self.matrix(dtype)
        if self.groups == 1:
            return full.reshape(self._dense_shape())
        g = self.groups
        og, cg = self.out_channels // g, self.in_channels // g
        kk = self.kernel_size[0] * self.kernel_size[1]
        blocks = full.reshape(g, og, g, cg * kk)
        idx = torch.arange(g)
        return blocks[idx, :, idx].reshape(self._dense_shape())

    @classmethod
    def from_dense(cls, module_or_weight: nn.Module | torch.Tensor, format: str = "auto",
                   value_dtype: torch.dtype | str | None = None, bias: Any = _MISSING, *,
                   stride: int | tuple[int, int] | None = None,
                   padding: int | tuple[int, int] | None = None,
                   dilation: int | tuple[int, int] | None = None, groups: int | None = None,
                   index_dtype: torch.dtype | str | None = None, relu: bool = False
                   ) -> SparseConv2d:
        """Pack a dense ``nn.Conv2d`` (or STR / pruned conv: :func:`effective_weight`; its
        stride, padding, dilation and groups are used) or a weight ``[out, C/g, kh, kw]`` (with
        the keyword arguments; defaults 1, 0, 1, 1). ``format="auto"``:
        :func:`choose_conv_format` (a 1x1 stride-1 unpadded convolution needs no im2col).
        ``relu=True``: the layer also applies the ReLU that follows the convolution."""
        if isinstance(module_or_weight, torch.Tensor):
            weight = module_or_weight.detach()
            module_bias = None
            geometry: dict[str, Any] = {"stride": 1, "padding": 0, "dilation": 1, "groups": 1}
        elif isinstance(module_or_weight, nn.Module):
            m = module_or_weight
            mode = getattr(m, "padding_mode", "zeros")
            if mode != "zeros":
                raise ValueError(f"SparseConv2d supports padding_mode='zeros' only, got {mode!r}")
            if isinstance(getattr(m, "padding", 0), str):
                raise ValueError(f"SparseConv2d needs numeric padding, got {m.padding!r}")
            weight = effective_weight(m)
            module_bias = getattr(m, "bias", None)
            geometry = {k: getattr(m, k, d) for k, d in (("stride", 1), ("padding", 0),
                                                         ("dilation", 1), ("groups", 1))}
        else:
            raise TypeError("module_or_weight must be an nn.Module or a tensor, got "
                            f"{type(module_or_weight).__name__}")
        for key, value in (("stride", stride), ("padding", padding), ("dilation", dilation),
                           ("groups", groups)):
            if value is not None:
                geometry[key] = value
        if weight.dim() != 4 or not weight.dtype.is_floating_point:
            raise ValueError(f"a Conv2d weight must be a 4-D float tensor [out, in/groups, kh, "
                             f"kw], got {tuple(weight.shape)} {weight.dtype}")
        b = module_bias if bias is _MISSING else bias
        if b is not None and (not isinstance(b, torch.Tensor) or b.shape != (weight.shape[0],)):
            raise ValueError(f"bias must be None or a tensor of shape ({weight.shape[0]},)")
        weight = weight.cpu()
        out, cg, kh, kw = weight.shape
        groups_ = int(geometry["groups"])
        nnz = int((weight != 0).sum())
        if format == "auto":
            st = _pair("stride", geometry["stride"])
            # stride 1: no im2col copy (a view, or the implicit path of one image)
            no_copy = st == (1, 1)
            format = choose_conv_format(out, cg * kh * kw, nnz, im2col=not no_copy,
                                        stride=st[1])
        vname = _dtype_name(value_dtype)
        layer = cls(cg * groups_, out, (kh, kw), geometry["stride"], geometry["padding"],
                    geometry["dilation"], groups_, b is not None, format,
                    nnz if format != "dense" else 0, vname, index_dtype, relu)
        layer._fill(layer._expand(weight) if format == "csr" else weight, weight,
                    None if b is None else b.cpu())
        return layer

    def to_dense(self) -> nn.Conv2d:
        """The equivalent float32 ``nn.Conv2d`` (with ``relu=True`` the layer equals this
        convolution followed by ``nn.ReLU``)."""
        dense = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                          self.padding, self.dilation, self.groups, bias=self.bias is not None)
        with torch.no_grad():
            dense.weight.copy_(self.grouped_weight())
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        return dense.to(self.bias.device if self.bias is not None else
                        (self.weight if self.format == "dense" else self.values).device)

    def deploy_config(self) -> dict[str, Any]:
        """Constructor keyword arguments (JSON-able) for :mod:`subkern.deploy.tree`."""
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride),
                "padding": list(self.padding), "dilation": list(self.dilation),
                "groups": self.groups, **self._common_config(),
                **({"relu": True} if self.relu else {})}

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (self.kernel_size, self.stride, self.padding,
                                                  self.dilation)
        return ((h + 2 * ph - dh * (kh - 1) - 1) // sh + 1,
                (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1)

    def _columns(self, x: torch.Tensor, ho: int, wo: int) -> torch.Tensor:
        """im2col: ``X [C kh kw, N ho wo]`` with ``X[(c, i, j), (n, y, z)] =
        x_padded[n, c, y sh + i dh, z sw + j dw]`` (rows in ``F.unfold``'s order).

        One strided copy of a ``(c, i, j, n, y, z)`` view of the (zero-padded) input, 2-4x faster
        than ``F.unfold`` on the CPU; a 1x1 stride-1 convolution of one image is a pure view
        (``[C, H W]``, no copy).
        """
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (self.kernel_size, self.stride, self.padding,
                                                  self.dilation)
        if ph or pw:
            x = F.pad(x, (pw, pw, ph, ph))
        n, c = x.shape[0], x.shape[1]
        sn, sc, sy, sx = x.stride()
        # (the view keeps x's storage offset)
        view = x.as_strided((c, kh, kw, n, ho, wo), (sc, dh * sy, dw * sx, sn, sh * sy, sw * sx))
        mat = view.reshape(c * kh * kw, n * ho * wo)
        return mat if mat.is_contiguous() else mat.contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must be [N, {self.in_channels}, H, W], got {tuple(x.shape)}")
        if self.format == "dense":
            w = self.weight
            b = None if self.bias is None else self.bias.to(w.dtype)
            y = F.conv2d(x.to(w.dtype), w, b, self.stride, self.padding, self.dilation,
                         self.groups)
            return (torch.relu_(y) if self.relu else y).to(x.dtype)
        n, c, h, w_in = x.shape
        ho, wo = self.output_size(h, w_in)
        if ho <= 0 or wo <= 0:
            raise ValueError(f"input {h}x{w_in} is too small for kernel {self.kernel_size} "
                             f"(dilation {self.dilation}, padding {self.padding})")
        if self._implicit(x):
            return self._forward_implicit(x, ho, wo)
        mat = self._columns(x, ho, wo)                                         # [K, N L]
        # [out, N L] = relu?(W @ X + b): bias and ReLU fused into the kernel's store
        y = run_op("csr_matmul", mat, (self.values, self.bias), self.row_ptr, self.col_idx,
                   self.values, mat, self.fan_in, self.bias, self.relu)
        if n == 1:
            return y.reshape(1, self.out_channels, ho, wo)
        return y.reshape(self.out_channels, n, ho, wo).transpose(0, 1)

    def _implicit(self, x: torch.Tensor) -> bool:
        """Use the implicit-im2col path: one float32 CPU image, stride 1, a kernel or padding
        (a 1x1 unpadded convolution is a plain view anyway), the C++ ``csr_matmul``, inference
        (the gradient through the overlapping view would densify a ``[out, C hp wp]`` matrix)."""
        kh, kw = self.kernel_size
        return (x.shape[0] == 1 and x.dtype == torch.float32 and x.device.type == "cpu"
                and not (torch.is_grad_enabled() and x.requires_grad)
                and self.stride == (1, 1) and ((kh, kw) != (1, 1) or self.padding != (0, 0))
                and not torch.compiler.is_compiling() and has_kernel("csr_matmul", "CPU"))

    def _offsets(self, hp: int, wp: int) -> torch.Tensor:
        """Column ``(c, i, j)`` of the CSR matrix -> offset ``c hp wp + i dh wp + j dw`` into
        the flattened padded image (int32, ascending within a row like the columns); cached per
        padded size."""
        cache: dict[tuple[int, ...], torch.Tensor] = self.__dict__.setdefault(
            "_offset_cache", {})
        # (a reload of the buffers in place bumps their version counter)
        key = (hp, wp, self.col_idx.data_ptr(), self.col_idx._version)
        off = cache.get(key)
        if off is None:
            (kh, kw), (dh, dw) = self.kernel_size, self.dilation
            cols = columns_of(self.col_idx)
            ch, r = cols // (kh * kw), cols % (kh * kw)
            off = (ch * (hp * wp) + (r // kw) * (dh * wp) + (r % kw) * dw).to(torch.int32)
            cache.clear()
            cache[key] = off
        return off

    def _forward_implicit(self, x: torch.Tensor, ho: int, wo: int) -> torch.Tensor:
        """Stride-1 convolution of one image without the im2col copy.

        On the zero-padded image ``xp [C, hp, wp]`` (one extra zero row at the bottom), flattened,
        output pixel ``(y, z)`` of tap ``(c, i, j)`` reads ``xp_flat[c hp wp + i dh wp + j dw +
        y wp + z]``. Computing the output on ``ho x wp`` pixels (``wp - wo`` wasted columns per
        row) makes that ``X[off, n] = xp_flat[off + n]`` with ``n = y wp + z``: an overlapping
        view with strides ``(1, 1)`` that ``csr_matmul`` reads in place, with the CSR columns
        remapped to offsets ``off`` (:meth:`_offsets`). ``X`` is ``kh kw`` times smaller than the
        im2col matrix, so it also stays in cache; the valid ``wo`` columns are then sliced out.
        The extra row keeps the last output row's wasted columns inside the buffer.
        """
        (ph, pw) = self.padding
        xp = F.pad(x[0], (pw, pw, ph, ph + 1))                           # [C, hp, wp]
        c, hp, wp = xp.shape
        flat = xp.reshape(-1)
        ncols = ho * wp
        in_feats = c * hp * wp - ncols + 1         # X[off, n] stays inside flat for every n
        X = flat.as_strided((in_feats, ncols), (1, 1))
        y = run_op("csr_matmul", X, (self.values, self.bias), self.row_ptr,
                   self._offsets(hp, wp), self.values, X, in_feats, self.bias,
                   self.relu)                                                 # [out, ho wp]
        return y.view(1, self.out_channels, ho, wp)[:, :, :, :wo]

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"groups={self.groups}, format={self.format!r}, nnz={self.nnz}, "
                f"value_dtype={self.value_dtype}, bias={self.bias is not None}"
                + (", relu=True" if self.relu else ""))


def fuse_relu_(model: nn.Module) -> int:
    """Fuse every ``nn.ReLU`` that follows a :class:`SparseConv2d` in an ``nn.Sequential`` (only
    ``nn.Identity`` in between, e.g. a folded BatchNorm's placeholder) into the layer: sets its
    ``relu`` flag and replaces the ReLU by ``nn.Identity``; returns the number fused.

    The model computes the same function (``relu(conv(x) + b)``), but a CSR layer then applies
    bias and ReLU in ``csr_matmul``'s store instead of two more passes over the output. The flag
    is part of :meth:`SparseConv2d.deploy_config`, so deployment artifacts keep the fusion.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    fused = 0
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for i, name in enumerate(names):
            conv = seq._modules[name]
            if not isinstance(conv, SparseConv2d) or conv.relu:
                continue
            k = i + 1
            while k < len(names) and type(seq._modules[names[k]]) is nn.Identity:
                k += 1
            if k < len(names) and type(seq._modules[names[k]]) is nn.ReLU:
                conv.relu = True
                seq._modules[names[k]] = nn.Identity()
                fused += 1
    return fused
