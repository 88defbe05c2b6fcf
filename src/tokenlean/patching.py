"""Reversible patches: the hook lifecycle every method shares.

:func:`patch` resolves a method, checks it is not already on the model, and lets the method
install itself through a :class:`PatchContext`. The context records an undo step for every
hook, wrapper and attention override it installs, so :meth:`PatchHandle.remove` puts the model
back exactly as it was (bitwise-identical outputs). Nothing is changed globally at import time:

* forward (pre-)hooks with kwargs on any module;
* per-instance method wrappers (e.g. ``get_image_features``), stacked so that two patches
  wrapping the same method can be removed in either order;
* attention wrappers: the model is switched to a registered attention implementation
  ``tokenlean_<base>`` (with the base's *mask* function registered under the same name, so
  transformers keeps building masks) that runs each attention module's wrappers around the
  base implementation. The switch is undone when the last wrapper on the model goes.
"""

from __future__ import annotations

import functools
import sys
import weakref
from collections.abc import Callable
from typing import Any

import torch.nn as nn

from .adapters import ModelAdapter, get_adapter
from .errors import PatchError
from .methods import Method, make_method

__all__ = ["PatchContext", "PatchHandle", "active_patches", "patch"]

# model -> list of live handles (weak: a patched model can still be garbage-collected)
_ACTIVE: weakref.WeakKeyDictionary[nn.Module, list[PatchHandle]] = weakref.WeakKeyDictionary()


class PatchHandle:
    """A patch applied to one model. Use as a context manager, or call :meth:`remove`.

    Examples
    --------
    >>> with tokenlean.patch(model, "sink_window", window=256):
    ...     out = model.generate(**inputs)
    """

    def __init__(self, model: nn.Module, method: Method) -> None:
        self.model = model
        self.method = method
        self._undo: list[Callable[[], None]] = []
        self._removed = False

    @property
    def active(self) -> bool:
        """``True`` until :meth:`remove` has run."""
        return not self._removed

    def remove(self) -> None:
        """Undo every change the patch made, in reverse order.

        Raises
        ------
        PatchError
            If the patch was already removed.
        """
        if self._removed:
            raise PatchError(f"{self.method.name!r} patch was already removed from this model")
        self._removed = True
        errors = []
        while self._undo:
            undo = self._undo.pop()
            try:
                undo()
            except Exception as exc:  # keep undoing the rest; report at the end
                errors.append(exc)
        handles = _ACTIVE.get(self.model, [])
        if self in handles:
            handles.remove(self)
        if errors:
            raise PatchError(f"removing {self.method.name!r} failed: {errors[0]}") from errors[0]

    def __enter__(self) -> PatchHandle:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if not self._removed:
            self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"PatchHandle({self.method!r}, model={type(self.model).__name__}, {state})"


