"""Training-step throughput and peak memory of each MST-Distill stage, against a plain supervised step.

    python tools/throughput.py [CONFIG] [--device auto|cpu|cuda] [--steps 20] [--warmup 5]
                               [--mixed-precision no|bf16|fp16] [--batch-size N] [--stages NAME ...]

Needs no trained models and no dataset files: every stage of CONFIG (default
``configs/avdigits/mst_distill.yaml``) is built with freshly initialised networks, and the models each
stage produces are saved in a temporary run directory so that later stages find their teachers by
reference. Inputs are random tensors shaped like the dataset's (``--shapes image=1x28x28,audio=1x40x51``
overrides). Timed: the first stage of each MST-Distill method (``collaborative``, ``mask``,
``mst_distill``) unless ``--stages`` is given, and a plain supervised step of the student network
(``--student``, a name under ``networks:``) with the distillation stage's optimizer. Each step is the
training loop's own (:func:`crossmodal_kd.engine.trainer.train_step`).

Frozen teachers: a distillation stage is timed as training runs it, its teachers' outputs served by the
target store (:mod:`crossmodal_kd.targets`), and with ``--targets both`` (default) also with the teachers
run live on every step (the cost without the store). The store's one-time build is reported apart, as
milliseconds per training sample (a real run's build of the whole training split is ``target_build_s`` in
its ``result.json``).

Peak memory: ``torch.cuda.max_memory_allocated`` during the timed steps on GPU; on CPU, the growth of
the process RSS (sampled every few ms) over its value before the stage was built.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import torch
from accelerate.utils import set_seed

from crossmodal_kd import load_components
from crossmodal_kd.config import Component, ConfigError, RunConfig, StageConfig, load_config
from crossmodal_kd.data import ArrayDataset, DataError, build_dataset, collate_batch
from crossmodal_kd.methods.context import BuildContext
from crossmodal_kd.models.io import model_path, save_model
from crossmodal_kd.engine.trainer import build_training, make_accelerator, train_step
from crossmodal_kd.registry import import_plugins
from crossmodal_kd.targets import TargetStore, TargetTable

DEFAULT_CONFIG = "configs/avdigits/mst_distill.yaml"
MST_METHODS = ("collaborative", "mask", "mst_distill")
PLAIN = "plain"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="throughput", description=__doc__.split("\n\n")[0])
    p.add_argument("config", nargs="?", default=DEFAULT_CONFIG)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--steps", type=int, default=20, help="timed steps per stage")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--batch-size", type=int, help="default: the config's data.batch_size")
    p.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), help="default: the config's")
    p.add_argument("--stages", nargs="+", help="stage names to time (default: first of each MST-Distill method)")
    p.add_argument("--student", default="student", help="network (under networks:) of the plain step")
    p.add_argument("--shapes", help="input shapes, e.g. image=1x28x28,audio=1x40x51 (default: the dataset's)")
    p.add_argument("--num-classes", type=int, help="default: the dataset's")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--layouts", choices=("config", "both"), default="config",
                   help="both: time everything with NCHW and with NHWC (channels_last) weights, in this one run")
    p.add_argument("--targets", choices=("store", "live", "both"), default="both",
                   help="frozen teachers served by the target store, run live, or both (two rows)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    return args


def input_spec(cfg: RunConfig, shapes: str | None, num_classes: int | None) -> tuple[dict[str, tuple[int, ...]], int]:
    """Input shapes and class count: from ``--shapes``/``--num-classes`` or the dataset family's
    ``input_spec()`` (no splits loaded; a file-backed family may read its listing or one file)."""
    if shapes is None or num_classes is None:
        family = build_dataset(cfg.data.name, cfg.data.root, cfg.data.params)
        default_shapes, default_classes = family.input_spec()
    parsed = dict(default_shapes) if shapes is None else {}
    for item in (shapes or "").split(","):
        if item:
            name, _, dims = item.partition("=")
            try:
                parsed[name.strip()] = tuple(int(d) for d in dims.split("x"))
            except ValueError:
                raise ConfigError(f"--shapes: '{item}' is not MODALITY=DxDx...") from None
    return parsed, num_classes if num_classes is not None else default_classes


def random_batch(shapes: dict[str, tuple[int, ...]], num_classes: int, batch_size: int) -> dict[str, torch.Tensor]:
    """A batch as the data pipeline makes it (modalities, ``label``, ``index``), of random values."""
    data = ArrayDataset({m: torch.randn(batch_size, *s) for m, s in shapes.items()}, torch.randint(num_classes, (batch_size,)))
    return collate_batch(data.__getitems__(list(range(batch_size))))


def timed_stages(cfg: RunConfig, names: list[str] | None) -> list[str]:
    if names:
        for name in names:
            cfg.stage(name)  # a clear error for unknown names
        return list(names)
    picked = {}
    for s in cfg.stages:
        if s.method.name in MST_METHODS:
            picked.setdefault(s.method.name, s.name)
    if not picked:
        raise ConfigError(f"no {'/'.join(MST_METHODS)} stage in the config; name stages with --stages")
    return list(picked.values())


def plain_stage(cfg: RunConfig, student: str, reference: str) -> StageConfig:
    """Supervised training of ``student`` with the optimizer and scheduler of stage ``reference``."""
    cfg.network(student)  # a clear error for unknown networks
    ref = cfg.stage(reference)
    return StageConfig(name=PLAIN, method=Component(name="supervised", params={"network": student}),
                       optimizer=ref.optimizer, scheduler=ref.scheduler, grad_clip_norm=ref.grad_clip_norm)


class PeakRss:
    """Peak resident set size of this process while the ``with`` block runs (sampled in a thread)."""

    def __init__(self, interval: float = 0.002) -> None:
        self.proc, self.interval, self.peak = psutil.Process(), interval, 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> "PeakRss":
        self.peak = self.proc.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def release_memory() -> None:
    """Collect garbage and hand freed heap back to the OS, so the next RSS baseline is not inflated."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def serve_targets(acc, core: Any, batch: dict[str, torch.Tensor]) -> float | None:
    """Attach a target table covering ``batch`` to each storable teacher call of ``core`` and fill it as the
    store's build does; the build time in ms per sample, or None when the stage has no storable call."""
    calls = [c for c in core.teacher_calls().values() if c.deterministic]
    if not calls:
        return None
    n = batch["label"].shape[0]
    tables = []
    for call in calls:
        call.tables["train"] = TargetTable(Path("unused"), "throughput", n, acc.device)
        tables.append((call, call.tables["train"]))
    if acc.device.type == "cuda":
        torch.cuda.synchronize(acc.device)
    start = time.perf_counter()
    with acc.autocast():
        TargetStore.fill(tables, [batch])
    if acc.device.type == "cuda":
        torch.cuda.synchronize(acc.device)
    core.set_target_split("train")
    return 1000 * (time.perf_counter() - start) / n


