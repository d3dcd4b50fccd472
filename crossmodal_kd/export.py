"""Deployable models: export a run's model (safetensors, ONNX, TorchScript) with its input spec, load one
back, and classify a user's own files with the preprocessing the run's dataset applied.

An export is two files side by side: the model (``<out>.safetensors``, ``<out>.onnx`` or ``<out>.pt``) and
``<out>.json``, the spec: the network's build spec (registry, name, params, context), its ``inputs`` (the
tensors the exported graph takes, in order: name, shape without the batch dim, dtype, normalisation), the
``views`` it applies inside (derived modalities, ``data.views``), ``class_names``, where it came from and, for
ONNX and TorchScript, the check against PyTorch on the run's validation batch.

``normalisation`` of an input is what the dataset did to the raw values before the network saw them:
``{"kind": "zscore", "mean": [...], "std": [...], "shape"?: [...]}`` (one value, one per channel, or shaped as
``shape`` says, e.g. one per mel bin) when the dataset
records its statistics (its loader normalises with them: avdigits, CREMA-D, imagefolder, cifar100), ``{"kind":
"none"}`` when it applies none (synthetic), ``{"kind": "unrecorded"}`` when it z-scores without keeping the
statistics (avmnist, features, textdigits, in ``load()``). ``raw`` says how a user's
file becomes the un-normalised tensor: ``image`` (png: pixel scale, resize policy) for 1- or 3-channel
2-D inputs, ``audio`` (wav: CREMA-D's log-mel front end) where the dataset has one.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from crossmodal_kd.config import Component, RunConfig, load_config
from crossmodal_kd.data import DataSplits, build_dataset, collate_batch
from crossmodal_kd.io import atomic_write_json
from crossmodal_kd.models.io import build_from_spec, load_model, model_path, stage_dir
from crossmodal_kd.registry import import_plugins, load_components
from crossmodal_kd.data.views import ViewSet

FORMATS = {"safetensors": ".safetensors", "onnx": ".onnx", "torchscript": ".pt"}
SPEC_FORMAT = 1
TOLERANCE = 1e-4  # max abs logit difference an ONNX / TorchScript export may show against PyTorch
UNNORMALISED = {"synthetic"}  # dataset families whose tensors reach the network as generated
EXTRA_HINT = "pip install 'crossmodal_kd[export]'"


class ExportError(RuntimeError):
    """A model that cannot be exported or checked, or an input that cannot be used; one line naming the file."""


# ----------------------------------------------------------------------------- choosing and loading


def pick_model(run_dir: str | Path, stage: str | None = None, model: str | None = None) -> tuple[str, str, str]:
    """``(stage, model, why)``: by default the last finished stage's ``student`` model, else its only model."""
    run_dir = Path(run_dir)
    cfg = _run_config(run_dir)
    names = [s.name for s in cfg.stages]
    finished = [name for name in names if (stage_dir(run_dir, name) / "result.json").is_file()]
    if stage is None:
        if not finished:
            raise ExportError(f"{run_dir}: no finished stage (no stages/<stage>/result.json)")
        stage = finished[-1]
    elif stage not in finished:
        raise ExportError(f"{run_dir}: stage '{stage}' " + ("has not finished" if stage in names else
                          f"is not in this run; stages: {', '.join(names)}") + f" (finished: {', '.join(finished) or 'none'})")
    saved = list(json.loads((stage_dir(run_dir, stage) / "result.json").read_text())["models"])
    if model is not None:
        if model not in saved:
            raise ExportError(f"{stage_dir(run_dir, stage) / 'result.json'}: stage '{stage}' saves no model '{model}'; "
                              f"models: {', '.join(saved)}")
        return stage, model, "chosen with --model"
    later = names[names.index(stage) + 1:]
    unfinished = f" (not finished yet: {', '.join(later)})" if later and stage == finished[-1] else ""
    if "student" in saved:
        return stage, "student", ("the final student" if not later else f"the student of stage '{stage}'") + unfinished
    if len(saved) == 1:
        return stage, saved[0], f"the only model of stage '{stage}'" + unfinished
    raise ExportError(f"{stage_dir(run_dir, stage) / 'result.json'}: stage '{stage}' saves {', '.join(saved)} and no "
                      "'student'; pick one with --model")


