"""One generic registry for every pluggable concept (datasets, encoders, networks, methods, ...)."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from typing import Any, Callable, Generic, Iterable, Iterator, Mapping, TypeVar

from crossmodal_kd.config import ConfigError
from crossmodal_kd.params import (
    Problem,
    check_params,
    check_values,
    checking_model,
    config_keys,
    given_values,
    params_class,
    params_model,
    renamed_keys,
    supplied,
    supplied_fields,
    use_registries,
)

T = TypeVar("T")


class RegistryError(KeyError):
    """Unknown or duplicate registry key; the message lists the valid keys."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class UnknownComponentError(RegistryError, ConfigError):
    """A config names an unknown component (e.g. ``router.name: gatee``); the message gives its path."""


class Registry(Generic[T]):
    """Name -> object map filled by a decorator.

    >>> ENCODERS = Registry("encoders")
    >>> @ENCODERS.register("tiny")
    ... def tiny(input_shape): ...
    """

    def __init__(self, kind: str, context: Iterable[str] = (), providers: Iterable[str] = ()) -> None:
        self.kind = kind
        self.context = frozenset(context)  # parameters the calling code supplies, never config keys
        self.providers = tuple(providers)  # modules whose import registers the built-in entries
        self._loaded = not self.providers
        self._items: dict[str, T] = {}
        self._types: dict[str, Mapping[str, Any]] = {}
        self._models: dict[str, Any] = {}

    def register(self, name: str | None = None, *, types: Mapping[str, Any] | None = None) -> Callable[[T], T]:
        """``types``: config types of parameters, for factories whose annotations we do not own."""

        def add(obj: T) -> T:
            key = name or getattr(obj, "__name__", None)
            if not key:
                raise RegistryError(f"{self.kind}: cannot infer a name for {obj!r}; pass one")
            if key in self._items and self._items[key] is not obj:
                raise RegistryError(
                    f"{self.kind}: '{key}' is already registered by {_where(self._items[key])}"
                )
            self._items[key] = obj
            self._types[key] = dict(types or {})
            self._models.pop(key, None)
            return obj

        return add

    def load(self) -> None:
        """Import the modules that register the built-in entries (once). Registries name their providers
        instead of importing them, so low layers (``models.io.load_model``) can build any saved component
        without importing the layers above them."""
        if not self._loaded:
            self._loaded = True
            for module in self.providers:
                importlib.import_module(module)

    def get(self, name: str) -> T:
        if name not in self._items:
            self.load()
        try:
            return self._items[name]
        except KeyError:
            raise RegistryError(
                f"unknown {self.kind} '{name}'; valid: {', '.join(sorted(self._items)) or '(none)'}"
            ) from None

    def build(self, name: str, options: Mapping[str, Any] | None = None, *, where: str = "", **context: Any) -> Any:
        """Call the registered factory with config ``options`` (keys checked, values validated and converted)
        plus the code-supplied ``context`` it names (all of it when it takes ``**kwargs``).

        A class that declares a :class:`~crossmodal_kd.params.Params` model is called as
        ``factory(<context it names>, params=<options validated by it>)``; any other factory as
        ``factory(<context it names>, **options)``, the options validated against its annotations. A parameter
        marked ``Supplied`` is filled from the context of that name unless the config gives it."""
        factory = self.get(name)
        options = dict(options or {})
        where = where or f"{self.kind}.{name}"
        accepted = _accepted(factory)
        model = params_class(factory)
        if model is not None:
            given = {k: v for k, v in context.items() if accepted is None or k in accepted}
            fillable = supplied_fields(model)
            fill = {k: v for k, v in context.items() if k in fillable and k not in options}
            params, problems = check_params(model, {**fill, **options})
            _raise(problems, where)
            return factory(**given, params=params)
        overridable = supplied(factory) & set(options)  # Supplied context the config gives itself
        given = {k: v for k, v in context.items() if (accepted is None or k in accepted) and k not in overridable}
        check_kwargs(factory, options, where=where, reserved=set(given))
        return factory(**given, **self._checked(name, options, where))

    def build_spec(self, spec: Any, *, where: str, **context: Any) -> Any:
        """:meth:`build` from a ``{name, params}`` spec (its shape checked here, once for every caller)."""
        if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str) or set(spec) - {"name", "params"}:
            raise ConfigError(f"{where}: expected {{name: <{self.kind}>, params: {{...}}}} with name one of {', '.join(self.list())}; got {spec!r}")
        params = spec.get("params") or {}
        if not isinstance(params, Mapping):
            raise ConfigError(f"{where}.params: should be a mapping (got {params!r})")
        return self.build(spec["name"], params, where=f"{where}.params", **context)

    def validate(self, name: str, options: Mapping[str, Any] | None = None, *, where: str = "") -> dict[str, Any]:
        """The checks of :meth:`build` without building (the registry's context parameters and those marked
        ``Supplied`` are not required), then the factory's own ``preflight(params, where)`` when it has one
        (a cheap resource check, e.g. that a database exists). Returns the converted options."""
        factory = self.get(name)
        options = dict(options or {})
        where = where or f"{self.kind}.{name}"
        if params_class(factory) is not None:
            params, problems = check_params(self._model(name), options)
            _raise(problems, where)
            values = given_values(params, options)
        else:
            optional = supplied(factory)
            check_kwargs(factory, options, where=where, reserved=set(self.context - optional), optional=optional)
            values = self._checked(name, options, where)
        hook = getattr(factory, "preflight", None)
        if callable(hook):
            hook(values, where)
        return values

    def problems(self, name: str, options: Mapping[str, Any]) -> list[Problem]:
        """What :meth:`validate` would reject in ``options`` (no hook), relative to them; ``name`` is registered."""
        factory = self._items[name]
        if params_class(factory) is not None:
            return check_params(self._model(name), options)[1]
        unknown, valid, missing = _kwargs_report(factory, options, reserved=set(self.context - supplied(factory)), optional=supplied(factory))
        out = []
        if unknown:
            out.append(Problem((), f"unknown parameter(s) {', '.join(unknown)}; valid: {', '.join(valid) or '(none)'}"))
        if missing:
            out.append(Problem((), f"missing required parameter(s) {', '.join(missing)}"))
        return out + check_values(self._model(name), options)[1]

    def _model(self, name: str) -> Any:
        """The pydantic model that validation without building checks options against: the factory's
        ``Params`` (its ``Supplied`` fields optional), or one made from its signature."""
        if name not in self._models:
            factory = self._items[name]
            declared = params_class(factory)
            if declared is not None:
                self._models[name] = checking_model(declared)
            else:
                skip = self.context - supplied(factory)
                self._models[name] = params_model(factory, skip=skip, types=self._types.get(name))
        return self._models[name]

    def _checked(self, name: str, options: dict[str, Any], where: str) -> dict[str, Any]:
        values, problems = check_values(self._model(name), options)
        _raise(problems, where)
        return values

    def list(self) -> list[str]:
        self.load()
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        if name not in self._items:
            self.load()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.list())