def measure(acc, ctx: BuildContext, index: int, stage: StageConfig, batch: dict[str, torch.Tensor], warmup: int, steps: int,
            save_dir: Path | None = None, store: bool = False) -> dict[str, Any]:
    """Build ``stage`` (saving its fresh models under ``save_dir``), then time ``warmup + steps`` training steps;
    with ``store``, frozen teachers are served from a target table built first (its build time reported)."""
    release_memory()
    cuda = acc.device.type == "cuda"
    rss_before = psutil.Process().memory_info().rss
    method, optimizer, scheduler = build_training(ctx, index, stage, total_steps=warmup + steps)
    if save_dir is not None:
        for name, module in method.models().items():
            save_model(module, model_path(save_dir, stage.name, name))
    method, optimizer, scheduler = acc.prepare(method, optimizer, scheduler)
    core = acc.unwrap_model(method)
    for module in core.frozen_modules().values():
        module.to(acc.device)
    batch = {k: v.to(acc.device) for k, v in batch.items()}
    build_ms = serve_targets(acc, core, batch) if store else None
    if store and build_ms is None:
        acc.free_memory(method, optimizer, scheduler)
        return {}
    method.train()
    core.on_epoch_start(0)

    def step() -> torch.Tensor:
        loss, _ = train_step(acc, method, optimizer, scheduler, batch, stage.grad_clip_norm)
        return loss

    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize(acc.device)
        torch.cuda.reset_peak_memory_stats(acc.device)
    with PeakRss() as rss:
        start = time.perf_counter()
        for _ in range(steps):
            loss = step()
        loss = loss.item()  # waits for the device
        elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(acc.device) if cuda else rss.peak - rss_before
    acc.free_memory(method, optimizer, scheduler)
    live = sum(c.live_batches for c in core.teacher_calls().values())
    return {
        "stage": stage.name + (" (target store)" if store else " (live teachers)" if core.teacher_calls() else ""),
        "method": stage.method.name,
        "build_ms_per_sample": build_ms,
        "live_teacher_passes": live,
        "ms_per_step": 1000 * elapsed / steps,
        "samples_per_s": batch["label"].shape[0] * steps / elapsed,
        "peak_mib": peak / 2**20,
        "loss": loss,
    }


