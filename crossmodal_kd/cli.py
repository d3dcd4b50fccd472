"""``crossmodal-kd`` command line: run, eval, data build/check, bench, report, export, predict, list."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from crossmodal_kd import load_components


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    load_components()
    if getattr(args, "no_progress", False):
        disable_library_progress_bars()
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("interrupted; resume with --resume", file=sys.stderr)
        return 130
    except Exception as exc:  # one clear line for users; --verbose keeps the traceback
        if args.verbose:
            raise
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


def disable_library_progress_bars() -> None:
    """``--no-progress`` also silences the model-loading bars of transformers and huggingface_hub."""
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    disable_progress_bars()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="crossmodal-kd", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="log more, and show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="train every stage of a config")
    add_run_arguments(r)
    r.set_defaults(func=cmd_run)

    e = sub.add_parser("eval", help="evaluate the saved models of a run directory on val and test")
    e.add_argument("run_dir")
    e.set_defaults(func=cmd_eval)

    d = sub.add_parser("data", help="build or check a dataset")
    dsub = d.add_subparsers(dest="data_command", required=True)
    for name, func, text in (("build", cmd_data_build, "build (or verify) a dataset's cache"), ("check", cmd_data_check, "report missing/unreadable files")):
        q = dsub.add_parser(name, help=text)
        q.add_argument("name")
        q.add_argument("--root", default="data")
        q.add_argument("--set", dest="params", action="append", default=[], metavar="KEY=VALUE", help="dataset parameter")
        q.set_defaults(func=func)

    b = sub.add_parser("bench", help="run configs x seeds x student variants and tabulate mean/std")
    b.add_argument("bench_file")
    b.add_argument("--seeds", type=int, nargs="+", help="override the file's seeds")
    b.add_argument("--variants", nargs="+", help="run (and tabulate) only these student variants")
    b.add_argument("--draws", type=int, nargs="+", help="run (and tabulate) only these of the file's data draws; tuning stays on its first")
    b.add_argument("--output-dir")
    b.add_argument("--fast-dev-run", action="store_true")
    b.add_argument("--report-only", action="store_true", help="train nothing; tabulate the finished runs")
    b.add_argument("--no-archive", action="store_true", help="neither read nor write the file's results archive (archive:)")
    b.add_argument("--no-progress", action="store_true", help="no progress bars (training, and model loading by transformers / huggingface_hub)")
    b.set_defaults(func=cmd_bench)

    rp = sub.add_parser("report", help="write report.html (tables, curves, routing, environment, config) for a run or benchmark directory")
    rp.add_argument("directory", help="a run directory, or a benchmark's output_dir")
    rp.set_defaults(func=cmd_report)

    x = sub.add_parser("export", help="export a run's model (default: the final student) with its input spec")
    x.add_argument("run_dir")
    x.add_argument("--stage", help="stage to export from (default: the last finished stage)")
    x.add_argument("--model", help="model of that stage (default: 'student', else the stage's only model)")
    x.add_argument("--format", required=True, choices=["safetensors", "onnx", "torchscript"])
    x.add_argument("--out", help="model file to write (default: RUN_DIR/exports/FORMAT/STAGE_MODEL.EXT); its spec goes beside it as .json")
    x.set_defaults(func=cmd_export)

    pr = sub.add_parser("predict", help="classify your own .npy/.png/.wav files with an exported model")
    pr.add_argument("exported", help="an exported .onnx, .pt (TorchScript) or .safetensors file, its .json beside it")
    pr.add_argument("--input", dest="inputs", action="append", required=True, metavar="[NAME=]FILE",
                    help="a file for the model's input NAME (NAME may be left out when it takes one); repeatable")
    pr.add_argument("--top", type=int, default=5, help="classes shown per sample (0: all)")
    pr.set_defaults(func=cmd_predict)

    ls = sub.add_parser("list", help="list registered components")
    ls.set_defaults(func=cmd_list)
    return p


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config")
    p.add_argument("--output-dir", help="run directory (default: config's output_dir or runs/<config name>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config key (dotted path)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in its directory (stages whose fingerprint matches)")
    p.add_argument("--restart-stage", action="append", default=[], metavar="NAME",
                   help="delete stage NAME and the stages depending on it and train them again; resumes the rest (repeatable)")
    p.add_argument("--stage-cache", metavar="DIR", help="copy finished stages with the same fingerprint (and code) from DIR instead of training them; add new ones")
    p.add_argument("--fast-dev-run", action="store_true", help="every stage on a couple of batches (plumbing check)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (training, and model loading by transformers / huggingface_hub)")


def cmd_run(args: argparse.Namespace) -> int:
    from crossmodal_kd.config import load_config
    from crossmodal_kd.engine.trainer import Runner

    cfg = load_config(args.config, args.overrides)
    run_dir = Path(args.output_dir or cfg.output_dir or Path("runs") / Path(args.config).stem)
    Runner(cfg, run_dir, resume=args.resume, fast_dev_run=args.fast_dev_run, progress=not args.no_progress,
           restart_stages=args.restart_stage, stage_cache=args.stage_cache).run()
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from crossmodal_kd.config import load_config
    from crossmodal_kd.engine.report import results_table
    from crossmodal_kd.engine.trainer import Runner

    run_dir = Path(args.run_dir)
    cfg = load_config(run_dir / "config.yaml")
    print(results_table(Runner(cfg, run_dir, resume=True).evaluate_saved()))
    return 0


def _dataset(args: argparse.Namespace):
    import yaml

    from crossmodal_kd.data import build_dataset

    params = {}
    for item in args.params:
        key, _, value = item.partition("=")
        params[key] = yaml.safe_load(value)
    return build_dataset(args.name, args.root, params, where=f"dataset '{args.name}' --set")


def cmd_data_build(args: argparse.Namespace) -> int:
    from crossmodal_kd.data.base import BuildableFamily

    ds = _dataset(args)
    if not isinstance(ds, BuildableFamily):
        print(f"dataset '{args.name}' is not built by this tool (`crossmodal-kd data check {args.name}` checks it); "
              f"see datasets/{args.name}/README.md")
        return 1
    path = ds.build()
    print(f"{args.name}: ready at {path}")
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    problems = _dataset(args).check()
    for p in problems:
        print(p)
    print(f"{args.name}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


def cmd_bench(args: argparse.Namespace) -> int:
    from crossmodal_kd.bench import load_bench, run_bench, write_reports

    bench = load_bench(args.bench_file)
    if args.seeds:
        bench.seeds = args.seeds
        for exp in bench.experiments:
            exp.seeds = None
    if args.variants:
        unknown = sorted(set(args.variants) - set(bench.variants))
        if unknown:
            print(f"error: {args.bench_file}: no variant {', '.join(unknown)}; variants: {', '.join(bench.variants)}", file=sys.stderr)
            return 2
        bench.variants = {v: o for v, o in bench.variants.items() if v in args.variants}
    if args.output_dir:
        bench.output_dir = args.output_dir
    if args.no_archive:
        bench.archive = None
    records = run_bench(bench, fast_dev_run=args.fast_dev_run, progress=not args.no_progress, report_only=args.report_only,
                        draws=args.draws)
    if not records:
        print(f"no finished runs under {bench.output_dir}")
        return 1
    table = write_reports(bench, records)
    print(f"\n{table}\n\n(written to {bench.output_dir}/results.md, .csv, .png, report.html)")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from crossmodal_kd.engine.html_report import write_report

    print(write_report(args.directory))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from crossmodal_kd.export import export

    out, spec = export(args.run_dir, args.format, stage=args.stage, model=args.model, out=args.out)
    src, done = spec["source"], spec["export"]
    print(f"exported {src['file']} (stage '{src['stage']}', model '{src['model']}': {src['chosen']})")
    print(f"wrote {out} and {out.with_suffix('.json')}")
    if args.format == "safetensors":
        print(f"weights round-trip exactly (logits on {done['check']['rows']} validation rows identical)")
    else:
        name = f"ONNX (opset {done['opset']})" if args.format == "onnx" else "TorchScript"
        print(f"{name} vs PyTorch on {done['check']['rows']} validation rows: max abs logit difference "
              f"{done['check']['max_abs_diff']:.3g}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from crossmodal_kd.export import format_predictions, predict

    inputs: dict[str | None, str] = {}
    for item in args.inputs:
        name, sep, path = item.partition("=")
        inputs[name if sep else None] = path if sep else item
    print(format_predictions(predict(args.exported, inputs, top=args.top)))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from crossmodal_kd.registry import ALL_REGISTRIES

    print(json.dumps({k: r.list() for k, r in ALL_REGISTRIES.items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