class PatchContext:
    """What a method's ``install`` uses to change a model; every change is undone on removal."""

    def __init__(self, handle: PatchHandle, adapter: ModelAdapter) -> None:
        self._handle = handle
        self.model = handle.model
        self.adapter = adapter

    def on_remove(self, undo: Callable[[], None]) -> None:
        """Register a callable run when the patch is removed (in reverse registration order)."""
        self._handle._undo.append(undo)

    def add_forward_pre_hook(
        self, module: nn.Module, hook: Callable[..., Any], *, with_kwargs: bool = True
    ) -> None:
        """``module.register_forward_pre_hook(hook, with_kwargs=...)``, removed with the patch."""
        self.on_remove(module.register_forward_pre_hook(hook, with_kwargs=with_kwargs).remove)

    def add_forward_hook(
        self, module: nn.Module, hook: Callable[..., Any], *, with_kwargs: bool = True
    ) -> None:
        """``module.register_forward_hook(hook, with_kwargs=...)``, removed with the patch."""
        self.on_remove(module.register_forward_hook(hook, with_kwargs=with_kwargs).remove)

    def wrap_method(
        self, obj: Any, attribute: str, wrapper: Callable[..., Any], *, outermost: bool = False
    ) -> None:
        """Wrap the bound method ``obj.<attribute>`` on this instance only.

        ``wrapper(call_next, *args, **kwargs)`` receives the next callable in the chain.
        Wrappers from several patches stack (the first added is called first, unless a later
        one asks to be ``outermost``); each can be removed independently.
        """
        chain = _MethodChain.install(obj, attribute)
        if outermost:
            chain.wrappers.insert(0, wrapper)
        else:
            chain.wrappers.append(wrapper)

        def undo() -> None:
            chain.wrappers.remove(wrapper)
            if not chain.wrappers:
                chain.uninstall()

        self.on_remove(undo)

    def add_attention_wrapper(
        self,
        wrapper: Callable[..., Any],
        modules: list[nn.Module] | None = None,
        supported_bases: tuple[str, ...] | None = ("sdpa", "eager"),
        outermost: bool = False,
    ) -> None:
        """Run ``wrapper`` around the attention function of ``modules`` (default: every layer's).

        Wrappers run in the order they were added (the first added is called first), except that
        ``outermost=True`` puts this one before every wrapper already there: a patch that takes
        over the attention of a patch below it (e.g. block retrieval over landmark attention).

        ``wrapper(module, query, key, value, attention_mask, *, call_next, **kwargs)`` gets
        query ``(batch, heads, q_len, head_dim)``, key/value ``(batch, kv_heads, kv_len, head_dim)``
        and the mask the base implementation would get, and returns ``(attn_output
        (batch, q_len, heads, head_dim), attn_weights | None)``, normally by calling ``call_next``.
        """
        _AttentionDispatch.add(self, wrapper, modules, supported_bases, outermost)


def patch(model: nn.Module, method: Method | str | type[Method], **overrides: Any) -> PatchHandle:
    """Apply ``method`` to ``model`` in place and return a :class:`PatchHandle`.

    Parameters
    ----------
    model
        A loaded Hugging Face model of a supported architecture.
    method
        A :class:`~tokenlean.Method` instance, class, or registered name (see :func:`tokenlean.methods`).
    **overrides
        Parameter values replacing the method's.

    Raises
    ------
    MethodConfigError
        Unknown method name or invalid parameter value.
    UnsupportedModelError
        The architecture is not supported.
    PatchError
        The same method is already applied to this model.
    """
    return apply_method(model, make_method(method, **overrides))


def apply_method(model: nn.Module, method: Method) -> PatchHandle:
    if not isinstance(model, nn.Module):
        raise TypeError(f"tokenlean.patch expects a torch.nn.Module, got {type(model).__name__}")
    adapter = get_adapter(model)
    for other in _ACTIVE.get(model, []):
        if type(other.method) is type(method):
            raise PatchError(
                f"{method.name!r} is already applied to this model ({other.method!r}); "
                "remove that patch before applying it again"
            )
    handle = PatchHandle(model, method)
    try:
        method.install(PatchContext(handle, adapter))
    except BaseException:
        handle.remove()  # roll back whatever was installed before the failure
        raise
    _ACTIVE.setdefault(model, []).append(handle)
    return handle


def active_patches(model: nn.Module) -> list[PatchHandle]:
    """The patches currently applied to ``model``, oldest first."""
    return list(_ACTIVE.get(model, []))


# -- per-instance method wrapper chains ------------------------------------------------------


class _MethodChain:
    """Replaces ``obj.<attribute>`` by a dispatcher running a list of wrappers around the original."""

    def __init__(self, obj: Any, attribute: str) -> None:
        self.obj = obj
        self.attribute = attribute
        self.had_instance_attr = attribute in vars(obj)
        self.original = vars(obj)[attribute] if self.had_instance_attr else getattr(obj, attribute)
        self.wrappers: list[Callable[..., Any]] = []

        @functools.wraps(self.original)
        def dispatch(*args: Any, **kwargs: Any) -> Any:
            call = self.original
            for wrapper in reversed(self.wrappers):
                call = functools.partial(wrapper, call)
            return call(*args, **kwargs)

        dispatch._tokenlean_chain = self  # type: ignore[attr-defined]
        self.dispatch = dispatch

    @classmethod
    def install(cls, obj: Any, attribute: str) -> _MethodChain:
        current = vars(obj).get(attribute)
        existing = getattr(current, "_tokenlean_chain", None)
        if existing is not None:
            return existing
        if not callable(getattr(obj, attribute, None)):
            raise PatchError(f"{type(obj).__name__}.{attribute} is not a method")
        chain = cls(obj, attribute)
        object.__setattr__(obj, attribute, chain.dispatch)
        return chain

    def uninstall(self) -> None:
        if self.had_instance_attr:
            object.__setattr__(self.obj, self.attribute, self.original)
        else:
            object.__delattr__(self.obj, self.attribute)