def load_student(run_dir: str | Path, stage: str | None = None, model: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The eval-mode network of a finished run (default: its final student) and its input spec.

    The spec is what :func:`export` writes beside a model (``inputs``, ``views``, ``class_names``, ...); it
    loads the run's dataset (``config.yaml``'s ``data``) for the normalisation statistics. The network takes a
    batch dict ``{modality: (B, *shape) tensor}`` and returns ``{"logits", "features", ...}``.
    """
    network, spec, _ = _load_run_model(Path(run_dir), stage, model)
    return network, spec


def load_safetensors(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """A network exported as safetensors, rebuilt from ``<path>.json`` with its weights (eval mode), and the spec."""
    spec = read_spec(path)
    return _rebuild(Path(path), spec), spec


def _rebuild(path: Path, spec: Mapping[str, Any]) -> nn.Module:
    from safetensors.torch import load_model as load_weights

    load_components()
    network = build_from_spec(spec["spec"], where=str(path))
    try:
        load_weights(network, str(path))
    except (OSError, RuntimeError, ValueError) as exc:
        raise ExportError(f"{path}: cannot load the weights ({_first_line(exc)})") from None
    return network.eval()


def read_spec(model_file: str | Path) -> dict[str, Any]:
    """The spec written beside an exported model (``student.onnx`` -> ``student.json``)."""
    model_file = Path(model_file)
    path = model_file.with_suffix(".json")
    if not model_file.is_file():
        raise ExportError(f"{model_file}: file not found")
    if not path.is_file():
        raise ExportError(f"{model_file}: no spec file {path.name} beside it (crossmodal-kd export writes one)")
    try:
        spec = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ExportError(f"{path}: unreadable spec ({exc})") from None
    if not isinstance(spec, dict) or spec.get("format") != SPEC_FORMAT:
        raise ExportError(f"{path}: not a crossmodal_kd export spec (format {SPEC_FORMAT})")
    return spec


def _run_config(run_dir: Path) -> RunConfig:
    if not (run_dir / "config.yaml").is_file():
        raise ExportError(f"{run_dir}: not a run directory (no config.yaml)")
    return load_config(run_dir / "config.yaml")


def _load_run_model(run_dir: Path, stage: str | None, model: str | None) -> tuple[nn.Module, dict[str, Any], dict[str, torch.Tensor]]:
    """``(network, spec, validation batch)`` of a run's model."""
    stage, model, why = pick_model(run_dir, stage, model)
    cfg = _run_config(run_dir)
    import_plugins(cfg.imports)
    load_components()
    path = model_path(run_dir, stage, model)
    network = load_model(path).eval()
    if not isinstance(getattr(network, "modalities", None), tuple) or not network.modalities:
        raise ExportError(f"{path}: {type(network).__name__} is not a network (it reads no batch dict); "
                          "pick a network with --model")
    family = build_dataset(cfg.data.name, cfg.data.root, cfg.data.params)
    splits = family.load()
    views = {m: cfg.data.views[m] for m in network.modalities if m in cfg.data.views}
    batch = ViewSet(views)(_first_batch(splits, cfg.data.eval_batch_size))
    inputs = list(dict.fromkeys(views[m].params.get("source", "image") if m in views else m for m in network.modalities))
    spec = {
        "format": SPEC_FORMAT,
        "source": {"run_dir": str(run_dir), "stage": stage, "model": model, "file": str(path), "chosen": why,
                   "dataset": cfg.data.name},
        "spec": network.build_spec,
        "modalities": list(network.modalities),
        "inputs": [_input_record(name, batch[name], family, splits, cfg.data.name) for name in inputs],
        "views": {m: v.model_dump() for m, v in views.items()},
        "outputs": ["logits"],
        "class_names": list(splits.class_names),
    }
    return network, spec, batch


