"""Is the data pipeline or the model the bottleneck? DataLoader samples/s next to training-step samples/s.

    python tools/loader_benchmark.py [CONFIG] [--synthetic N] [--batches 30] [--batch-size B]
                                     [--workers 0 2] [--set KEY=VALUE ...]

CONFIG defaults to ``configs/cremad/student_only.yaml``; its data (``data.root``, or ``--set``) is read as
configured. ``--synthetic N`` instead writes a CREMA-D-layout tree of N training clips per class (plus
N/9 test clips per class; 2.5 s 16 kHz wavs, three 480x360 jpgs per clip) in a temporary folder and
points ``data.root`` at it.

Timed, on the training split with the training loop's own sampler and collate function:

- the DataLoader alone, for every ``num_workers`` in ``--workers``, with ``pin_memory`` off and (when
  CUDA is available) on; for a family with a ``cache`` parameter (``cremad``), both with the decoding
  cache (``cache: true``) and decoding each sample (``cache: false``);
- one training step (:func:`crossmodal_kd.engine.trainer.train_step`) of the config's first stage,
  freshly initialised, on batches already in memory.

The first batch of each loader (worker start-up) is not timed; epochs restart as the trainer does.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from torch.utils.data import DataLoader, Dataset

from crossmodal_kd import load_components
from crossmodal_kd.config import ConfigError, RunConfig, load_config
from crossmodal_kd.data import EpochSampler, build_dataset, collate_batch
from crossmodal_kd.data.base import DataError
from crossmodal_kd.methods.context import BuildContext
from crossmodal_kd.engine.trainer import build_training, make_accelerator, train_step
from crossmodal_kd.params import parameters
from crossmodal_kd.registry import DATASETS, import_plugins

DEFAULT_CONFIG = "configs/cremad/student_only.yaml"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="loader_benchmark", description=__doc__.split("\n\n")[0])
    p.add_argument("config", nargs="?", default=DEFAULT_CONFIG)
    p.add_argument("--synthetic", type=int, metavar="N", help="synthesise a CREMA-D tree of N train clips per class")
    p.add_argument("--batches", type=int, default=30, help="timed batches per measurement")
    p.add_argument("--batch-size", type=int, help="default: the config's data.batch_size")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader num_workers values")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    if args.batches < 1 or (args.synthetic is not None and args.synthetic < 2):
        p.error("--batches must be >= 1 and --synthetic >= 2")
    return args


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() else platform.processor()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    return (f"{model}: {os.cpu_count()} CPUs ({usable} usable), torch {torch.__version__} "
            f"({torch.get_num_threads()} intra-op threads), {gpu}, Python {platform.python_version()}")


def time_loader(dataset: Dataset, batch_size: int, workers: int, pin: bool, batches: int) -> float:
    """Samples/s of iterating ``dataset`` as the trainer does (seeded sampler, restarted each epoch)."""
    loader = DataLoader(dataset, batch_size=batch_size, sampler=EpochSampler(len(dataset), 0), collate_fn=collate_batch,
                        num_workers=workers, pin_memory=pin)
    it = iter(loader)
    next(it)  # worker start-up and first-touch costs are not charged
    samples, done, epoch = 0, 0, 0
    start = time.perf_counter()
    while done < batches:
        try:
            batch = next(it)
        except StopIteration:
            epoch += 1
            loader.sampler.set_epoch(epoch)
            it = iter(loader)
            continue
        samples += len(batch["label"])
        done += 1
    return samples / (time.perf_counter() - start)


def time_train_step(cfg: RunConfig, data: Any, batch_size: int, batches: int) -> tuple[str, float, str]:
    """Samples/s of the first stage's training step on ``batches`` batches held in memory."""
    stage = cfg.stages[0]
    acc = make_accelerator(cfg)
    set_seed(cfg.seed)
    loader = DataLoader(data.train, batch_size=batch_size, sampler=EpochSampler(len(data.train), 0), collate_fn=collate_batch)
    held = []
    while len(held) < batches + 2:
        held.extend(loader)
    held = [{k: v.to(acc.device) for k, v in b.items()} for b in held[: batches + 2]]
    with tempfile.TemporaryDirectory(prefix="loader_benchmark_") as tmp:
        ctx = BuildContext(config=cfg, run_dir=Path(tmp), input_shapes=data.input_shapes, num_classes=data.num_classes,
                           sample_batch=held[0], where="stages[0].method.params", num_train=len(data.train))
        method, optimizer, scheduler = build_training(ctx, 0, stage, total_steps=len(held))
        method, optimizer, scheduler = acc.prepare(method, optimizer, scheduler)
        core = acc.unwrap_model(method)
        for module in core.frozen_modules().values():
            module.to(acc.device)
        method.train()
        core.on_epoch_start(0)
        for batch in held[:2]:  # warm-up
            train_step(acc, method, optimizer, scheduler, batch, stage.grad_clip_norm)
        samples = 0
        start = time.perf_counter()
        for batch in held[2:]:
            loss, _ = train_step(acc, method, optimizer, scheduler, batch, stage.grad_clip_norm)
            samples += len(batch["label"])
        loss.item()  # waits for the device
        elapsed = time.perf_counter() - start
    return f"{stage.name} ({stage.method.name})", samples / elapsed, str(acc.device)