def check_kwargs(
    factory: Callable, params: Mapping[str, Any], *, where: str, reserved: set[str] = frozenset(), optional: set[str] = frozenset()
) -> None:
    """Raise a clear ``TypeError`` when ``params`` has keys the factory does not accept, or lacks a required
    one (but ``optional``)."""
    unknown, valid, missing = _kwargs_report(factory, params, reserved=reserved, optional=optional)
    if unknown:
        raise TypeError(f"{where}: unknown parameter(s) {', '.join(unknown)}; valid: {', '.join(valid) or '(none)'}")
    if missing:
        raise TypeError(f"{where}: missing required parameter(s) {', '.join(missing)}")


def _kwargs_report(
    factory: Callable, params: Mapping[str, Any], *, reserved: set[str], optional: set[str]
) -> tuple[list[str], list[str], list[str]]:
    """(unknown keys, valid keys, missing required keys) of ``params`` for ``factory`` (its ``Params`` fields,
    or its signature); renamed keys of a ``Params`` are left to its own error."""
    model = params_class(factory)
    if model is not None:
        valid = [k for k in config_keys(model) if k not in reserved]
        renamed = renamed_keys(model)
        unknown = sorted(set(params) - set(valid) - set(renamed))
        required = {f.alias or n for n, f in model.model_fields.items() if f.is_required()}
        optional = optional | supplied_fields(model)
        missing = [k for k in valid if k in required and k not in params and k not in optional]
        return unknown, valid, missing
    target = factory.__init__ if inspect.isclass(factory) else factory
    sig = inspect.signature(target)
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return [], [], []
    valid = [n for n, p in sig.parameters.items() if n not in ("self", *reserved) and p.kind is not p.VAR_POSITIONAL]
    unknown = sorted(set(params) - set(valid))
    missing = [
        n for n in valid
        if sig.parameters[n].default is inspect.Parameter.empty and n not in params and n not in optional
    ]
    return unknown, valid, missing


def _raise(problems: list[Problem], where: str) -> None:
    """One error, a line per problem (:class:`UnknownComponentError` when one names an unknown component)."""
    if problems:
        error = UnknownComponentError if any(p.unknown_name for p in problems) else ConfigError
        raise error("\n".join(p.line(where) for p in problems))