def _first_batch(splits: DataSplits, size: int) -> dict[str, torch.Tensor]:
    loader = torch.utils.data.DataLoader(splits.val, batch_size=min(size, len(splits.val)), collate_fn=collate_batch)
    return next(iter(loader))


# ----------------------------------------------------------------------------- input records


def _input_record(name: str, sample: torch.Tensor, family: Any, splits: DataSplits, dataset: str) -> dict[str, Any]:
    from crossmodal_kd.data.base import ZScore
    from crossmodal_kd.data.cremad import CremaD
    from crossmodal_kd.data.images import ChannelNormaliser

    shape = list(sample.shape[1:])
    record: dict[str, Any] = {"name": name, "shape": shape, "dtype": str(sample.dtype).removeprefix("torch.")}
    normaliser = getattr(splits.val, "normalise", None)
    raw: dict[str, Any] = {}
    if len(shape) == 3 and shape[0] in (1, 3):
        raw["image"] = {"pixel_scale": 1 / 255, "resize": "stretch", "resample": "bilinear"}
    if isinstance(normaliser, ZScore):  # CREMA-D, avdigits: statistics in stored units (0..255 pixels, log-mels)
        mean, std = normaliser.stats[name]
        record["normalisation"] = {"kind": "zscore", "mean": mean.flatten().tolist(), "std": std.flatten().tolist(),
                                   "shape": list(mean.shape)}
        if "image" in raw:
            raw["image"]["pixel_scale"] = 1.0
    elif isinstance(normaliser, ChannelNormaliser):  # imagefolder, cifar100: x / 255, then per RGB channel
        record["normalisation"] = {"kind": "zscore", "mean": normaliser.mean.flatten().tolist(),
                                   "std": normaliser.std.flatten().tolist()}
        raw["image"].update(resize="fit", resample="bicubic")
    elif dataset in UNNORMALISED:
        record["normalisation"] = {"kind": "none"}
    else:
        record["normalisation"] = {"kind": "unrecorded", "note": f"dataset '{dataset}' z-scores this input with "
                                   "training statistics it does not record"}
    if isinstance(family, CremaD) and name == "audio":
        raw["audio"] = {"dataset": "cremad", **asdict(family.params)}
    record["raw"] = raw
    return record


# ----------------------------------------------------------------------------- export


class LogitsModule(nn.Module):
    """``forward(*inputs) -> logits``: the network on positional tensors (the spec's inputs, in order), with
    its views derived inside."""

    def __init__(self, network: nn.Module, inputs: Sequence[str], views: Mapping[str, Mapping[str, Any]]) -> None:
        super().__init__()
        self.network, self.inputs = network, tuple(inputs)
        self.views = ViewSet({m: Component(**v) for m, v in views.items()})

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.network(self.views(dict(zip(self.inputs, tensors))))["logits"]


