"""One generic registry for every pluggable concept (datasets, encoders, networks, methods, ...)."""

from __future__ import annotations

import inspect
from typing import Any, Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class RegistryError(KeyError):
    """Unknown or duplicate registry key; the message lists the valid keys."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class Registry(Generic[T]):
    """Name -> object map filled by a decorator.

    >>> ENCODERS = Registry("encoders")
    >>> @ENCODERS.register("tiny")
    ... def tiny(input_shape): ...
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str | None = None) -> Callable[[T], T]:
        def add(obj: T) -> T:
            key = name or getattr(obj, "__name__", None)
            if not key:
                raise RegistryError(f"{self.kind}: cannot infer a name for {obj!r}; pass one")
            if key in self._items and self._items[key] is not obj:
                raise RegistryError(
                    f"{self.kind}: '{key}' is already registered by {_where(self._items[key])}"
                )
            self._items[key] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise RegistryError(
                f"unknown {self.kind} '{name}'; valid: {', '.join(sorted(self._items)) or '(none)'}"
            ) from None

    def build(self, name: str, options: dict[str, Any] | None = None, *, where: str = "", **context: Any) -> Any:
        """Call the registered factory with config ``options`` plus code-supplied ``context``, checking keys first."""
        factory = self.get(name)
        options = dict(options or {})
        check_kwargs(factory, options, where=where or f"{self.kind}.{name}", reserved=set(context))
        return factory(**context, **options)

    def list(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.list())


def check_kwargs(factory: Callable, params: dict[str, Any], *, where: str, reserved: set[str] = frozenset()) -> None:
    """Raise a clear ``TypeError`` when ``params`` has keys the factory does not accept."""
    target = factory.__init__ if inspect.isclass(factory) else factory
    sig = inspect.signature(target)
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return
    valid = [n for n, p in sig.parameters.items() if n not in ("self", *reserved) and p.kind is not p.VAR_POSITIONAL]
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise TypeError(f"{where}: unknown parameter(s) {', '.join(unknown)}; valid: {', '.join(valid) or '(none)'}")
    missing = [
        n for n in valid if sig.parameters[n].default is inspect.Parameter.empty and n not in params
    ]
    if missing:
        raise TypeError(f"{where}: missing required parameter(s) {', '.join(missing)}")


def import_plugins(modules: list[str]) -> None:
    """Import user modules (dotted names or ``.py`` paths) so their ``@register`` decorators run."""
    import hashlib
    import importlib.util
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
            spec.loader.exec_module(module)
        else:
            try:
                importlib.import_module(entry)
            except ModuleNotFoundError as exc:
                raise ModuleNotFoundError(f"imports: cannot import plugin module '{entry}': {exc}") from exc


def _where(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


DATASETS: Registry = Registry("dataset")
ENCODERS: Registry = Registry("encoder")
NETWORKS: Registry = Registry("network")
METHODS: Registry = Registry("method")
ROUTERS: Registry = Registry("router")
MASKS: Registry = Registry("mask")
LOSSES: Registry = Registry("loss")
OPTIMIZERS: Registry = Registry("optimizer")
SCHEDULERS: Registry = Registry("scheduler")
VIEWS: Registry = Registry("view")
CLIP_BACKENDS: Registry = Registry("clip backend")
AUGMENTATIONS: Registry = Registry("augmentation")

ALL_REGISTRIES = {
    "datasets": DATASETS,
    "encoders": ENCODERS,
    "networks": NETWORKS,
    "methods": METHODS,
    "routers": ROUTERS,
    "masks": MASKS,
    "losses": LOSSES,
    "optimizers": OPTIMIZERS,
    "schedulers": SCHEDULERS,
    "views": VIEWS,
    "clip_backends": CLIP_BACKENDS,
    "augmentations": AUGMENTATIONS,
}
