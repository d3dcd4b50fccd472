"""Typed, range-checked parameters of registered factories.

A factory states its parameters' config types and ranges in one of two ways. A registered class may
declare a nested :class:`Params` model; subclasses inherit and extend it (every KD method's
``Distiller.Params``)::

    class DKD(Distiller):
        class Params(Distiller.Params):        # student, teacher, student_init, tau, w_ce, w_kd, plus:
            w_tckd: NonNegativeFloat = 1.0
            w_kd: NonNegativeFloat = 0.0       # a default of the base, overridden
            renamed: ClassVar[dict[str, str]] = {"alpha": "w_tckd"}  # old key -> an error naming the new one

        def __init__(self, ctx, params: DKD.Params): ...

:class:`~crossmodal_kd.registry.Registry` validates the config options against it once and calls
``factory(<context it names>, params=<the Params instance>)``. Any other factory keeps a plain Python
signature whose annotations carry the types (encoders, networks, routers, masks, optimizers)::

    def small_cnn(input_shape, channels: list[PositiveInt] = ..., dropout: Fraction = 0.0): ...

and the registry turns the signature into a pydantic model once per factory. Either way config values are
converted before the factory sees them (YAML's ``"2e-3"`` arrives as a float) and every problem becomes
one line ``<config path>: <message> (got <value>)``. Unannotated parameters are ``Any``. Nested components
(``RouterSpec``, ...) are checked recursively against their registry. Inside :func:`checking` (the run
preflight), references are also checked against the run: a model reference or stage name must name an
earlier stage, a network name an entry of ``networks:``.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Callable, ClassVar, Iterator, Mapping, Optional

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    model_validator,
)
from pydantic_core import PydanticCustomError

from crossmodal_kd.config import ModelRef

PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
Probability = Annotated[float, Field(ge=0, le=1)]
"""``[0, 1]``: probabilities, fractions of a run or of a size."""
Fraction = Annotated[float, Field(ge=0, lt=1)]
"""``[0, 1)``: dropout rates, momentum."""
PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]


class Supplied:
    """Marks a required parameter that the calling code fills in when the config leaves it out (e.g. the
    dataset's class names): ``Annotated[Sequence[str], Supplied()]``. Validation without building does
    not ask the config for it."""


NOTHING: Any = object()


@dataclass(frozen=True)
class Problem:
    """One bad value: where (relative to the options checked), what is wrong, and the value given."""

    loc: tuple[str | int, ...]
    message: str
    value: Any = NOTHING
    unknown_name: bool = False  # an unknown registry name (callers may catch it as a KeyError)

    def at(self, *prefix: str | int) -> "Problem":
        return Problem((*prefix, *self.loc), self.message, self.value, self.unknown_name)

    def line(self, where: str) -> str:
        got = "" if self.value is NOTHING else f" (got {self.value!r})"
        return f"{join_path(where, self.loc)}: {self.message}{got}"


def join_path(where: str, loc: tuple[str | int, ...]) -> str:
    """``join_path("stages[1].method.params", ("teachers", 0, "model"))`` -> ``...params.teachers[0].model``."""
    out = where
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# ----------------------------------------------------------------------------- models from signatures

_CONFIG = ConfigDict(extra="ignore", arbitrary_types_allowed=True, validate_default=False)


def parameters(factory: Callable) -> list[inspect.Parameter]:
    """The keyword parameters of ``factory`` (a function or a class), string annotations resolved where possible."""
    target = factory.__init__ if inspect.isclass(factory) else factory
    try:
        sig = inspect.signature(target, eval_str=True)
    except Exception:  # some annotation names what the module lacks at run time: resolve the others one by one
        sig = inspect.signature(target)
        scope = getattr(inspect.unwrap(target), "__globals__", {})
        sig = sig.replace(parameters=[p.replace(annotation=_evaluate(p.annotation, scope)) for p in sig.parameters.values()])
    return [
        p for name, p in sig.parameters.items()
        if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]


def _evaluate(annotation: Any, scope: dict[str, Any]) -> Any:
    if not isinstance(annotation, str):
        return annotation
    try:
        return eval(annotation, scope)  # noqa: S307 -- what inspect.signature(eval_str=True) does, per parameter
    except Exception:
        return inspect.Parameter.empty


def supplied(factory: Callable) -> set[str]:
    """Parameters marked :class:`Supplied`."""
    return {
        p.name for p in parameters(factory)
        if any(isinstance(m, Supplied) for m in getattr(p.annotation, "__metadata__", ()))
    }


def params_model(
    factory: Callable, skip: set[str] | frozenset[str] = frozenset(), types: Mapping[str, Any] | None = None
) -> type[BaseModel]:
    """A pydantic model of ``factory``'s parameters (but ``skip``), every field optional; ``types``
    override annotations (for third-party factories such as torch optimizers)."""
    fields: dict[str, Any] = {}
    for p in parameters(factory):
        if p.name in skip:
            continue
        annotation = (types or {}).get(p.name, p.annotation)
        fields[f"p_{p.name}"] = (_usable(annotation), Field(None, alias=p.name))
    return create_model(f"{getattr(factory, '__name__', 'factory')}_params", __config__=_CONFIG, **fields)


def _usable(annotation: Any) -> Any:
    """``annotation`` when pydantic can validate it, else ``Any`` (unannotated, unresolved or exotic)."""
    if annotation is inspect.Parameter.empty or isinstance(annotation, str):
        return Any
    try:
        create_model("probe", __config__=_CONFIG, value=(annotation, None))
    except Exception:
        return Any
    return annotation


def check_values(model: type[BaseModel], options: Mapping[str, Any]) -> tuple[dict[str, Any], list[Problem]]:
    """``options`` with every declared parameter converted by ``model``, and the problems found."""
    try:
        checked = model.model_validate(dict(options))
    except ValidationError as exc:
        return dict(options), problems_of(exc)
    return {k: getattr(checked, f"p_{k}") if f"p_{k}" in model.model_fields else v for k, v in options.items()}, []


def problems_of(exc: ValidationError | list[dict[str, Any]]) -> list[Problem]:
    """One :class:`Problem` per pydantic error (of ``exc`` or a list of its errors)."""
    out = []
    for e in exc.errors() if isinstance(exc, ValidationError) else exc:
        # union members and validator functions appear in the location as e.g. "function-after[...]"
        loc = tuple(p for p in e["loc"] if isinstance(p, int) or "[" not in p)
        ctx = e.get("ctx") or {}
        if e["type"] == "nested":
            out += [p.at(*loc) for p in ctx["problems"]]
        elif e["type"] == "reference":
            out.append(Problem(loc, e["msg"]))
        else:
            out.append(Problem(loc, e["msg"], e.get("input", NOTHING)))
    return out


def _nested(problems: list[Problem]) -> PydanticCustomError:
    return PydanticCustomError("nested", "{count} problem(s)", {"count": len(problems), "problems": problems})


def _reference(message: str) -> PydanticCustomError:
    return PydanticCustomError("reference", "{message}", {"message": message})


# ----------------------------------------------------------------------------- declared parameter models


class Params(BaseModel):
    """Base of the parameters a registered class declares as a nested ``class Params(...)``.

    Fields are the config keys, with their types, ranges and defaults; unknown keys are rejected. A field
    marked ``Annotated[..., Supplied()]`` may be filled by the calling code (the registry's context of
    that name) when the config leaves it out. ``renamed`` maps former keys to their new names (collected
    along the class hierarchy): a config that still uses one fails as ``<path>.<old>: renamed to <new>``.
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, protected_namespaces=())

    renamed: ClassVar[dict[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _renamed_keys(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            renamed = renamed_keys(cls)
            old = [k for k in data if k in renamed and k not in cls.model_fields]
            if old:
                raise _nested([Problem((k,), f"renamed to {renamed[k]}") for k in old])
        return data


def renamed_keys(model: type[Params]) -> dict[str, str]:
    """Former config key -> its new name, over ``model``'s class hierarchy (a subclass's entries win)."""
    out: dict[str, str] = {}
    for cls in reversed(model.__mro__):
        out.update(vars(cls).get("renamed") or {})
    return out


def params_class(factory: Any) -> type[Params] | None:
    """The :class:`Params` model a registered class declares (or inherits), else ``None``."""
    model = getattr(factory, "Params", None) if inspect.isclass(factory) else None
    return model if inspect.isclass(model) and issubclass(model, Params) else None


def config_keys(model: type[BaseModel]) -> list[str]:
    """The config keys of ``model``'s fields, in declaration order (base classes' first)."""
    return [f.alias or name for name, f in model.model_fields.items()]


def _is_supplied(info: Any) -> bool:
    return any(isinstance(m, Supplied) for m in info.metadata)


def supplied_fields(model: type[Params]) -> set[str]:
    """Fields marked :class:`Supplied` (by config key)."""
    return {f.alias or name for name, f in model.model_fields.items() if _is_supplied(f)}


def checking_model(model: type[Params]) -> type[Params]:
    """``model`` with its :class:`Supplied` fields optional: what validation without building checks."""
    supplied = {name for name, f in model.model_fields.items() if _is_supplied(f)}
    if not supplied:
        return model
    fields: dict[str, Any] = {
        name: (Optional[Annotated[(f.annotation, *f.metadata)]], Field(None, alias=f.alias))
        for name, f in model.model_fields.items() if name in supplied
    }
    return create_model(f"{model.__qualname__}_check", __base__=model, __module__=model.__module__, **fields)


def check_params(model: type[Params], options: Mapping[str, Any]) -> tuple[Params | None, list[Problem]]:
    """``options`` validated by ``model``: the instance (``None`` when there are problems) and the problems,
    unknown keys in one line that lists the valid ones, missing required keys in another, then one line per
    bad value, relative to ``options``."""
    try:
        return model.model_validate(dict(options)), []
    except ValidationError as exc:
        errors = exc.errors()
    top = [e for e in errors if len(e["loc"]) == 1]
    unknown = sorted(str(e["loc"][0]) for e in top if e["type"] == "extra_forbidden")
    missing = [str(e["loc"][0]) for e in top if e["type"] == "missing"]
    rest = [e for e in errors if not (e in top and e["type"] in ("extra_forbidden", "missing"))]
    problems = []
    if unknown:
        valid = ", ".join(config_keys(model)) or "(none)"
        problems.append(Problem((), f"unknown parameter(s) {', '.join(unknown)}; valid: {valid}"))
    if missing:
        problems.append(Problem((), f"missing required parameter(s) {', '.join(missing)}"))
    return None, problems + problems_of(rest)


def given_values(instance: BaseModel, options: Mapping[str, Any]) -> dict[str, Any]:
    """The validated values of the keys given in ``options``, by config key."""
    names = {f.alias or name: name for name, f in type(instance).model_fields.items()}
    return {k: getattr(instance, names[k]) for k in options if k in names}


# ----------------------------------------------------------------------------- nested components


_REGISTRIES: dict[str, Any] = {}  # kind -> Registry, filled by crossmodal_kd.registry (which imports this module)


def use_registries(registries: Mapping[str, Any]) -> None:
    """Where :func:`component` types look their registry up (``crossmodal_kd.registry`` calls it once)."""
    _REGISTRIES.update(registries)


def _check_component(kind: str, value: Mapping[str, Any]) -> Mapping[str, Any]:
    registry = _REGISTRIES[kind]
    problems: list[Problem] = []
    valid = ", ".join(registry.list())
    extra = sorted(map(str, set(value) - {"name", "params"}))
    if extra:
        problems.append(Problem((), f"unknown key(s) {', '.join(extra)}; expected {{name: <{registry.kind}>, params: {{...}}}}"))
    name = value.get("name")
    params = value.get("params") or {}
    if not isinstance(name, str):
        problems.append(Problem(("name",), f"give a {registry.kind} name; valid: {valid}", value.get("name", NOTHING)))
    elif name not in registry:
        problems.append(Problem(("name",), f"unknown {registry.kind} '{name}'; valid: {valid}", unknown_name=True))
    elif not isinstance(params, Mapping):
        problems.append(Problem(("params",), "should be a mapping", params))
    else:
        problems += [p.at("params") for p in registry.problems(name, params)]
    if problems:
        raise _nested(problems)
    return value


def component(kind: str) -> Any:
    """The type of a ``{name, params}`` spec of a component of ``ALL_REGISTRIES[kind]``, checked recursively
    (handed on as given)."""
    return Annotated[dict[str, Any], AfterValidator(partial(_check_component, kind))]


RouterSpec = component("routers")
MaskSpec = component("masks")
EncoderSpec = component("encoders")
AugmentationSpec = component("augmentations")


def record(title: str, /, **fields: Any) -> Any:
    """The type of a mapping whose keys ``fields`` are typed (each optional); other keys are left to the
    factory's own checks. Handed on as a plain dict with the keys given."""
    model = create_model(
        title,
        __config__=ConfigDict(extra="allow", arbitrary_types_allowed=True),
        **{f"f_{k}": (Optional[t], Field(None, alias=k)) for k, t in fields.items()},
    )

    def to_dict(m: BaseModel) -> dict[str, Any]:
        given = {f.alias: getattr(m, k) for k, f in type(m).model_fields.items() if k in m.model_fields_set}
        return {**given, **(m.model_extra or {})}

    return Annotated[model, AfterValidator(to_dict)]


# ----------------------------------------------------------------------------- references within a run


@dataclass(frozen=True)
class RunScope:
    """What references may point at while the preflight checks one part of a run's config."""

    stages: tuple[str, ...] = ()
    methods: Mapping[str, str] = field(default_factory=dict)  # stage -> method name
    networks: frozenset[str] = frozenset()
    current: int | None = None  # the stage being checked (references must name earlier ones); None: not a stage
    inputs_needed: bool = True  # False when the current stage has already finished (resume): nothing is read

    def stage_problem(self, stage: str, method: str | None = None) -> str | None:
        if stage not in self.stages:
            return f"no stage named '{stage}'; stages: {', '.join(self.stages)}"
        if self.current is not None and self.stages.index(stage) >= self.current:
            return f"stage '{stage}' does not run before stage '{self.stages[self.current]}'; only earlier stages can be used"
        if method is not None and self.methods.get(stage) != method:
            return f"stage '{stage}' is a '{self.methods.get(stage)}' stage, not '{method}'"
        return None


_SCOPE: ContextVar[RunScope | None] = ContextVar("crossmodal_kd_run_scope", default=None)


@contextmanager
def checking(scope: RunScope) -> Iterator[None]:
    """Check references against ``scope`` while validating inside the block."""
    token = _SCOPE.set(scope)
    try:
        yield
    finally:
        _SCOPE.reset(token)


def _check_model_ref(value: Any) -> Any:
    try:
        ref = value if isinstance(value, ModelRef) else ModelRef.model_validate(value)
    except ValidationError as exc:
        raise _nested(problems_of(exc)) from None
    scope = _SCOPE.get()
    if scope is not None:
        if ref.stage is not None and (msg := scope.stage_problem(ref.stage)):
            raise _reference(msg)
        if ref.path is not None and scope.inputs_needed and not Path(ref.path).is_file():
            raise _reference(f"model file {ref.path} does not exist")
    return value


def _check_stage(method: str | None, value: str) -> str:
    scope = _SCOPE.get()
    if scope is not None and (msg := scope.stage_problem(value, method)):
        raise _reference(msg)
    return value


def _check_network(value: str) -> str:
    scope = _SCOPE.get()
    if scope is not None and value not in scope.networks:
        raise _reference(f"unknown network '{value}'; defined under networks: {', '.join(sorted(scope.networks)) or '(none)'}")
    return value


ModelRefSpec = Annotated[Any, AfterValidator(_check_model_ref)]
"""A trained model: ``{stage: <earlier stage>, model: <name>}`` or ``{path: <file.pt>}`` (handed on as given)."""
MaskStage = Annotated[str, AfterValidator(partial(_check_stage, "mask"))]
"""An earlier stage of the ``mask`` method."""
NetworkName = Annotated[str, AfterValidator(_check_network)]
"""A name under the run's ``networks:``."""
TeacherEntry = record("TeacherEntry", name=str, model=ModelRefSpec, mask_stage=MaskStage, val_accuracy=Probability)
"""An entry of a ``teachers`` list (``mst_distill``, ``multi_kd``): the keys these methods read, typed; which
keys an entry may have is the method's own check."""
