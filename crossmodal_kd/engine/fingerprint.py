"""Stage fingerprints: everything that determines what a stage trains, so that ``--resume`` continues
only stages trained under the same settings.

A stage's fingerprint holds its resolved stage config, the networks it names, the data section and the
dataset's identity (its ``fingerprint()`` when the family has one: recipe and checksum), ``imports``,
the run seed, fast-dev-run, world size, precision and accumulation, and the fingerprints of the stages
it depends on (those named by a ``stage:`` or ``mask_stage:`` entry anywhere in its method params), so a
change upstream changes everything downstream. Like the per-stage dependency hashes of DVC's
``dvc.lock`` (https://dvc.org/doc/user-guide/project-structure/dvcyaml-files), it is stored with the
stage (``stages/<stage>/fingerprint.json``) and compared key by key.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Iterator

from crossmodal_kd.config import ConfigError, RunConfig

STAGE_REF_KEYS = ("stage", "mask_stage")
# what a stage directory holds once it has trained (a fingerprint.json alone means it never got going)
STATE_ENTRIES = ("result.json", "log.jsonl", "checkpoints", "models")
MAX_KEYS, MAX_STAGES = 5, 3


def direct_dependencies(cfg: RunConfig) -> dict[str, list[str]]:
    """For every stage, the stages its method params reference, in order of first mention."""
    names = {s.name for s in cfg.stages}
    out = {}
    for stage in cfg.stages:
        refs = [r for r in _stage_refs(stage.method.params) if r in names]
        out[stage.name] = list(dict.fromkeys(refs))
    return out


def upstream(cfg: RunConfig, name: str) -> list[str]:
    """Every stage ``name`` depends on, transitively; :class:`ConfigError` on a cycle."""
    deps = direct_dependencies(cfg)
    seen: list[str] = []

    def visit(n: str, chain: tuple[str, ...]) -> None:
        for d in deps.get(n, []):
            if d in chain:
                raise ConfigError(f"stages: dependency cycle {' -> '.join(chain + (d,))}")
            if d not in seen:
                seen.append(d)
                visit(d, chain + (d,))

    visit(name, (name,))
    return seen


def with_dependents(cfg: RunConfig, names: Iterable[str]) -> list[str]:
    """``names`` plus every stage that depends on one of them, in config order."""
    chosen = set(names)
    return [s.name for s in cfg.stages if s.name in chosen or chosen & set(upstream(cfg, s.name))]


def stage_fingerprints(cfg: RunConfig, run: dict[str, Any], dataset: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The fingerprint of every stage; ``run`` holds the run-level settings (seed, fast_dev_run, world
    size, ...) and ``dataset`` the dataset family's identity."""
    deps = direct_dependencies(cfg)
    data = cfg.data.model_dump(mode="json", exclude={"num_workers", "pin_memory"})  # loader mechanics only
    out: dict[str, dict[str, Any]] = {}

    def fingerprint(name: str) -> dict[str, Any]:
        if name not in out:
            upstream(cfg, name)  # raises on a cycle before the recursion below could
            stage = cfg.stage(name).model_dump(mode="json")
            fp = {
                **run,
                "imports": list(cfg.imports),
                "data": data,
                "dataset": dataset,
                "networks": _networks(cfg, stage["method"]["params"]),
                "stage": stage,
                "depends": {d: fingerprint(d) for d in deps[name]},
            }
            out[name] = json.loads(json.dumps(fp))  # the form it has once read back from disk
        return out[name]

    for s in cfg.stages:
        fingerprint(s.name)
    return {s.name: out[s.name] for s in cfg.stages}


def started_stages(run_dir: Path) -> list[str]:
    """Names of the stage directories under ``run_dir`` that hold training state."""
    root = Path(run_dir) / "stages"
    if not root.is_dir():
        return []
    return sorted(d.name for d in root.iterdir() if d.is_dir() and any((d / e).exists() for e in STATE_ENTRIES))


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings and lists as ``{dotted.key: leaf}`` (list items by index)."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else None
    if items is None or not node:
        return {prefix: node}
    out: dict[str, Any] = {}
    for k, v in items:
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every differing key, the stage's own keys before its dependencies'. A key
    that one side lacks and the other holds as null or empty is no difference (a config option added since,
    at its default)."""
    a, b = flatten(old), flatten(new)
    keys = [k for k in b if a.get(k, _ABSENT) != b[k] and not (k not in a and _empty(b[k]))]
    keys += [k for k in a if k not in b and not _empty(a[k])]
    keys.sort(key=lambda k: k.startswith("depends."))  # stable: keeps the fingerprint's order otherwise
    return [f"{k}: {_show(a.get(k, _ABSENT))} -> {_show(b.get(k, _ABSENT))}" for k in keys]


def mismatch_message(run_dir: Path, cfg: RunConfig, mismatched: dict[str, list[str]]) -> str:
    """One line: which stages differ from the run in ``run_dir``, how, and what to do."""
    parts = []
    for name, diffs in list(mismatched.items())[:MAX_STAGES]:
        more = f" (+{len(diffs) - MAX_KEYS} more)" if len(diffs) > MAX_KEYS else ""
        parts.append(f"stage '{name}': {', '.join(diffs[:MAX_KEYS])}{more}")
    if len(mismatched) > MAX_STAGES:
        parts.append(f"and {len(mismatched) - MAX_STAGES} more stage(s)")
    roots = [n for n in mismatched if not set(upstream(cfg, n)) & set(mismatched)]
    flags = " ".join(f"--restart-stage {n}" for n in roots)
    return (
        f"cannot resume {run_dir}: it was trained with other settings; {'; '.join(parts)}. "
        f"Use {flags} (stages depending on it restart too) or a new --output-dir"
    )


def _empty(value: Any) -> bool:
    return value is None or value == {} or value == []


class _Absent:
    def __repr__(self) -> str:
        return "(absent)"


_ABSENT = _Absent()


def _show(value: Any, width: int = 40) -> str:
    text = repr(value) if value is _ABSENT else json.dumps(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _stage_refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in STAGE_REF_KEYS and isinstance(value, str):
                yield value
            else:
                yield from _stage_refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _stage_refs(value)


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)


def _networks(cfg: RunConfig, params: dict[str, Any]) -> dict[str, Any]:
    """The ``networks`` entries that ``params`` names (aliases followed, nested names included)."""
    found: dict[str, Any] = {}
    todo = [s for s in _strings(params) if s in cfg.networks]
    while todo:
        name = todo.pop(0)
        if name in found:
            continue
        value = cfg.networks[name]
        found[name] = value if isinstance(value, str) else value.model_dump(mode="json")
        todo += [s for s in _strings(found[name]) if s in cfg.networks]
    return dict(sorted(found.items()))