def export(run_dir: str | Path, fmt: str, stage: str | None = None, model: str | None = None,
           out: str | Path | None = None) -> tuple[Path, dict[str, Any]]:
    """Write a run's model (default: the final student) as ``fmt`` and its spec beside it; ONNX and TorchScript
    are checked against PyTorch on the run's validation batch (:class:`ExportError` over :data:`TOLERANCE`),
    safetensors must reproduce the logits exactly. Returns the model file written and its spec."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format '{fmt}'; valid: {', '.join(FORMATS)}")
    run_dir = Path(run_dir)
    network, spec, batch = _load_run_model(run_dir, stage, model)
    src = spec["source"]
    out = Path(out) if out else run_dir / "exports" / fmt / f"{src['stage']}_{src['model']}{FORMATS[fmt]}"
    _check_out(out, fmt)
    out.parent.mkdir(parents=True, exist_ok=True)
    module = LogitsModule(network, [i["name"] for i in spec["inputs"]], spec["views"]).eval()
    args = tuple(batch[name] for name in module.inputs)
    example = tuple(t[[0, len(t) - 1]] for t in args)  # two rows: the batch axis stays symbolic
    with torch.no_grad():
        expected = module(*args)
    run = {"safetensors": _write_safetensors, "onnx": _write_onnx, "torchscript": _write_torchscript}[fmt]
    try:
        spec["export"] = run(module, example, out)
        with torch.no_grad():
            got = _runner(out, fmt, spec)(args)
        diff = float((got - expected).abs().max())
        limit = 0.0 if fmt == "safetensors" else TOLERANCE  # the same network and weights: identical logits
        if not diff <= limit:
            raise ExportError(f"{out}: {fmt} logits differ from PyTorch by {diff:.3g} (> {limit:g}) on "
                              f"{len(expected)} validation rows; export removed")
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    spec["export"].update(format=fmt, file=out.name, check={"rows": len(expected), "max_abs_diff": diff})
    atomic_write_json(out.with_suffix(".json"), spec)
    return out, spec


def _check_out(out: Path, fmt: str) -> None:
    """``out`` ends in the format's suffix, and its spec path holds no other live export's spec."""
    if out.suffix != FORMATS[fmt]:
        raise ExportError(f"--out {out}: a {fmt} export ends in {FORMATS[fmt]}")
    spec_path = out.with_suffix(".json")
    if spec_path.is_file():
        try:
            other = json.loads(spec_path.read_text()).get("export", {}).get("file")
        except (OSError, ValueError, AttributeError):
            other = None
        if other and other != out.name and (out.parent / other).is_file():
            raise ExportError(f"--out {out}: {spec_path} is the spec of {other}; choose another name")


def _write_safetensors(module: LogitsModule, example: tuple[torch.Tensor, ...], out: Path) -> dict[str, Any]:
    from safetensors.torch import save_model

    save_model(module.network, str(out), metadata={"crossmodal_kd": "export spec beside: " + out.with_suffix(".json").name})
    return {}


def _write_onnx(module: LogitsModule, example: tuple[torch.Tensor, ...], out: Path) -> dict[str, Any]:
    try:
        import onnx
        import onnxruntime  # noqa: F401  (the check below needs it; fail before exporting)
        import onnxscript  # noqa: F401  (torch's ONNX exporter)
    except ImportError as exc:
        raise ExportError(f"ONNX export needs onnx, onnxscript and onnxruntime ({exc.name} is missing): {EXTRA_HINT}") from None
    from torch.onnx._constants import ONNX_MAX_OPSET

    batch = torch.export.Dim("batch")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*The axis name", UserWarning)  # inputs share the batch axis, as meant
        try:  # the installed onnx's opset, capped at the newest torch's exporter writes
            torch.onnx.export(module, example, str(out), input_names=list(module.inputs), output_names=["logits"],
                              opset_version=min(onnx.defs.onnx_opset_version(), ONNX_MAX_OPSET), dynamo=True,
                              dynamic_shapes=(tuple({0: batch} for _ in example),), verbose=False)
        except Exception as exc:
            raise ExportError(f"{out}: ONNX export failed: {_first_line(exc)}") from None
    opset = next(o.version for o in onnx.load(str(out), load_external_data=False).opset_import if o.domain in ("", "ai.onnx"))
    return {"opset": opset, "onnx": onnx.__version__}


def _write_torchscript(module: LogitsModule, example: tuple[torch.Tensor, ...], out: Path) -> dict[str, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch 2.14 deprecates TorchScript; it still works
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape-dependent branches: the check below runs another batch size
        try:
            traced = torch.jit.trace(module, example, check_trace=False)
        except Exception as exc:
            raise ExportError(f"{out}: TorchScript tracing failed: {_first_line(exc)}") from None
        torch.jit.save(traced, str(out))
    return {"torch": torch.__version__}


def _first_line(exc: BaseException) -> str:
    """``Type: first line`` of the innermost cause (exporters wrap the real error in several layers)."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"


