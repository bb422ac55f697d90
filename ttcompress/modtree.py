"""Module-tree helpers: look up and replace submodules by qualified name, find shared modules, and
put models in eval mode for a block (:func:`eval_mode`).

Small recursive-free functions in the style of timm's ``_manipulate``: they return the (possibly
new) root instead of assuming the root never changes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from torch import nn

from ttcompress.checkpoint.meta import copy_meta

__all__ = ["eval_mode", "get_submodule", "named_with_aliases", "replace_module", "set_submodule"]


def get_submodule(root: nn.Module, name: str) -> nn.Module:
    """The module at qualified ``name`` (``""`` is ``root``); ``AttributeError`` if absent."""
    module = root
    if name == "":
        return module
    for part in name.split("."):
        children = module._modules
        if part not in children or children[part] is None:
            raise AttributeError(f"{type(module).__name__} has no submodule {part!r} (looking up {name!r})")
        module = children[part]  # type: ignore[assignment]
    return module


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at qualified ``name`` and return the (possibly new) root.

    ``new`` takes the train/eval flag of the module it replaces. Replacing ``""`` returns ``new``
    itself as the root (with ``root``'s metadata).
    """
    old = get_submodule(root, name)
    new.train(old.training)
    if name == "":
        copy_meta(root, new)
        return new
    parent_name, _, child = name.rpartition(".")
    parent = get_submodule(root, parent_name)
    parent._modules[child] = new  # also works for nn.Sequential/ModuleList/ModuleDict children
    return root


def replace_module(root: nn.Module, old: nn.Module, new: nn.Module) -> nn.Module:
    """Put ``new`` at every name under which ``old`` is reachable in ``root`` (a shared module stays
    shared), with :func:`set_submodule`; return the (possibly new) root."""
    names = [name for name, m in root.named_modules(remove_duplicate=False) if m is old]
    for name in names:
        root = set_submodule(root, name, new)
    return root


def named_with_aliases(
    model: nn.Module, keep: Callable[[nn.Module], bool]
) -> list[tuple[str, nn.Module, tuple[str, ...]]]:
    """``(name, module, aliases)`` of every distinct module for which ``keep(module)`` is true.

    ``name`` is the first qualified name (module order); ``aliases`` are the other names under
    which the same module object is reachable (a shared or tied layer).
    """
    names: dict[int, list[str]] = {}
    mods: dict[int, nn.Module] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        if keep(m):
            names.setdefault(id(m), []).append(name)
            mods[id(m)] = m
    return [(ns[0], mods[i], tuple(ns[1:])) for i, ns in names.items()]


@contextlib.contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Every module of ``models`` in eval mode inside the block; after it, each module's own train/eval
    flag is back as it was (a BatchNorm frozen in eval inside a training model stays in eval).

    The flags are restored through ``Module.train`` (parents first), so layers that drop a cache when
    their mode changes (a factorized convolution's cached kernel) see the change.
    """
    flags = [(m, m.training) for model in models for m in model.modules()]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for module, training in flags:  # modules() is parents first: a child's own flag is set after its parent's
            if module.training != training or any(c.training != training for c in module.children()):
                module.train(training)
        for module, training in flags:  # exact, also for a module shared by two parents
            module.training = training
