"""Preflight: validate a whole run before any stage trains.

Every stage's method, optimizer and scheduler, every network under ``networks:`` (aliases included) and
``data.views`` are validated against their factories' typed signatures (:mod:`crossmodal_kd.params`),
nested components (routers, masks, encoders, augmentations) recursively; model references must name an
earlier stage of the run (or an existing file, unless the stage that reads it has already finished), a
``mask_stage`` an earlier ``mask`` stage, a network name an entry of ``networks:``; and a factory's own
``preflight(params, where)`` hook runs its cheap resource check (e.g. that WordNet is installed). So a
typo in the last stage fails in a second instead of after the others have trained.

:func:`check_trackers` (run when a run's accelerator is made, before anything is written) refuses an unknown
or uninstalled tracker under ``trackers:`` in one line with its install command.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable

from crossmodal_kd.config import Component, ConfigError, RunConfig
from crossmodal_kd.models.io import stage_dir
from crossmodal_kd.params import RunScope, checking
from crossmodal_kd.registry import (
    AUGMENTATIONS,
    METHODS,
    NETWORKS,
    OPTIMIZERS,
    SCHEDULERS,
    VIEWS,
    Registry,
    RegistryError,
    UnknownComponentError,
)


def preflight(cfg: RunConfig, run_dir: str | Path, *, resume: bool = False) -> None:
    """Raise the first problem as it is (one line), or a :class:`ConfigError` with one line per problem."""
    errors: list[Exception] = []

    def check(call: Callable[[], object]) -> None:
        try:
            call()
        except (ValueError, TypeError, KeyError, FileNotFoundError) as exc:  # ConfigError, RegistryError, ...
            errors.append(exc)

    scope = RunScope(
        stages=tuple(s.name for s in cfg.stages),
        methods={s.name: s.method.name for s in cfg.stages},
        networks=frozenset(cfg.networks),
    )
    with checking(scope):
        for name, spec in cfg.networks.items():
            if isinstance(spec, str):
                check(lambda name=name: _alias(cfg, name))
            else:
                check(lambda name=name, spec=spec: _component(NETWORKS, spec, f"networks.{name}"))
        for modality, spec in cfg.data.views.items():
            params = {k: v for k, v in spec.params.items() if k != "source"}  # the engine's, not the view's
            check(lambda spec=spec, params=params, modality=modality: _component(
                VIEWS, Component(name=spec.name, params=params), f"data.views.{modality}"))
    for i, stage in enumerate(cfg.stages):
        finished = resume and (stage_dir(Path(run_dir), stage.name) / "result.json").is_file()
        with checking(replace(scope, current=i, inputs_needed=not finished)):
            parts = ((METHODS, stage.method, "method"), (OPTIMIZERS, stage.optimizer, "optimizer"),
                     (SCHEDULERS, stage.scheduler, "scheduler"),
                     *((AUGMENTATIONS, spec, f"augment.{modality}") for modality, spec in stage.augment.items()))
            for registry, spec, key in parts:
                check(lambda registry=registry, spec=spec, key=key: _component(registry, spec, f"stages[{i}].{key}"))
    if len(errors) == 1:
        raise errors[0]
    if errors:
        error = UnknownComponentError if any(isinstance(e, RegistryError) for e in errors) else ConfigError
        lines = [line for e in errors for line in str(e).splitlines()]
        raise error(f"{len(lines)} problems in the config:\n  " + "\n  ".join(lines))


TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "aim": "aim", "trackio": "trackio"}
"""Trackers a run may name under ``trackers:`` -> the pip package that provides it."""


def check_trackers(names: list[str]) -> list[str]:
    """``names`` without repeats, each a known tracker that Accelerate finds installed; else a one-line
    :class:`ConfigError` naming it (and its install command)."""
    from accelerate.tracking import get_available_trackers

    installed = {str(t) for t in get_available_trackers()}
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"trackers: unknown tracker '{name}'; valid: {', '.join(TRACKERS)} (or [] for none)")
        if name not in installed:
            raise ConfigError(f"trackers: '{name}' is not installed; pip install {TRACKERS[name]} (or remove it from trackers)")
    return list(dict.fromkeys(names))


def _component(registry: Registry, spec: Component, where: str) -> None:
    if spec.name not in registry:
        raise UnknownComponentError(f"{where}.name: unknown {registry.kind} '{spec.name}'; valid: {', '.join(registry.list())}")
    registry.validate(spec.name, spec.params, where=f"{where}.params")


def _alias(cfg: RunConfig, name: str) -> None:
    """The alias ``networks.<name>`` leads to a definition."""
    try:
        cfg.network(name)
    except ConfigError as exc:
        raise ConfigError(f"networks.{name}: {str(exc).removeprefix('networks: ')}") from None
