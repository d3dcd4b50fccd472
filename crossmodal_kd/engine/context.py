"""What a method needs to build itself: the run's networks, the data's shapes, and trained models by reference."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from pydantic import ValidationError
from torch import nn

from crossmodal_kd.config import Component, ConfigError, ModelRef, RunConfig
from crossmodal_kd.io import atomic_torch_save
from crossmodal_kd.registry import ALL_REGISTRIES

MODEL_FILE_FORMAT = 1
# fast-dev-run bounds on build-time work (BuildContext.fast_dev_run): rows of the probe batch, batches
# of a training-split scan, and the per-method caps that go through BuildContext.bound
FAST_DEV_SAMPLES = 32
FAST_DEV_SCAN_BATCHES = 2


def stage_dir(run_dir: Path, stage: str) -> Path:
    return Path(run_dir) / "stages" / stage


def model_path(run_dir: Path, stage: str, model: str) -> Path:
    return stage_dir(run_dir, stage) / "models" / f"{model}.pt"


def attach_spec(module: nn.Module, registry: str, name: str, params: Mapping[str, Any], context: Mapping[str, Any]) -> nn.Module:
    """Remember how ``module`` was built so a saved file can rebuild it without the config."""
    module.build_spec = {"registry": registry, "name": name, "params": dict(params), "context": dict(context)}
    return module


def build_from_spec(spec: Mapping[str, Any], where: str) -> nn.Module:
    from crossmodal_kd import load_components  # a bare `load_model` in a fresh interpreter needs the registries

    load_components()
    registry = ALL_REGISTRIES[spec["registry"]]
    context = {k: (tuple(v) if isinstance(v, list) else v) for k, v in spec["context"].items()}
    if "input_shapes" in context:
        context["input_shapes"] = {m: tuple(s) for m, s in context["input_shapes"].items()}
    module = registry.build(spec["name"], spec["params"], where=where, **context)
    return attach_spec(module, spec["registry"], spec["name"], spec["params"], spec["context"])


def save_model(module: nn.Module, path: Path, state_dict: Mapping[str, torch.Tensor] | None = None) -> None:
    spec = getattr(module, "build_spec", None)
    if spec is None:
        raise TypeError(f"cannot save {type(module).__name__} to {path}: it was not built through a registry")
    state = {k: v.detach().cpu() for k, v in (state_dict or module.state_dict()).items()}
    atomic_torch_save({"format": MODEL_FILE_FORMAT, "spec": spec, "state_dict": state}, path)


def load_model(path: str | Path) -> nn.Module:
    """Rebuild a saved model from its file alone (teachers are loaded by path in later stages)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated/corrupt pickles
        raise RuntimeError(f"{path}: unreadable model file ({type(exc).__name__}: {exc})") from None
    if not isinstance(blob, dict) or blob.get("format") != MODEL_FILE_FORMAT:
        raise RuntimeError(f"{path}: not a crossmodal_kd model file (format {MODEL_FILE_FORMAT})")
    module = build_from_spec(blob["spec"], where=str(path))
    module.load_state_dict(blob["state_dict"])
    return module


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

        from crossmodal_kd.data import collate_batch

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
        from crossmodal_kd.models.networks import build_network

        spec = self.network_spec(name)
        params = dict(spec.params if params is None else params)
        context = {"input_shapes": self.input_shapes, "num_classes": self.num_classes}
        net = build_network(spec.name, params, self.input_shapes, self.num_classes, where=f"networks.{name}")
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
        """A CLIP backend ``{name, params}`` (at ``<where>.<key>``) with a ``{stage|path}`` reference in
        ``params.image_model`` resolved to the absolute path of an existing file, so the spec can be saved
        with a model and rebuilt from its file alone."""
        if not isinstance(backend, Mapping) or "name" not in backend or set(backend) - {"name", "params"}:
            raise ConfigError(f"{self.where}.{key}: expected {{name: <clip backend>, params: {{...}}}}, got {backend!r}")
        params = dict(backend.get("params") or {})
        if isinstance(params.get("image_model"), Mapping):
            path = self.resolve(params["image_model"], key=f"{key}.params.image_model")
            if not path.is_file():
                raise FileNotFoundError(f"{self.where}.{key}.params.image_model: {path} does not exist (has its stage run?)")
            params["image_model"] = str(Path(path).resolve())
        return {"name": backend["name"], "params": params}

    def load(self, ref: ModelRef | Mapping[str, Any], key: str = "model") -> nn.Module:
        path = self.resolve(ref, key)
        if not path.is_file():
            raise FileNotFoundError(f"{self.where}.{key}: model file {path} does not exist (has its stage run?)")
        module = load_model(path)
        module.source_ref = self.ref(ref, key).model_dump()  # which stage trained it (cross-fitting retrains that stage)
        return module
