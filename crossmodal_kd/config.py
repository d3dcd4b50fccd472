"""Run configuration: YAML -> typed, validated schema. Unknown keys are errors that name their path."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A configuration problem; the message names the file and the key path."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class Component(Strict):
    """A registry name plus the keyword arguments for its factory."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)


class ModelRef(Strict):
    """Where a trained model comes from: a stage of this run, or a checkpoint file of another run."""

    stage: str | None = None
    model: str = "model"
    path: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> "ModelRef":
        if (self.stage is None) == (self.path is None):
            raise ValueError("give exactly one of 'stage' (a stage of this run) or 'path' (a model file)")
        return self


class DataConfig(Strict):
    name: str = "avdigits"
    root: str = "data"
    params: dict[str, Any] = Field(default_factory=dict)
    batch_size: int = Field(128, gt=0, description="global batch size, split across processes")
    eval_batch_size: int = Field(512, gt=0)
    num_workers: int = Field(0, ge=0)
    pin_memory: bool = True
    views: dict[str, Component] = Field(
        default_factory=dict, description="derived modalities: {new_modality: {name: view, params: {source, ...}}}"
    )


class AcceleratorConfig(Strict):
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_accumulation_steps: int = Field(1, ge=1)
    cpu: bool = False
    find_unused_parameters: bool = True
    keep_checkpoints: int = Field(2, ge=1, description="epoch checkpoints kept per stage")
    channels_last: bool = Field(
        False, description="4-D weights in NHWC layout: faster convolutions on CPUs (oneDNN) and tensor-core GPUs; same model, "
        "float rounding aside (encoders must reshape, not .view(), conv outputs)"
    )


class SelectionConfig(Strict):
    """Model selection on the validation split (never on test)."""

    metric: Literal["accuracy", "macro_f1", "loss"] = "accuracy"

    @property
    def mode(self) -> str:
        return "min" if self.metric == "loss" else "max"


class TargetsConfig(Strict):
    """How a stage's frozen teachers are run (see :mod:`crossmodal_kd.targets`)."""

    store: bool = Field(True, description="compute frozen teachers' outputs once per sample and serve them by index")
    cross_fit: int | None = Field(
        None, ge=2, description="K: training-split targets out of fold, from K copies of each teacher's stage"
    )


def folder_name(value: str, what: str) -> str:
    """``value`` when it is usable as a folder name (letters, digits, '-', '_'); else ValueError naming ``what``."""
    if not value or not all(c.isalnum() or c in "-_" for c in value):
        raise ValueError(f"{what} '{value}' must be non-empty and use only letters, digits, '-' and '_'")
    return value


class StageConfig(Strict):
    name: str
    method: Component
    epochs: int = Field(10, ge=1)
    optimizer: Component = Field(default_factory=lambda: Component(name="adamw", params={"lr": 1e-3}))
    scheduler: Component = Field(default_factory=lambda: Component(name="cosine"))
    grad_clip_norm: float | None = Field(None, gt=0)
    select: SelectionConfig = Field(default_factory=SelectionConfig)
    targets: TargetsConfig = Field(default_factory=TargetsConfig)
    augment: dict[str, Component] = Field(
        default_factory=dict,
        description="training-batch augmentations {modality: {name, params}} (AUGMENTATIONS), applied by the engine after the views",
    )

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        return folder_name(v, "stage name")


class RunConfig(Strict):
    imports: list[str] = Field(default_factory=list, description="user modules/files that register components")
    seed: int = 0
    output_dir: str | None = None
    data: DataConfig = Field(default_factory=DataConfig)
    accelerator: AcceleratorConfig = Field(default_factory=AcceleratorConfig)
    networks: dict[str, Component | str] = Field(
        default_factory=dict, description="network definitions; a string value is an alias of another entry"
    )
    stages: list[StageConfig] = Field(min_length=1)
    trackers: list[str] = Field(
        default_factory=lambda: ["tensorboard"],
        description="experiment trackers through Accelerate: tensorboard, wandb, mlflow, aim, trackio; [] for none",
    )

    @model_validator(mode="after")
    def _unique_stage_names(self) -> "RunConfig":
        seen: set[str] = set()
        for stage in self.stages:
            if stage.name in seen:
                raise ValueError(f"duplicate stage name '{stage.name}'")
            seen.add(stage.name)
        return self

    def network(self, name: str) -> Component:
        """The network definition for ``name``, following aliases (``student: audio_net``)."""
        seen = []
        while isinstance(value := self.networks.get(name), str):
            if name in seen:
                raise ConfigError(f"networks: alias cycle {' -> '.join(seen + [name])}")
            seen.append(name)
            name = value
        if value is None:
            raise ConfigError(f"networks: unknown network '{name}'; defined: {', '.join(self.networks) or '(none)'}")
        return value

    def stage(self, name: str) -> StageConfig:
        for s in self.stages:
            if s.name == name:
                return s
        raise ConfigError(f"no stage named '{name}'; stages: {', '.join(s.name for s in self.stages)}")