# -- attention wrappers ------------------------------------------------------------------------


class _AttentionDispatch:
    """Registered attention implementations ``tokenlean_<base>`` dispatching to per-module wrappers."""

    wrappers: weakref.WeakKeyDictionary[nn.Module, list[Callable[..., Any]]] = weakref.WeakKeyDictionary()
    # model -> (number of attention wrappers installed on it, implementation to restore)
    switched: weakref.WeakKeyDictionary[nn.Module, list[Any]] = weakref.WeakKeyDictionary()
    registered: set[str] = set()

    @classmethod
    def add(
        cls,
        ctx: PatchContext,
        wrapper: Callable[..., Any],
        modules: list[nn.Module] | None,
        supported_bases: tuple[str, ...] | None,
        outermost: bool = False,
    ) -> None:
        model, adapter = ctx.model, ctx.adapter
        modules = adapter.attention_modules(model) if modules is None else modules
        state = cls.switched.get(model)
        if state is None:
            base = adapter.text_config(model)._attn_implementation or "eager"
            if supported_bases is not None and base not in supported_bases:
                raise PatchError(
                    f"{ctx._handle.method.name!r} needs one of the attention implementations "
                    f"{supported_bases}, but the model uses {base!r}; load it with attn_implementation='sdpa'"
                )
            name = cls.register(base)
            model.set_attn_implementation(adapter.attn_implementation_request(model, name))
            state = cls.switched[model] = [0, base]
        state[0] += 1
        for module in modules:
            chain = cls.wrappers.setdefault(module, [])
            if outermost:
                chain.insert(0, wrapper)
            else:
                chain.append(wrapper)

        def undo() -> None:
            for module in modules:
                chain = cls.wrappers.get(module, [])
                if wrapper in chain:
                    chain.remove(wrapper)
                if not chain:
                    cls.wrappers.pop(module, None)
            state[0] -= 1
            if state[0] == 0:
                del cls.switched[model]
                model.set_attn_implementation(adapter.attn_implementation_request(model, state[1]))

        ctx.on_remove(undo)

    @classmethod
    def register(cls, base: str) -> str:
        """Register ``tokenlean_<base>`` (attention function and mask function) once."""
        name = f"tokenlean_{base}"
        if name in cls.registered:
            return name
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        if base != "eager" and base not in ALL_ATTENTION_FUNCTIONS:
            raise PatchError(f"unknown base attention implementation {base!r}")

        def base_function(module: nn.Module) -> Callable[..., Any]:
            if base == "eager":  # each modeling file has its own eager attention
                return sys.modules[type(module).__module__].eager_attention_forward
            return ALL_ATTENTION_FUNCTIONS[base]

        def attention(
            module: nn.Module, query: Any, key: Any, value: Any, attention_mask: Any, **kwargs: Any
        ):
            call = base_function(module)
            for wrapper in reversed(cls.wrappers.get(module, ())):
                call = functools.partial(wrapper, call_next=call)
            return call(module, query, key, value, attention_mask, **kwargs)

        AttentionInterface.register(name, attention)
        # Without a mask function under the same name transformers passes attention_mask=None.
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
        cls.registered.add(name)
        return name


def cache_keyword(forward: Any) -> str:
    """The KV-cache keyword of a model's ``forward``: ``cache`` in newer transformers (5.2x), else ``past_key_values``."""
    import inspect

    try:
        params = inspect.signature(forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def takes_logits_to_keep(forward: Any) -> bool:
    """Whether a model's ``forward`` takes ``logits_to_keep`` (the LM head on the last positions only,
    as ``generate()`` prefills)."""
    import inspect

    try:
        return "logits_to_keep" in inspect.signature(forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins
        return False
