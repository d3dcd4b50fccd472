"""Typed, range-checked parameters of registered factories.

A factory keeps a plain Python signature whose annotations carry each parameter's config type and range::

    def __init__(self, ctx, student: NetworkName, teacher: ModelRefSpec, tau: PositiveFloat = 4.0,
                 router: RouterSpec | None = None): ...

:class:`~crossmodal_kd.registry.Registry` turns the signature into a pydantic model once per factory and
validates config values against it before calling the factory (YAML's ``"2e-3"`` arrives as a float);
every problem becomes one line ``<config path>: <message> (got <value>)``. Unannotated parameters are
``Any``. Nested components (``RouterSpec``, ...) are checked recursively against their registry.
Inside :func:`checking` (the run preflight), references are also checked against the run: a model
reference or stage name must name an earlier stage, a network name an entry of ``networks:``.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator, Mapping, Optional

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, create_model
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


def problems_of(exc: ValidationError) -> list[Problem]:
    out = []
    for e in exc.errors():
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