# ----------------------------------------------------------------------------- loading


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read YAML (following ``base:`` includes), apply ``a.b=c`` overrides and validate."""
    return validate_config(load_raw(path, overrides), source=str(path))


def load_raw(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """The config as a plain mapping, ``base:`` includes merged and overrides applied, not yet validated."""
    path = Path(path)
    raw = _read_with_bases(path, chain=())
    for item in overrides or []:
        apply_override(raw, item)
    if isinstance(raw.get("imports"), list):  # plugin files are found next to the config first
        raw["imports"] = [_beside(path, entry) for entry in raw["imports"]]
    return raw


def _beside(config_path: Path, entry: Any) -> Any:
    if isinstance(entry, str) and entry.endswith(".py") and not Path(entry).is_absolute():
        candidate = config_path.parent / entry
        if candidate.is_file() and not Path(entry).is_file():
            return str(candidate.resolve())
    return entry


def validate_config(raw: dict[str, Any], source: str = "<config>") -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        lines = [f"{source}: {_loc(e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise ConfigError("invalid config\n  " + "\n  ".join(lines)) from None


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set ``dotted.key=value`` in ``raw``; the value is parsed as YAML; list items by index."""
    if "=" not in item:
        raise ConfigError(f"--set '{item}': expected dotted.key=value")
    key, value_text = item.split("=", 1)
    try:
        value = yaml.safe_load(value_text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set '{item}': value is not valid YAML: {exc}") from None
    parts = key.strip().split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        node = _child(node, part, create=True, where=".".join(parts[: i + 1]))
    last = parts[-1]
    if isinstance(node, list):
        node[_index(node, last, key)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"--set: '{'.'.join(parts[:-1])}' is not a mapping")


def read_dotted(raw: Any, key: str) -> Any:
    """The value at ``dotted.key`` (list items by index or ``name``, as in :func:`apply_override`), or None."""
    node = raw
    for i, part in enumerate(key.split(".")):
        if isinstance(node, dict) and part not in node:
            return None
        try:
            node = _child(node, part, create=False, where=".".join(key.split(".")[: i + 1]))
        except ConfigError:
            return None
    return node


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def _child(node: Any, part: str, *, create: bool, where: str) -> Any:
    if isinstance(node, list):
        return node[_index(node, part, where)]
    if not isinstance(node, dict):
        raise ConfigError(f"--set: '{where}' is not a mapping")
    if part not in node:
        if not create:
            raise ConfigError(f"--set: no key '{where}'")
        node[part] = {}
    return node[part]


def _index(node: list, part: str, where: str) -> int:
    """A list position, or the position of the item whose ``name`` is ``part`` (``stages.routed.epochs``)."""
    named = [i for i, item in enumerate(node) if isinstance(item, dict) and item.get("name") == part]
    if named:
        return named[0]
    if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
        raise ConfigError(f"--set: '{where}': list index '{part}' out of range (0..{len(node) - 1})")
    return int(part)


def _read_with_bases(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in chain:
        raise ConfigError(f"{path}: circular 'base:' include")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    base = raw.pop("base", None)
    if base is None:
        return raw
    bases = [base] if isinstance(base, str) else base
    merged: dict[str, Any] = {}
    for b in bases:
        merged = deep_merge(merged, _read_with_bases((path.parent / b), chain + (path.resolve(),)))
    return deep_merge(merged, raw)


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Merge mappings recursively. Lists of named mappings (``stages``) merge item by item on ``name``,
    keeping order of first appearance; other lists and scalars in ``top`` replace those in ``base``."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        elif _named_list(value) and _named_list(out.get(key)):
            merged = {item["name"]: item for item in out[key]}
            for item in value:
                merged[item["name"]] = deep_merge(merged[item["name"]], item) if item["name"] in merged else copy.deepcopy(item)
            out[key] = list(merged.values())
        else:
            out[key] = copy.deepcopy(value)
    return out


def _named_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) and "name" in v for v in value)


def _loc(loc: tuple) -> str:
    return ".".join(str(p) for p in loc) or "(root)"