def _runner(path: Path, fmt: str, spec: Mapping[str, Any]) -> Callable[[Sequence[torch.Tensor]], torch.Tensor]:
    """``inputs -> logits`` for an exported file (what ``predict`` and the export check run)."""
    if fmt == "onnx":
        try:
            import onnxruntime as ort
        except ImportError:
            raise ExportError(f"{path}: running an ONNX model needs onnxruntime: {EXTRA_HINT}") from None
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        return lambda xs: torch.from_numpy(session.run(["logits"], {n: x.numpy() for n, x in zip(names, xs)})[0])
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            scripted = torch.jit.load(str(path), map_location="cpu")
        return lambda xs: scripted(*xs)
    module = LogitsModule(_rebuild(path, spec), [i["name"] for i in spec["inputs"]], spec["views"]).eval()
    return lambda xs: module(*xs)


# ----------------------------------------------------------------------------- predict


def predict(model_file: str | Path, inputs: Mapping[str | None, str | Path], top: int = 5) -> list[tuple[str, list[tuple[str, float]]]]:
    """Classify a user's files with an exported model: ``[(sample label, [(class, probability), ...]), ...]``,
    the ``top`` most probable classes per sample (all when ``top`` is 0). ``inputs`` maps an input name (None
    when the model takes one) to a ``.npy`` (already the model's input: its shape, or a batch of it), ``.png``
    (decoded and normalised as the dataset did) or ``.wav`` (where the dataset has a raw-audio front end)."""
    model_file = Path(model_file)
    spec = read_spec(model_file)
    fmt = {suffix: fmt for fmt, suffix in FORMATS.items()}.get(model_file.suffix)
    if fmt is None or spec.get("export", {}).get("format") != fmt:
        raise ExportError(f"{model_file}: not an exported model ({', '.join(FORMATS.values())} with its spec)")
    records = {r["name"]: r for r in spec["inputs"]}
    named = _assign(inputs, list(records))
    tensors = {name: _read_input(Path(path), records[name], spec["source"]["dataset"]) for name, path in named.items()}
    sizes = {name: len(t) for name, t in tensors.items()}
    if len(set(sizes.values())) > 1:
        raise ExportError(f"inputs hold different numbers of samples: {', '.join(f'{named[n]} {k}' for n, k in sizes.items())}")
    with torch.no_grad():
        logits = _runner(model_file, fmt, spec)([tensors[name] for name in records])
    probs = torch.softmax(logits.float(), dim=1)
    classes = spec["class_names"]
    k = len(classes) if top <= 0 else min(top, len(classes))
    labels = ", ".join(str(named[n]) for n in records)
    rows = []
    for i, p in enumerate(probs):
        values, idx = p.topk(k)
        rows.append((labels if len(probs) == 1 else f"{labels} [{i}]", [(classes[j], float(v)) for v, j in zip(values, idx)]))
    return rows


def _assign(inputs: Mapping[str | None, str | Path], names: list[str]) -> dict[str, str | Path]:
    if None in inputs:
        if len(names) > 1:
            raise ExportError(f"the model takes inputs {', '.join(names)}: pass --input NAME=FILE for each")
        if len(inputs) > 1:
            raise ExportError(f"the model takes one input ({names[0]}): pass one --input")
        return {names[0]: inputs[None]}
    unknown = sorted(set(inputs) - set(names))
    if unknown:
        raise ExportError(f"--input {unknown[0]}=...: the model has no input '{unknown[0]}'; inputs: {', '.join(names)}")
    missing = [n for n in names if n not in inputs]
    if missing:
        raise ExportError(f"the model also takes {', '.join(missing)}: pass --input NAME=FILE for each")
    return dict(inputs)


def _read_input(path: Path, record: Mapping[str, Any], dataset: str) -> torch.Tensor:
    """One input file as a ``(N, *shape)`` tensor of the model's dtype; :class:`ExportError` naming the file."""
    if not path.is_file():
        raise ExportError(f"{path}: file not found")
    readers = {".npy": _read_npy, ".png": _read_png, ".wav": _read_wav}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise ExportError(f"{path}: unsupported input type '{path.suffix}'; use {', '.join(readers)}")
    if reader is _read_wav and "audio" not in record["raw"]:
        raise ExportError(f"{path}: dataset '{dataset}' has no raw-audio front end for the model's input "
                          f"'{record['name']}' {_shape(record)} (its audio inputs are precomputed spectrograms); "
                          "pass an .npy in that layout instead")
    x = reader(path, record)
    if x.is_floating_point() and not torch.isfinite(x).all():
        raise ExportError(f"{path}: holds NaN/inf values")
    return x


