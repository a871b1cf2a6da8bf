"""The ``latentpipe`` command.

    latentpipe run [--config X] [--force STAGE] [--until STAGE] [key=value ...]   stages in order
    latentpipe <stage> [--config X] [key=value ...]               one stage
    latentpipe config show [--config X] [--docs] [key=value ...]  the resolved config
    latentpipe data inspect PATH|PATTERN|URL [--sheet out.png]    what is in a shard set
    latentpipe weights fetch|list                                 pretrained LPIPS/FID weights
    latentpipe export --format diffusers|dit [--part P] OUT [--config X] [key=value ...]
                                                                  the trained DiT (+ autoencoder) for diffusers
                                                                  or facebookresearch/DiT (docs/interop.md)
    latentpipe submit|status [--config X] [...]                   the stages as SLURM jobs (pipeline/slurm.py)
    latentpipe report RUN_DIR                                     rebuild evaluate's report.md/.html and plots

Without ``--config`` the embedded default experiment is used (spelled out in configs/tiny.yaml).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence

from pipeline import config, manifest, stage_registry
from pipeline.errors import REQUEUE_EXIT_CODE, LatentpipeError, StageInterrupted

log = logging.getLogger("latentpipe")


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="experiment YAML (default: the embedded tiny experiment)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. data.resolution=32")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="latentpipe", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="store_true", help="debug logging, tracebacks")
    verbosity.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = commands.add_parser("run", help="run every stage in order, skipping up-to-date ones")
    run.add_argument(
        "--force",
        action="append",
        default=[],
        choices=list(stage_registry.STAGES),
        metavar="STAGE",
        help="rerun STAGE even if its output is up to date (repeatable)",
    )
    run.add_argument("--until", choices=list(stage_registry.STAGES), metavar="STAGE", help="stop after STAGE")
    _add_config_args(run)

    for spec in stage_registry.PIPELINE:
        doc = spec.doc()
        sub = commands.add_parser(
            spec.name,
            help=doc.splitlines()[0].replace("%", "%%"),
            description=doc,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _add_config_args(sub)

    config_cmd = commands.add_parser("config", help="show the resolved config").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    show = config_cmd.add_parser("show", help="print the resolved config as YAML")
    show.add_argument("--docs", action="store_true", help="list every key with its documentation")
    _add_config_args(show)

    data = commands.add_parser("data", help="inspect shard sets").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    inspect = data.add_parser("inspect", help="sample counts, classes, image sizes, contact sheet")
    inspect.add_argument("spec", metavar="PATH|PATTERN|URL")
    inspect.add_argument("--sheet", help="write a PNG contact sheet of the first images here")
    inspect.add_argument("--timeout", type=float, default=30.0, help="seconds per URL before giving up")

    from pipeline.interop.run_export import FORMATS, PARTS

    export = commands.add_parser(
        "export",
        help="write the run's DiT (+ autoencoder) for diffusers or DiT's code",
        description="See docs/interop.md for what maps and what is refused.",
    )
    export.add_argument(
        "--format",
        required=True,
        choices=FORMATS,
        help="diffusers: a folder (DiTPipeline by default); dit: a facebookresearch/DiT .pt/.safetensors",
    )
    export.add_argument(
        "--part",
        default="pipeline",
        choices=PARTS,
        help="diffusers: the whole DiTPipeline, the DiT alone, or the KL autoencoder alone",
    )
    export.add_argument("out", metavar="OUT", help="new folder (diffusers) or file (dit) to write")
    _add_config_args(export)

    from pipeline import slurm  # submit, status

    slurm.add_parsers(commands)

    report = commands.add_parser(
        "report",
        help="rebuild the evaluation report (plots, report.md, report.html)",
        description="Rebuild RUN_DIR/evaluate/report.md, report.html and plots/ from the "
        "metrics the stages recorded (nothing is recomputed).",
    )
    report.add_argument("run_dir", metavar="RUN_DIR", help="a run directory, e.g. runs/tiny")

    weights = commands.add_parser("weights", add_help=False, help="fetch/list pretrained weights (LPIPS, FID)")
    weights.add_argument("arguments", nargs=argparse.REMAINDER, help="see `latentpipe weights --help`")
    return parser


def run_pipeline(cfg: config.Config, force: Sequence[str] = (), until: str | None = None) -> dict[str, float | None]:
    """Every stage in order (up to and including ``until``); a stage whose output is complete,
    from the same config section and the same inputs, is skipped unless forced. Returns each
    stage's wall time (None: skipped)."""
    names = list(stage_registry.STAGES)
    selected = stage_registry.PIPELINE[: names.index(until) + 1] if until else stage_registry.PIPELINE
    times: dict[str, float | None] = {}
    for number, spec in enumerate(selected, 1):
        header = f"[{number}/{len(selected)}] {spec.name}"
        fresh, reason = manifest.up_to_date(cfg, spec.name, spec.sections, spec.inputs)
        if fresh and spec.name not in force:
            log.info("%s: up to date, skipped (--force %s reruns it)", header, spec.name)
            times[spec.name] = None
            continue
        log.info("%s: running (%s)", header, "forced" if spec.name in force else reason)
        start = time.perf_counter()
        spec.run(cfg)
        times[spec.name] = elapsed = time.perf_counter() - start
        log.info("%s: done in %s", header, _duration(elapsed))
    return times


