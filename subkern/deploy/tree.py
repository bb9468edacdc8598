"""The JSON module tree of an artifact: describe a model, rebuild it without the training code.

A model is stored as a tree of nodes ``{"type": name, "config": {...}}`` (leaves) and
``{"type": name, "config": {...}, "children": [[child_name, node], ...]}`` (containers; an
``nn.Sequential`` node has no ``config``). :func:`describe` writes the tree of a model,
:func:`build` rebuilds the (uninitialised) model from it, and the artifact's ``state_dict``
fills in the tensors. A module's forward cannot be serialised, so only registered module types
are accepted; any other module is refused with a :class:`~subkern.deploy.artifact.DeployFormatError`
naming it.

Registered types (:func:`registered_types` lists them at run time):

* containers: ``Sequential`` (nested, any child names) and :class:`Residual`
  (``activation(body(x) + shortcut(x))``, the block of a ResNet);
* torch leaves: ``Linear``, ``Conv2d``, ``BatchNorm1d``, ``BatchNorm2d``, ``ReLU``, ``Flatten``,
  ``AdaptiveAvgPool2d``, ``MaxPool2d`` (rebuilt as :class:`MaxPool2d`, the same pooling in a
  faster memory layout), ``AvgPool2d``, ``Dropout``, ``Identity``;
* subkern leaves: ``SupermaskLinear``, ``SupermaskConv2d`` (registered here) and
  ``SparseLinear``, ``SparseConv2d`` (registered by :mod:`subkern.deploy.sparse`).

A subclass of a registered type is accepted when it does not override ``forward`` (e.g. a
non-affine ``BatchNorm2d``) and is rebuilt as its base class. A module that defines
``deploy_config() -> dict`` (JSON-able constructor keyword arguments) is described by it and
rebuilt by ``cls(**config)`` (JSON lists become tuples); other leaves use the describe function
given at registration. :func:`register_leaf` / :func:`register_container` add types.

Models with a custom ``forward`` (e.g. a ResNet class) can be *lowered* before describing:
:func:`lower` replaces every module that has a registered lowering (:func:`register_lowering`)
by an equivalent module built from registered types. Built in: the edge-popup models of
:mod:`subkern.methods.edgepopup.models` (``FC``, ``ConvNet``, ``BasicBlock``, ``Bottleneck``,
``ResNet``; the same classes are used with dense or STR layers), which become ``Sequential`` and
:class:`Residual` nodes. Other custom models must be written as such nodes (or registered).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..nn.supermask import SupermaskConv2d, SupermaskLinear
from .artifact import DeployFormatError

__all__ = ["Residual", "MaxPool2d", "describe", "build", "instantiate", "lower", "register_leaf",
           "register_container", "register_lowering", "registered_types"]

Describe = Callable[[Any], dict[str, Any]]
BuildLeaf = Callable[[dict[str, Any]], nn.Module]
BuildContainer = Callable[[dict[str, Any], list[tuple[str, nn.Module]]], nn.Module]


class Residual(nn.Module):
    """``activation(body(x) + shortcut(x))``: a residual block with a serialisable forward.

    ``shortcut=None`` is the identity; ``activation`` is ``"relu"`` or ``"none"``. An empty
    ``nn.Sequential`` shortcut (the edge-popup models' identity) is stored as ``None``.
    """

    ACTIVATIONS = ("relu", "none")

    def __init__(self, body: nn.Module, shortcut: nn.Module | None = None,
                 activation: str = "relu") -> None:
        super().__init__()
        if activation not in self.ACTIVATIONS:
            raise ValueError(f"activation must be one of {self.ACTIVATIONS}, got {activation!r}")
        self.body = body
        if isinstance(shortcut, nn.Sequential) and len(shortcut) == 0:
            shortcut = None
        self.shortcut = shortcut
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.shortcut is None else self.shortcut(x)
        out = self.body(x)
        if _fresh(out, x, identity):
            out.add_(identity)                              # inference: in place, no allocation
            return out.relu_() if self.activation == "relu" else out
        out = out + identity
        return torch.relu(out) if self.activation == "relu" else out

    def deploy_config(self) -> dict[str, Any]:
        return {"activation": self.activation}

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"


def _fresh(out: torch.Tensor, *others: torch.Tensor) -> bool:
    """Whether ``out`` may be updated in place: no autograd, not tracing, and its memory is not
    that of ``others`` (a body of views, e.g. ``Flatten``, returns the input's memory)."""
    if out.requires_grad or any(t.requires_grad for t in others):
        return False
    if torch.compiler.is_compiling():
        return False
    try:
        ptr = out.untyped_storage().data_ptr()
        return all(t.untyped_storage().data_ptr() != ptr for t in others)
    except (RuntimeError, NotImplementedError):   # fake / functional tensors while tracing
        return False


class MaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` that pools a contiguous 4-D CPU input in channels-last layout.

    The same values (max pooling is exact); torch's NCHW CPU max-pool is several times slower than
    its channels-last one for a single image (the ResNet stem: 6.6 ms against 0.4 ms + 0.4 ms of
    layout copies, 1 thread). Artifacts store it as ``MaxPool2d``; loading builds this class.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dim() != 4 or x.device.type != "cpu" or self.return_indices
                or not x.is_contiguous() or torch.compiler.is_compiling()):
            return super().forward(x)
        y = super().forward(x.contiguous(memory_format=torch.channels_last))
        return y.contiguous()


@dataclass(frozen=True)
class _Entry:
    cls: type[nn.Module]
    describe: Describe | None          # None: the module's deploy_config()
    build: BuildLeaf | BuildContainer
    container: bool


_REGISTRY: dict[str, _Entry] = {}
_LOWERINGS: list[tuple[Callable[[nn.Module], bool], Callable[[nn.Module], nn.Module]]] = []


def register_leaf(name: str, cls: type[nn.Module], describe: Describe | None = None,
                  build: BuildLeaf | None = None) -> None:
    """Register leaf type ``name``: ``describe(module) -> config`` (default: the module's
    ``deploy_config()``), ``build(config) -> module`` (default: ``cls(**config)``)."""
    _REGISTRY[name] = _Entry(cls, describe, build or (lambda c: cls(**c)), False)


def register_container(name: str, cls: type[nn.Module], build: BuildContainer,
                       describe: Describe | None = None) -> None:
    """Register a container type: its children are described recursively and passed to
    ``build(config, [(name, child), ...])``."""
    _REGISTRY[name] = _Entry(cls, describe, build, True)


def register_lowering(match: type[nn.Module] | Callable[[nn.Module], bool],
                      lowering: Callable[[nn.Module], nn.Module]) -> None:
    """Make :func:`lower` replace modules that ``match`` (a class: exact type) by
    ``lowering(module)``, an equivalent module made of registered types."""
    if isinstance(match, type):
        cls = match
        _LOWERINGS.append((lambda m: type(m) is cls, lowering))
    else:
        _LOWERINGS.append((match, lowering))


def registered_types() -> list[str]:
    """The module type names the tree can describe."""
    return list(_REGISTRY)


# --------------------------------------------------------------------------------------------
# built-in types
# --------------------------------------------------------------------------------------------

def _ints(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def _conv_config(m: nn.Conv2d) -> dict[str, Any]:
    if isinstance(m.padding, str):
        raise DeployFormatError(f"Conv2d with padding={m.padding!r} is not supported (numeric)")
    return {"in_channels": m.in_channels, "out_channels": m.out_channels,
            "kernel_size": _ints(m.kernel_size), "stride": _ints(m.stride),
            "padding": _ints(m.padding), "dilation": _ints(m.dilation), "groups": m.groups,
            "bias": m.bias is not None, "padding_mode": m.padding_mode}


def _bn_config(m: nn.modules.batchnorm._BatchNorm) -> dict[str, Any]:
    return {"num_features": m.num_features, "eps": m.eps, "momentum": m.momentum,
            "affine": m.affine, "track_running_stats": m.track_running_stats}


def _pool_config(m: nn.Module) -> dict[str, Any]:
    keys = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "count_include_pad",
            "divisor_override")
    return {k: _ints(getattr(m, k)) for k in keys if hasattr(m, k)}


def _build_sequential(config: dict[str, Any], children: list[tuple[str, nn.Module]]
                      ) -> nn.Module:
    return nn.Sequential(OrderedDict(children))


def _build_residual(config: dict[str, Any], children: list[tuple[str, nn.Module]]
                    ) -> nn.Module:
    named = dict(children)
    if "body" not in named or set(named) - {"body", "shortcut"}:
        raise DeployFormatError(f"a Residual node needs children 'body' (and optionally "
                                f"'shortcut'), got {sorted(named)}")
    return Residual(named["body"], named.get("shortcut"), **config)


register_container("Sequential", nn.Sequential, _build_sequential, describe=lambda m: {})
register_container("Residual", Residual, _build_residual)
register_leaf("SupermaskLinear", SupermaskLinear,
              lambda m: {"in_features": m.in_features, "out_features": m.out_features,
                         "bias": m.bias is not None})
register_leaf("SupermaskConv2d", SupermaskConv2d,
              lambda m: {"in_channels": m.in_channels, "out_channels": m.out_channels,
                         "kernel_size": list(m.kernel_size), "stride": list(m.stride),
                         "padding": list(m.padding), "dilation": list(m.dilation),
                         "groups": m.groups, "bias": m.bias is not None})
register_leaf("Linear", nn.Linear,
              lambda m: {"in_features": m.in_features, "out_features": m.out_features,
                         "bias": m.bias is not None})
register_leaf("Conv2d", nn.Conv2d, _conv_config)
register_leaf("BatchNorm1d", nn.BatchNorm1d, _bn_config)
register_leaf("BatchNorm2d", nn.BatchNorm2d, _bn_config)
register_leaf("ReLU", nn.ReLU, lambda m: {"inplace": m.inplace})
register_leaf("Flatten", nn.Flatten, lambda m: {"start_dim": m.start_dim, "end_dim": m.end_dim})
register_leaf("AdaptiveAvgPool2d", nn.AdaptiveAvgPool2d,
              lambda m: {"output_size": _ints(m.output_size)})
register_leaf("MaxPool2d", nn.MaxPool2d, _pool_config, lambda c: MaxPool2d(**c))
register_leaf("AvgPool2d", nn.AvgPool2d, _pool_config)
register_leaf("Dropout", nn.Dropout, lambda m: {"p": m.p})
register_leaf("Identity", nn.Identity, lambda m: {}, lambda c: nn.Identity())


# --------------------------------------------------------------------------------------------
# describe / build
# --------------------------------------------------------------------------------------------

def _type_name(module: nn.Module) -> str | None:
    if type(module) is MaxPool2d:
        return "MaxPool2d"
    for name, entry in _REGISTRY.items():
        if type(module) is entry.cls:
            return name
    for name, entry in _REGISTRY.items():
        # a subclass that keeps its base's forward computes what the base computes
        if isinstance(module, entry.cls) and type(module).forward is entry.cls.forward:
            return name
    return None


def describe(model: nn.Module, path: str = "model") -> dict[str, Any]:
    """The JSON-able architecture tree of ``model`` (raises :class:`DeployFormatError`)."""
    name = _type_name(model)
    if name is None or (name == "MaxPool2d" and model.return_indices):
        supported = ", ".join(_REGISTRY)
        raise DeployFormatError(
            f"cannot describe module {path!r} of type {type(model).__name__}: subkern "
            f"deployment artifacts rebuild models made of {supported} only (models with a "
            "custom forward cannot be exported; see subkern.deploy.tree.register_lowering)")
    entry = _REGISTRY[name]
    deploy_config = getattr(model, "deploy_config", None)
    if callable(deploy_config):
        config = dict(deploy_config())
    elif entry.describe is not None:
        config = entry.describe(model)
    else:
        raise DeployFormatError(f"module {path!r} ({type(model).__name__}) has no "
                                "deploy_config()")
    if not entry.container:
        return {"type": name, "config": config}
    children = [[child_name, describe(child, f"{path}.{child_name}")]
                for child_name, child in model.named_children()]
    if name == "Sequential":
        return {"type": name, "children": children}
    return {"type": name, "config": config, "children": children}


def build(tree: dict[str, Any]) -> nn.Module:
    """Rebuild the (uninitialised) model an architecture tree describes."""
    try:
        kind = tree["type"]
        if kind not in _REGISTRY:
            raise DeployFormatError(f"unknown module type {kind!r} in the architecture")
        entry = _REGISTRY[kind]
        config = dict(tree.get("config", {}))
        for key, value in config.items():
            if isinstance(value, list):
                config[key] = tuple(value)
        if entry.container:
            children = [(str(name), build(child)) for name, child in tree.get("children", [])]
            return entry.build(config, children)  # type: ignore[call-arg]
        if tree.get("children"):
            raise DeployFormatError(f"leaf module type {kind!r} has children")
        return entry.build(config)  # type: ignore[call-arg]
    except DeployFormatError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise DeployFormatError(f"invalid architecture description: {err!r}") from err


# --------------------------------------------------------------------------------------------
# lowering of custom-forward models
# --------------------------------------------------------------------------------------------

def _edgepopup_lowerings() -> dict[type[nn.Module], Callable[[nn.Module], nn.Module]]:
    from ..methods.edgepopup import models as ep

    def seq(*pairs: tuple[str, nn.Module]) -> nn.Sequential:
        return nn.Sequential(OrderedDict(pairs))

    def fc(m: nn.Module) -> nn.Module:
        return seq(("flatten", nn.Flatten(1)), ("linear", m.linear))

    def convnet(m: nn.Module) -> nn.Module:
        return seq(("convs", m.convs), ("flatten", nn.Flatten(1)), ("linear", m.linear))

    def basic(m: nn.Module) -> nn.Module:
        body = seq(("conv1", m.conv1), ("bn1", m.bn1), ("relu", nn.ReLU(inplace=True)),
                   ("conv2", m.conv2), ("bn2", m.bn2))
        return Residual(body, m.shortcut, "relu")

    def bottleneck(m: nn.Module) -> nn.Module:
        body = seq(("conv1", m.conv1), ("bn1", m.bn1), ("relu1", nn.ReLU(inplace=True)),
                   ("conv2", m.conv2), ("bn2", m.bn2), ("relu2", nn.ReLU(inplace=True)),
                   ("conv3", m.conv3), ("bn3", m.bn3))
        return Residual(body, m.shortcut, "relu")

    def resnet(m: nn.Module) -> nn.Module:
        return seq(("conv1", m.conv1), ("bn1", m.bn1), ("relu", nn.ReLU(inplace=True)),
                   ("maxpool", m.maxpool), ("layer1", m.layer1), ("layer2", m.layer2),
                   ("layer3", m.layer3), ("layer4", m.layer4), ("avgpool", m.avgpool),
                   ("flatten", nn.Flatten(1)), ("fc", m.fc))

    return {ep.FC: fc, ep.ConvNet: convnet, ep.BasicBlock: basic, ep.Bottleneck: bottleneck,
            ep.ResNet: resnet}


def _lowering_of(module: nn.Module) -> Callable[[nn.Module], nn.Module] | None:
    for match, fn in _LOWERINGS:
        if match(module):
            return fn
    if type(module).__module__ == "subkern.methods.edgepopup.models":
        return _edgepopup_lowerings().get(type(module))
    return None


def lower(model: nn.Module) -> nn.Module:
    """``model`` with every module that has a lowering replaced (in place where possible; the
    returned module is the new root). The children are shared, not copied."""
    fn = _lowering_of(model)
    if fn is not None:
        model = fn(model)
    for name, child in list(model.named_children()):
        new = lower(child)
        if new is not child:
            setattr(model, name, new)
    return model


def instantiate(tree: dict[str, Any], tensors: dict[str, torch.Tensor], path: str,
                device: torch.device | str = "cpu") -> nn.Module:
    """:func:`build` the model of ``tree``, load ``tensors`` (strict) and move it to ``device``
    in eval mode (errors name ``path``)."""
    model = build(tree)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        raise DeployFormatError(f"{path}: tensors do not match the architecture ({err})") from err
    return model.to(device).eval()