def _shape(record: Mapping[str, Any]) -> tuple[int, ...]:
    return tuple(record["shape"])


def _read_npy(path: Path, record: Mapping[str, Any]) -> torch.Tensor:
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ExportError(f"{path}: unreadable .npy file ({_first_line(exc)})") from None
    shape = _shape(record)
    if arr.shape == shape:
        arr = arr[None]
    elif arr.shape[1:] != shape or not len(arr):
        raise ExportError(f"{path}: shape {arr.shape} is not the model's '{record['name']}' input {shape} "
                          f"(or a batch of it, (N, {', '.join(map(str, shape))}), N > 0)")
    dtype = getattr(torch, record["dtype"])
    integer = np.issubdtype(arr.dtype, np.integer)
    if not (integer or (dtype.is_floating_point and np.issubdtype(arr.dtype, np.floating))):
        raise ExportError(f"{path}: dtype {arr.dtype} cannot feed the model's {record['dtype']} input '{record['name']}'")
    return torch.from_numpy(np.ascontiguousarray(arr)).to(dtype)


def _normalise(path: Path, x: torch.Tensor, record: Mapping[str, Any]) -> torch.Tensor:
    norm = record["normalisation"]
    if norm["kind"] == "unrecorded":
        raise ExportError(f"{path}: {norm['note']}, so a raw file cannot be preprocessed as in training; pass an .npy "
                          f"already in the model's input layout {_shape(record)}")
    if norm["kind"] == "none":
        return x
    shape = norm.get("shape") or [-1, *[1] * (x.dim() - 1)]  # as recorded (e.g. one value per mel bin), else per channel
    mean, std = (torch.tensor(norm[k], dtype=torch.float32).view(shape) for k in ("mean", "std"))
    return (x - mean) / std


def _read_png(path: Path, record: Mapping[str, Any]) -> torch.Tensor:
    from PIL import Image, ImageOps

    shape, raw = _shape(record), record["raw"].get("image")
    if raw is None:
        raise ExportError(f"{path}: the model's input '{record['name']}' {shape} is not a 1- or 3-channel image; "
                          "pass an .npy in that layout")
    c, h, w = shape
    resample = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}[raw["resample"]]
    try:
        with Image.open(path) as img:
            img = img.convert("L" if c == 1 else "RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ExportError(f"{path}: unreadable image ({exc})") from None
    img = ImageOps.fit(img, (w, h), method=resample) if raw["resize"] == "fit" else img.resize((w, h), resample)
    arr = np.asarray(img, dtype=np.float32).reshape(h, w, c).transpose(2, 0, 1) * np.float32(raw["pixel_scale"])
    return _normalise(path, torch.from_numpy(np.ascontiguousarray(arr)), record)[None]


def _read_wav(path: Path, record: Mapping[str, Any]) -> torch.Tensor:
    from crossmodal_kd.data.base import DataError
    from crossmodal_kd.data.cremad import DecodeParams, log_mel, read_audio

    params = DecodeParams(**{k: v for k, v in record["raw"]["audio"].items() if k != "dataset"})
    try:
        mel = torch.from_numpy(log_mel(read_audio(path, params), params))
    except DataError as exc:
        raise ExportError(str(exc)) from None
    if tuple(mel.shape) != _shape(record):
        raise ExportError(f"{path}: gives a log-mel of shape {tuple(mel.shape)}, not the model's {_shape(record)}")
    return _normalise(path, mel.float(), record)[None]


def format_predictions(rows: list[tuple[str, list[tuple[str, float]]]]) -> str:
    """Printable ``predict`` output: each sample, then its classes and probabilities."""
    width = max(len(name) for _, classes in rows for name, _ in classes)
    lines = []
    for label, classes in rows:
        lines.append(label)
        lines += [f"  {name:<{width}}  {p:.4f}" for name, p in classes]
    return "\n".join(lines)