def _accepted(factory: Callable) -> set[str] | None:
    """The keyword parameters ``factory`` takes; ``None`` when it takes ``**kwargs``."""
    target = factory.__init__ if inspect.isclass(factory) else factory
    sig = inspect.signature(target)
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return None
    return {n for n, p in sig.parameters.items() if n != "self" and p.kind is not p.VAR_POSITIONAL}


def import_plugins(modules: list[str]) -> None:
    """Import user modules (dotted names or ``.py`` paths) so their ``@register`` decorators run."""
    import hashlib
    import sys
    from pathlib import Path

    for entry in modules:
        if entry.endswith(".py"):
            path = Path(entry).resolve()
            if not path.is_file():
                raise FileNotFoundError(f"imports: plugin file not found: {entry} (looked for {path})")
            # keyed by the full path: two plug-in files with the same name in different folders both load
            digest = hashlib.sha1(str(path).encode()).hexdigest()[:8]
            mod_name = f"crossmodal_kd_plugin_{path.stem}_{digest}"
            if mod_name in sys.modules:
                continue
            spec = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[mod_name] = module
            try:
                spec.loader.exec_module(module)
            except Exception as exc:
                del sys.modules[mod_name]  # a corrected file can be imported again in this process
                at = _raised_at(exc, str(path))
                raise ImportError(f"imports: {entry}{f' line {at[1]}' if at else ''}: {type(exc).__name__}: {exc}") from exc
        else:
            try:
                importlib.import_module(entry)
            except ModuleNotFoundError as exc:
                raise ModuleNotFoundError(f"imports: cannot import plugin module '{entry}': {exc}") from exc
            except Exception as exc:
                at = _raised_at(exc)
                raise ImportError(f"imports: {entry}{f' ({at[0]} line {at[1]})' if at else ''}: {type(exc).__name__}: {exc}") from exc


def _raised_at(exc: BaseException, filename: str | None = None) -> tuple[str, int] | None:
    """(file, line) where ``exc`` was raised in the plugin file ``filename`` (default: the module the import
    ran, the first file after this one in the traceback), or None."""
    import traceback
    from pathlib import Path

    if isinstance(exc, SyntaxError) and exc.lineno:
        return str(exc.filename), exc.lineno
    machinery = Path(importlib.__file__).parent
    frames = [
        f for f in traceback.extract_tb(exc.__traceback__)
        if not f.filename.startswith("<frozen") and Path(f.filename).parent != machinery
    ]
    if filename is None and len(frames) > 1:
        filename = frames[1].filename  # frames[0] is import_plugins
    lines = [f.lineno for f in frames if f.filename == filename]
    return (filename, lines[-1]) if lines else None


def _where(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


DATASETS: Registry = Registry("dataset", context=("root",), providers=("crossmodal_kd.data",))
ENCODERS: Registry = Registry("encoder", context=("input_shape",), providers=("crossmodal_kd.models",))
NETWORKS: Registry = Registry(
    "network", context=("input_shapes", "num_classes", "class_names"), providers=("crossmodal_kd.models", "crossmodal_kd.clip")
)
METHODS: Registry = Registry("method", context=("ctx",), providers=("crossmodal_kd.methods",))
ROUTERS: Registry = Registry(
    "router", context=("num_teachers", "num_classes", "feature_dim", "views", "class_names"),
    providers=("crossmodal_kd.models.routers", "crossmodal_kd.clip"),
)
MASKS: Registry = Registry("mask", context=("channels",), providers=("crossmodal_kd.models.masks",))
OPTIMIZERS: Registry = Registry("optimizer", context=("params",), providers=("crossmodal_kd.engine.optim",))
SCHEDULERS: Registry = Registry("scheduler", context=("optimizer", "total_steps"), providers=("crossmodal_kd.engine.optim",))
VIEWS: Registry = Registry("view", providers=("crossmodal_kd.data.views",))
CLIP_BACKENDS: Registry = Registry("clip backend", providers=("crossmodal_kd.clip",))
AUGMENTATIONS: Registry = Registry("augmentation", providers=("crossmodal_kd.data.augment",))

ALL_REGISTRIES = {
    "datasets": DATASETS,
    "encoders": ENCODERS,
    "networks": NETWORKS,
    "methods": METHODS,
    "routers": ROUTERS,
    "masks": MASKS,
    "optimizers": OPTIMIZERS,
    "schedulers": SCHEDULERS,
    "views": VIEWS,
    "clip_backends": CLIP_BACKENDS,
    "augmentations": AUGMENTATIONS,
}

use_registries(ALL_REGISTRIES)


def load_components() -> None:
    """Register every built-in component (each registry imports its providers)."""
    for registry in ALL_REGISTRIES.values():
        registry.load()
