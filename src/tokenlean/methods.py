"""Methods: small validated dataclasses holding a technique's hyper-parameters.

A method subclasses :class:`Method`, declares its parameters as dataclass fields made with
:func:`param`, checks their ranges in :meth:`Method.validate`, and installs itself in
:meth:`Method.install` through a :class:`~tokenlean.patching.PatchContext`, which owns every
hook and wrapper so that removal restores the model exactly. ``@register_method("name")``
makes it reachable by name from :func:`tokenlean.patch`, :func:`tokenlean.methods` and the CLI.
"""

from __future__ import annotations

import abc
import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Union, get_args, get_origin

from .errors import MethodConfigError, did_you_mean

if TYPE_CHECKING:
    import torch.nn as nn

    from .patching import PatchContext, PatchHandle

__all__ = [
    "Method",
    "MethodInfo",
    "ParamInfo",
    "get_method_class",
    "make_method",
    "methods",
    "param",
    "parse_method_spec",
    "register_method",
    "split_spec",
]

_REGISTRY: dict[str, type[Method]] = {}


def param(default: Any, doc: str) -> Any:
    """Declare a method parameter with its default and a one-line description."""
    return dataclasses.field(default=default, metadata={"doc": doc})


@dataclass
class Method(abc.ABC):
    """Base class of every tokenlean method.

    Subclasses are dataclasses; their fields are the hyper-parameters. Types are checked on
    construction (``int`` fields refuse ``True`` and ``2.5``, ``float`` fields accept ints), then
    :meth:`validate` checks ranges. Instances are compared by value.
    """

    name: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self._check_types()
        self.validate()

    # -- to override ---------------------------------------------------------------------------
    def validate(self) -> None:  # noqa: B027 - optional hook, nothing to check by default
        """Check parameter ranges; raise :class:`MethodConfigError` on a bad value."""

    @abc.abstractmethod
    def install(self, ctx: PatchContext) -> None:
        """Install the method's hooks through ``ctx``; everything registered there is undone on removal."""

    def prepare(self, model: nn.Module, tokenizer: Any) -> None:  # noqa: B027 - optional hook
        """Tokenizer-side setup the method needs before :meth:`install` (e.g. adding a token).

        Called once per model by the bench runner (and by encoders) before any patching; it may
        change ``tokenizer`` and grow the model's vocabulary but must leave every existing
        token's outputs unchanged. Default: nothing.
        """

    # -- public --------------------------------------------------------------------------------
    def apply(self, model: nn.Module) -> PatchHandle:
        """Patch ``model`` in place and return the handle that removes the patch."""
        from .patching import apply_method

        return apply_method(model, self)

    def params(self) -> dict[str, Any]:
        """The parameter values as a plain dict (JSON-friendly)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def spec(self, *, changed_only: bool = False) -> str:
        """``name:k=v,...`` string that :func:`parse_method_spec` turns back into this method.

        With ``changed_only`` only the parameters that differ from their defaults are listed.
        """
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        args = ",".join(
            f"{k}={v}" for k, v in self.params().items() if not (changed_only and v == defaults[k])
        )
        return f"{self.name}:{args}" if args else self.name

    # -- helpers for validate() ----------------------------------------------------------------
    def _fail(self, field: str, value: Any, requirement: str) -> None:
        raise MethodConfigError(f"{type(self).__name__}.{field} must be {requirement}, got {value!r}")

    def _check_fraction(self, field: str, *, allow_zero: bool = False, allow_one: bool = True) -> None:
        """Check that ``field`` is a ratio in (0, 1] (bounds adjustable)."""
        value = getattr(self, field)
        low_ok = value >= 0 if allow_zero else value > 0
        high_ok = value <= 1 if allow_one else value < 1
        if not (low_ok and high_ok):
            low = "[0" if allow_zero else "(0"
            high = "1]" if allow_one else "1)"
            self._fail(field, value, f"in {low}, {high}")

    def _check_types(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            expected = hints.get(f.name, Any)
            coerced = _coerce_type(value, expected)
            if coerced is _INVALID:
                self._fail(f.name, value, f"of type {_type_name(expected)}")
            if coerced is not value:
                object.__setattr__(self, f.name, coerced)


_INVALID = object()


def _coerce_type(value: Any, expected: Any) -> Any:
    """Return ``value`` (possibly an int widened to float) if it fits ``expected``, else ``_INVALID``."""
    if expected is Any:
        return value
    origin = get_origin(expected)
    if origin in (Union, types.UnionType):
        for option in get_args(expected):
            result = _coerce_type(value, option)
            if result is not _INVALID:
                return result
        return _INVALID
    if origin is Literal:
        return value if value in get_args(expected) else _INVALID
    if expected is type(None):
        return value if value is None else _INVALID
    if expected is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return _INVALID
        return float(value)
    if expected is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _INVALID
    if origin in (tuple, list):
        return value if isinstance(value, origin) else _INVALID
    if isinstance(expected, type):
        return value if isinstance(value, expected) else _INVALID
    return value


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if tp is type(None):
        return "None"
    return getattr(tp, "__name__", str(tp))


# -- registry ----------------------------------------------------------------------------------


def register_method(name: str):
    """Class decorator registering a :class:`Method` subclass under ``name``."""

    def decorator(cls: type[Method]) -> type[Method]:
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise TypeError(f"@register_method expects a Method subclass, got {cls!r}")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(
                f"a method named {name!r} is already registered ({_REGISTRY[name].__qualname__})"
            )
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def get_method_class(name: str) -> type[Method]:
    """The registered method class called ``name``; a misspelt name gets close names suggested."""
    _load_builtin_methods()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise MethodConfigError(
            f"unknown method {name!r}.{did_you_mean(name, _REGISTRY)} "
            f"Registered methods: {', '.join(sorted(_REGISTRY))}"
        ) from None


def make_method(method: Method | str | type[Method], **overrides: Any) -> Method:
    """Resolve ``method`` (instance, class or registered name) and apply keyword ``overrides``."""
    if isinstance(method, str):
        method = get_method_class(method)
    if isinstance(method, type):
        if not issubclass(method, Method):
            raise MethodConfigError(f"{method!r} is not a tokenlean Method")
        _check_override_names(method, overrides)
        return method(**overrides)
    if not isinstance(method, Method):
        raise MethodConfigError(
            f"expected a Method, a Method class or a method name, got {type(method).__name__}"
        )
    if overrides:
        _check_override_names(type(method), overrides)
        return dataclasses.replace(method, **overrides)
    return method


def _check_override_names(cls: type[Method], overrides: dict[str, Any]) -> None:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise MethodConfigError(
            f"{cls.__name__} has no parameter(s) {', '.join(map(repr, unknown))}; "
            f"parameters: {', '.join(sorted(names)) or 'none'}"
        )


def parse_method_spec(spec: str) -> Method:
    """Build a method from ``"name"`` or ``"name:k=v,k2=v2"`` (the CLI's ``--method`` syntax).

    Values are converted to the field's type: ints, floats, ``true``/``false`` for booleans,
    ``none`` for optional fields, strings otherwise.
    """
    try:
        name, items = split_spec(spec)
    except ValueError as exc:
        raise MethodConfigError(f"bad method argument: {exc}") from None
    cls = get_method_class(name)
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, raw in items:
        _check_override_names(cls, {key: None})
        kwargs[key] = _parse_value(raw, hints.get(key, Any), f"{name}.{key}")
    return cls(**kwargs)


def split_spec(spec: str) -> tuple[str, list[tuple[str, str]]]:
    """Split ``"name:k=v,k2=v2"`` into ``(name, [(k, v), (k2, v2)])`` (stripped strings).

    The syntax of the CLI's ``--method`` and ``--task``.

    Raises
    ------
    ValueError
        For an item without ``=`` or with an empty key.
    """
    name, _, arg_text = spec.partition(":")
    items = []
    for item in filter(None, (part.strip() for part in arg_text.split(","))):
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{item!r} in {spec!r}: expected key=value")
        items.append((key.strip(), raw.strip()))
    return name.strip(), items


def _parse_value(raw: str, expected: Any, where: str) -> Any:
    options = get_args(expected) if get_origin(expected) in (Union, types.UnionType) else (expected,)
    if raw.lower() == "none" and type(None) in options:
        return None
    for option in options:
        try:
            if option is bool:
                if raw.lower() in ("true", "1", "yes"):
                    return True
                if raw.lower() in ("false", "0", "no"):
                    return False
                continue
            if option is int:
                return int(raw)
            if option is float:
                return float(raw)
            if get_origin(option) is Literal:
                for lit in get_args(option):
                    if str(lit) == raw:
                        return lit
                continue
            if option is str or option is Any:
                return raw
        except ValueError:
            continue
    raise MethodConfigError(f"cannot read {raw!r} as {_type_name(expected)} for {where}")


# -- introspection -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamInfo:
    """One parameter of a registered method."""

    name: str
    type: str
    default: Any
    doc: str


@dataclass(frozen=True)
class MethodInfo:
    """A registered method: its name, class, one-line summary and parameters."""

    name: str
    cls: type[Method]
    summary: str
    params: tuple[ParamInfo, ...]


def methods() -> list[MethodInfo]:
    """All registered methods with their parameters, sorted by name."""
    _load_builtin_methods()
    infos = []
    for name, cls in sorted(_REGISTRY.items()):
        hints = typing.get_type_hints(cls)
        params = tuple(
            ParamInfo(
                name=f.name,
                type=_type_name(hints.get(f.name, Any)),
                default=f.default if f.default is not dataclasses.MISSING else None,
                doc=f.metadata.get("doc", ""),
            )
            for f in dataclasses.fields(cls)
        )
        summary = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        infos.append(MethodInfo(name=name, cls=cls, summary=summary, params=params))
    return infos


def _load_builtin_methods() -> None:
    """Import the subpackages whose modules register the built-in methods."""
    import tokenlean.attention  # noqa: F401
    import tokenlean.compressors  # noqa: F401