def run(args: argparse.Namespace, tmp: Path) -> str:
    cfg = load_config(args.config, args.overrides)
    import_plugins(cfg.imports)
    if args.synthetic is not None:
        if cfg.data.name != "cremad":
            raise ConfigError(f"--synthetic writes a CREMA-D tree; {args.config} reads '{cfg.data.name}'")
        from crossmodal_kd.data.cremad import synthesise_tree

        base = tmp / cfg.data.params.get("subdir", "cremad")
        synthesise_tree(base, args.synthetic, max(1, args.synthetic // 9), sample_rate=16000, seconds=2.5,
                        frame_size=(360, 480))
        cfg.data.root = str(tmp)
    batch_size = args.batch_size or cfg.data.batch_size
    modes = {"as configured": {}}
    if "cache" in {p.name for p in parameters(DATASETS.get(cfg.data.name))}:  # families with a decoded-array cache
        modes = {"cached arrays": {"cache": True}, "decoded per sample": {"cache": False}}
    why = {"cached arrays": " (decodes every clip into the cache)",
           "decoded per sample": " (decodes the training clips once for the normalisation statistics)"}
    pins = [False, True] if torch.cuda.is_available() else [False]

    notes, rows, loaded = [], [], {}
    for mode, extra in modes.items():
        start = time.perf_counter()
        params = {**cfg.data.params, **extra}
        loaded[mode] = build_dataset(cfg.data.name, cfg.data.root, params).load()
        notes.append(f"first load, {mode}{why.get(mode, '')}: {time.perf_counter() - start:.1f} s")
        if extra.get("cache"):
            start = time.perf_counter()
            build_dataset(cfg.data.name, cfg.data.root, params).load()
            notes.append(f"second load, {mode} (checksums, no decoding): {time.perf_counter() - start:.1f} s")
        for workers in args.workers:
            for pin in pins:
                rate = time_loader(loaded[mode].train, batch_size, workers, pin, args.batches)
                rows.append((f"DataLoader, {mode}", workers, "on" if pin else "off", rate))
    data = next(iter(loaded.values()))
    stage, rate, device = time_train_step(cfg, data, batch_size, args.batches)
    rows.append((f"training step of {stage} on {device}", "-", "-", rate))

    lines = [
        f"{args.config}: '{cfg.data.name}' at {cfg.data.root}, {len(data.train)} training samples, "
        f"shapes {data.input_shapes}, batch {batch_size}, {args.batches} timed batches per row",
        f"machine: {machine()}",
        *(f"- {n}" for n in notes),
        "",
        "| what | num_workers | pin_memory | samples/s | x training step |",
        "|---|---:|:---:|---:|---:|",
    ]
    lines += [f"| {what} | {w} | {p} | {r:,.0f} | {r / rate:.2f} |" for what, w, p, r in rows]
    if not torch.cuda.is_available():
        lines += ["", "(pin_memory rows need a CUDA device: pinning does nothing on a CPU-only machine)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_components()
    try:
        with tempfile.TemporaryDirectory(prefix="loader_benchmark_data_") as tmp:
            print(run(args, Path(tmp)))
    except (ConfigError, DataError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