def _duration(seconds: float) -> str:
    seconds = round(seconds, 1)  # 419.96 s is 7m00.0s, not 6m60.0s
    return f"{int(seconds // 60)}m{seconds % 60:04.1f}s" if seconds >= 60 else f"{seconds:.1f}s"


SUMMARY_METRICS = (  # (stage, metric, label, format)
    ("autoencoder", "val_psnr", "autoencoder val PSNR (dB)", "{:.2f}"),
    ("evaluate", "fid", "FID (samples vs val)", "{:.2f}"),
    ("evaluate", "fid_train_vs_val", "FID floor (train vs val)", "{:.2f}"),
    ("evaluate", "classifier_accuracy", "classifier accuracy on samples", "{:.1%}"),
    ("evaluate", "classifier_real_val_accuracy", "classifier accuracy on real val", "{:.1%}"),
    ("evaluate", "latent_bits_per_dim", "bits/dim (val latents, PF-ODE)", "{:.3f}"),
)


def summary(cfg: config.Config, times: dict[str, float | None]) -> str:
    """What `latentpipe run` made: per-stage times, where the samples are, the headline metrics."""
    lines = ["", f"latentpipe run: {cfg.run_dir}"]
    for name, seconds in times.items():
        lines.append(f"  {name:<12} {'skipped (up to date)' if seconds is None else _duration(seconds)}")
    grid = cfg.stage_dir("sample") / "grid.png"
    if grid.is_file():
        lines.append(f"  sample grid: {grid}")
    report = cfg.stage_dir("evaluate") / "report.html"
    if report.is_file():
        lines.append(f"  report:      {report} (and report.md)")
    for stage, key, label, form in SUMMARY_METRICS:
        found = manifest.read(cfg.stage_dir(stage))
        value = (found or {}).get("metrics", {}).get(key)
        if value is not None:
            lines.append(f"  {label:<34} {form.format(value)}")
    return "\n".join(lines)


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "weights":
        from pipeline import weights

        return weights.main(args.arguments)
    if args.command == "data":
        from pipeline.data.inspect import inspect

        print(json.dumps(inspect(args.spec, sheet=args.sheet, timeout=args.timeout), indent=2))
        return 0
    if args.command == "report":
        from pipeline import report

        written = report.build(args.run_dir)
        print(f"{written}\n{written.with_name(report.REPORT_HTML)}")
        return 0
    if args.command in ("submit", "status"):
        from pipeline import slurm

        return slurm.dispatch(args)
    cfg = config.load(args.config, args.overrides)
    if args.command == "config":
        if args.docs:
            for key, doc, default in config.describe():
                print(f"{key} = {default!r}\n    {doc}")
        else:
            print(config.to_yaml(cfg), end="")
    elif args.command == "run":
        print(summary(cfg, run_pipeline(cfg, args.force, args.until)))
    elif args.command == "export":
        from pipeline.interop.run_export import export_run

        print(export_run(cfg, args.format, args.out, args.part))
    else:
        stage_registry.get(args.command).run(cfg)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "weights":  # its own parser reads its options, --help included
        args.arguments += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger().setLevel(level)
    try:
        return _dispatch(args)
    except LatentpipeError as err:
        if args.verbose:
            raise
        print(f"latentpipe: error: {err}", file=sys.stderr)
        return 2
    except StageInterrupted as stopped:
        hint = ": requeue" if stopped.exit_code == REQUEUE_EXIT_CODE else ""
        print(f"latentpipe: {stopped} (exit code {stopped.exit_code}{hint})", file=sys.stderr)
        return stopped.exit_code
    except KeyboardInterrupt:
        print("latentpipe: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
