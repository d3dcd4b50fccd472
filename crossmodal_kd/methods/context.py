"""What a method needs to build itself: the run's networks, the data's shapes, and trained models by reference."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from pydantic import ValidationError
from torch import nn

from crossmodal_kd.config import Component, ConfigError, ModelRef, RunConfig
from crossmodal_kd.data import collate_batch
from crossmodal_kd.models.io import attach_spec, load_model, model_path, stage_dir, stage_result_of
from crossmodal_kd.models.networks import build_network

# fast-dev-run bounds on build-time work (BuildContext.fast_dev_run): rows of the probe batch, batches
# of a training-split scan, and the per-method caps that go through BuildContext.bound
FAST_DEV_SAMPLES = 32
FAST_DEV_SCAN_BATCHES = 2


@dataclass
class BuildContext:
    """Handed to every method constructor."""

    config: RunConfig
    run_dir: Path
    input_shapes: dict[str, tuple[int, ...]]
    num_classes: int
    sample_batch: dict[str, torch.Tensor] = field(repr=False)
    where: str = ""
    num_train: int = 0  # size of the training split (memory banks)
    class_names: list[str] = field(default_factory=list)  # the dataset's, index = label
    train_data: Any = field(default=None, repr=False)  # the training split (methods that scan it once)
    views: Any = field(default=None, repr=False)  # the run's ViewSet (batch -> batch), applied by train_batches
    fast_dev_run: bool = False  # a plumbing check: build-time work is bounded (sample_batch, train_batches, bound)

    def __post_init__(self) -> None:
        if self.fast_dev_run:
            self.sample_batch = {k: v[:FAST_DEV_SAMPLES] for k, v in self.sample_batch.items()}

    def bound(self, value: int | None, fast: int) -> int | None:
        """``value`` (``None``: unbounded), capped at ``fast`` in a fast-dev-run: the number of passes,
        iterations or items a method's build-time work may use."""
        if not self.fast_dev_run:
            return value
        return fast if value is None else min(value, fast)

    def train_batches(self, batch_size: int = 512) -> Iterator[dict[str, torch.Tensor]]:
        """The whole training split in order (no shuffling, no augmentation), views applied, on the CPU:
        for methods that summarise the training set when they are built (e.g. image-aware noun filtering).
        A fast-dev-run reads ``FAST_DEV_SCAN_BATCHES`` batches of at most ``FAST_DEV_SAMPLES`` rows."""
        if self.train_data is None:
            raise ConfigError(f"{self.where}: this method scans the training split, which the build context lacks")
        from torch.utils.data import DataLoader

        batch_size = self.bound(batch_size, FAST_DEV_SAMPLES)
        loader = DataLoader(self.train_data, batch_size=batch_size, shuffle=False, collate_fn=collate_batch)
        for i, batch in enumerate(loader):
            if self.fast_dev_run and i >= FAST_DEV_SCAN_BATCHES:
                return
            yield self.views(batch) if self.views is not None else batch

    def network_spec(self, name: str) -> Component:
        """The definition of ``networks.<name>`` (aliases followed); errors name the stage."""
        try:
            return self.config.network(name)
        except ConfigError as exc:
            raise ConfigError(f"{self.where}: {exc}") from None

    def network(self, name: str, params: Mapping[str, Any] | None = None) -> nn.Module:
        """A freshly initialised network from the run's ``networks:`` section; ``params`` replace the
        configured ones (for methods that resolve references in them first). The saved file records
        the params it was built with."""
        spec = self.network_spec(name)
        params = self.resolve_references(dict(spec.params if params is None else params), f"networks.{name}.params")
        context = {"input_shapes": self.input_shapes, "num_classes": self.num_classes, "class_names": list(self.class_names)}
        net = build_network(spec.name, params, self.input_shapes, self.num_classes, where=f"networks.{name}", class_names=self.class_names)
        return attach_spec(net, "networks", spec.name, params, context)

    def ref(self, value: Any, key: str) -> ModelRef:
        try:
            return value if isinstance(value, ModelRef) else ModelRef.model_validate(value)
        except ValidationError as exc:
            msg = "; ".join(e["msg"] for e in exc.errors())
            raise ConfigError(f"{self.where}.{key}: invalid model reference {value!r}: {msg}") from None

    def resolve(self, ref: ModelRef | Mapping[str, Any], key: str = "model") -> Path:
        ref = self.ref(ref, key)
        if ref.path is not None:
            return Path(ref.path)
        names = [s.name for s in self.config.stages]
        if ref.stage not in names:
            raise ConfigError(f"{self.where}.{key}: no stage named '{ref.stage}'; stages: {', '.join(names)}")
        return model_path(self.run_dir, ref.stage, ref.model)

    def backend_spec(self, backend: Any, key: str = "backend") -> dict[str, Any]:
        """A CLIP backend ``{name, params}`` (at ``<where>.<key>``) with its model references resolved to files
        (:meth:`resolve_references`), so the spec can be saved with a model and rebuilt from its file alone."""
        if not isinstance(backend, Mapping) or "name" not in backend or set(backend) - {"name", "params"}:
            raise ConfigError(f"{self.where}.{key}: expected {{name: <clip backend>, params: {{...}}}}, got {backend!r}")
        return {"name": backend["name"], "params": self.resolve_references(dict(backend.get("params") or {}), f"{key}.params")}

    def resolve_references(self, value: Any, key: str) -> Any:
        """``value`` with every model reference inside it (a mapping of only ``stage``/``model``/``path`` keys,
        e.g. a backend's ``image_model: {stage: align}``) replaced by the absolute path of its existing file:
        what a network's or backend's saved spec must hold to load without the config."""
        if isinstance(value, Mapping):
            if value and set(value) <= {"stage", "model", "path"} and ({"stage", "path"} & set(value)):
                path = self.resolve(value, key=key)
                if not path.is_file():
                    raise FileNotFoundError(f"{self.where}.{key}: {path} does not exist (has its stage run?)")
                return str(Path(path).resolve())
            return {k: self.resolve_references(v, f"{key}.{k}") for k, v in value.items()}
        if isinstance(value, list):
            return [self.resolve_references(v, f"{key}[{i}]") for i, v in enumerate(value)]
        return value

    def model_record(self, ref: ModelRef | Mapping[str, Any], key: str = "model") -> dict[str, Any]:
        """What the stage that trained a referenced model recorded about it (``result.json``: ``val`` and
        ``test`` metrics, parameters), for a ``{stage, model}`` of this run or a ``{path}`` inside another
        run's ``stages/<stage>/models/`` folder. Errors name ``<where>.<key>``."""
        ref = self.ref(ref, key)
        if ref.stage is not None:
            result, model = stage_dir(self.run_dir, ref.stage) / "result.json", ref.model
        else:
            result, model = stage_result_of(Path(ref.path)), Path(ref.path).stem
        if result is None or not result.is_file():
            raise FileNotFoundError(f"{self.where}.{key}: no result.json recorded for {ref.path or ref.stage} "
                                    f"(looked for {result or 'a stages/<stage>/models/ folder around the file'})")
        try:
            return dict(json.loads(result.read_text())["models"][model])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{self.where}.{key}: {result} has no record of model '{model}' ({exc})") from None

    def load(self, ref: ModelRef | Mapping[str, Any], key: str = "model") -> nn.Module:
        path = self.resolve(ref, key)
        if not path.is_file():
            raise FileNotFoundError(f"{self.where}.{key}: model file {path} does not exist (has its stage run?)")
        module = load_model(path)
        module.source_ref = self.ref(ref, key).model_dump()  # which stage trained it (cross-fitting retrains that stage)
        return module

    def class_names_or(self, override: list[str] | tuple[str, ...] | None, key: str = "class_names") -> list[str]:
        """``override`` (a method's ``<key>`` parameter) when given, else the dataset's class names: one per
        class, or a ``ConfigError`` that says to set ``<key>``."""
        names = list(override or self.class_names)
        if len(names) != self.num_classes:
            raise ConfigError(f"{self.where}: {len(names)} class names for {self.num_classes} classes; set {key} to one name per class")
        return names