def run(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Measure; one row per timed stage, the plain step first, each with its ratio to the plain step."""
    args = parse_args(argv)
    load_components()
    cfg = load_config(args.config, args.overrides)
    import_plugins(cfg.imports)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available")
    cfg.accelerator.cpu = args.device == "cpu"
    if args.mixed_precision:
        cfg.accelerator.mixed_precision = args.mixed_precision
    shapes, num_classes = input_spec(cfg, args.shapes, args.num_classes)
    batch_size = args.batch_size or cfg.data.batch_size
    names = timed_stages(cfg, args.stages)
    acc = make_accelerator(cfg)
    if acc.num_processes > 1:
        raise ConfigError("throughput measures one process; run it without accelerate launch")
    set_seed(cfg.seed)
    batch = random_batch(shapes, num_classes, batch_size)
    stage_names = [s.name for s in cfg.stages]
    last = max(stage_names.index(n) for n in names)
    reference = next((n for n in names if cfg.stage(n).method.name == "mst_distill"), names[-1])
    with tempfile.TemporaryDirectory(prefix="throughput_") as tmp:
        def context(index: int, where: str | None = None) -> BuildContext:
            return BuildContext(config=cfg, run_dir=Path(tmp), input_shapes=shapes, num_classes=num_classes, sample_batch=batch,
                                where=where or f"stages[{index}].method.params", num_train=batch_size)

        plain = plain_stage(cfg, args.student, reference)
        measure(acc, context(-1, "plain step (--student)"), -1, plain, batch, 1, 1)  # lazy library set-up, not charged to a stage
        rows = []
        for channels_last in ([False, True] if args.layouts == "both" else [cfg.accelerator.channels_last]):
            cfg.accelerator.channels_last = channels_last  # read by build_training
            layout: list[dict[str, Any]] = []
            layout.append(measure(acc, context(-1, "plain step (--student)"), -1, plain, batch, args.warmup, args.steps))
            for index, stage in enumerate(cfg.stages[: last + 1]):
                if stage.name in names:
                    if args.targets in ("live", "both"):
                        layout.append(measure(acc, context(index), index, stage, batch, args.warmup, args.steps, save_dir=Path(tmp)))
                    if args.targets in ("store", "both"):
                        row = measure(acc, context(index), index, stage, batch, args.warmup, args.steps,
                                      save_dir=Path(tmp), store=True)
                        layout += [row] if row else []
                else:  # only its fresh models are needed, as teachers of later stages
                    method, _, _ = build_training(context(index), index, stage, total_steps=1)
                    for name, module in method.models().items():
                        save_model(module, model_path(Path(tmp), stage.name, name))
                    del method
            if args.layouts == "both":
                for row in layout:
                    row["stage"] += " [NHWC]" if channels_last else " [NCHW]"
            rows += layout
    base = rows[0]
    for row in rows:
        row["time_ratio"] = row["ms_per_step"] / base["ms_per_step"]
        row["memory_ratio"] = row["peak_mib"] / base["peak_mib"] if base["peak_mib"] > 0 else float("nan")
    info = {"device": str(acc.device), "mixed_precision": acc.mixed_precision, "batch_size": batch_size,
            "steps": args.steps, "warmup": args.warmup, "config": args.config}
    for row in rows:
        row["info"] = info
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    info = rows[0]["info"]
    memory = "peak CUDA alloc (MiB)" if info["device"].startswith("cuda") else "RSS growth (MiB)"
    lines = [
        f"{info['config']} on {info['device']}, mixed precision {info['mixed_precision']}, batch {info['batch_size']}, "
        f"{info['steps']} timed steps after {info['warmup']} warm-up",
        "",
        f"| stage | method | ms/step | samples/s | {memory} | time x plain | memory x plain | store build (ms/sample) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        build = "" if r.get("build_ms_per_sample") is None else f"{r['build_ms_per_sample']:.3f}"
        lines.append(f"| {r['stage']} | {r['method']} | {r['ms_per_step']:.1f} | {r['samples_per_s']:.0f} | "
                     f"{r['peak_mib']:.1f} | {r['time_ratio']:.2f} | {r['memory_ratio']:.2f} | {build} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    try:
        rows = run(argv)
    except (ConfigError, DataError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
