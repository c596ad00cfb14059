"""Command line: `icl-scale run` (the main job), `icl-scale suite` (every variant in one launch) and
`icl-scale report RUN_DIR`.

    icl-scale run --config launcher/default.yaml --data.tasks sst2,cb --data.eval_max 20
    icl-scale suite --preset smoke --output.run_dir runs/smoke
    ACCELERATE_USE_CPU=true accelerate launch --config_file launcher/cpu_2proc.yaml -m icl_scale run ...
    icl-scale report runs/default
    icl-scale export runs/default --to exports/default      (records as a Hugging Face dataset)
    icl-scale launch --config_file launcher/cpu_2proc.yaml run ...   (accelerate launch, our exit codes)

Every config field is an option (`icl-scale run --help`). Bad input: one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import os
import sys
import typing

from icl_scale import config as C
from icl_scale.errors import UserError, say


def _config_parser(sub, name: str, help: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=help, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", help=f"start from a preset config: {', '.join(C.presets())} "
                                    "(icl_scale/presets/<name>.yaml)")
    p.add_argument("--config", help="YAML file with any subset of the config tree (sections "
                                    "model, data, eval, finetune, output, suite, sweep, report); over the preset")
    for name, f, typ in C.leaves():
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if typing.get_origin(typ) is tuple:
            default = ",".join(map(str, default))
        extra = f" (one of: {', '.join(f.metadata['choices'])})" if f.metadata["choices"] else ""
        p.add_argument(f"--{name}", dest=name, default=argparse.SUPPRESS, metavar=typ.__name__ if isinstance(typ, type) else "LIST",
                       help=f"{f.metadata['help']}{extra} [default: {default}]")
    return p


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="icl-scale", description="ICL vs finetuning, the whole study as one job.")
    sub = ap.add_subparsers(dest="command", required=True)
    _config_parser(sub, "run", "evaluate and finetune every task and seed, stream shards, write the report")
    _config_parser(sub, "suite", "the whole study in one launch: every variant of suite.variants (base, "
                                 "label switching, untrained control) as a run, then one suite report")
    _config_parser(sub, "sweep", "the study over models × k in one launch: every (model, k) of sweep.models × "
                                 "sweep.k as a run, then one sweep report (figures against model size and k)")
    r = sub.add_parser("report", help="rebuild reports/<run>/ (report.md, metrics.csv, results.json, figures) "
                                      "from a run dir and print the summary")
    r.add_argument("run_dir")
    r.add_argument("--report-dir", default="reports", help="the report goes to <report-dir>/<run name>/")
    r.add_argument("--compare-reference", action="store_true",
                   help="put the papers' GPT 1.3B figures (DESIGN.md §3) beside each figure")
    r.add_argument("--report.exclude_diverged", dest="exclude_diverged", default=None, choices=("true", "false"),
                   help="leave diverged FT runs out of every mean (default: the run's report.exclude_diverged)")
    e = sub.add_parser("export", help="a run's merged records (ids, predictions, option scores, attention outputs "
                                      "and maps) as a Hugging Face datasets DatasetDict, one split per task × "
                                      "setting × seed, loadable with datasets.load_from_disk")
    e.add_argument("run_dir")
    e.add_argument("--to", required=True, help="the dataset directory to write (replaced whole)")
    sub.add_parser("launch", add_help=False,
                   help="`accelerate launch -m icl_scale` with icl-scale's exit codes: icl-scale launch "
                        "[accelerate launch options] run|suite|sweep [options] (2: bad input, 130: interrupted)")
    return ap


def _config_of(args) -> C.RunConfig:
    return C.load(args.config, {k: v for k, v in vars(args).items() if "." in k}, args.preset)


def parse_config(argv: list[str], command: str = "suite") -> C.RunConfig:
    """The config `icl-scale <command> <argv>` runs."""
    return _config_of(build_parser().parse_args([command, *argv]))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["launch"]:   # accelerate's own options follow: not parsed here
        from icl_scale.runtime.launch import main as launch

        return launch(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        from icl_scale.runtime.rundir import check_writable   # every path written is checked before any work

        if args.command in ("run", "suite", "sweep"):
            cfg = _config_of(args)
            from icl_scale.runtime.tracking import check_installed

            check_writable(cfg.output.run_dir, "config field output.run_dir")
            check_writable(cfg.output.report_dir, "config field output.report_dir")
            check_installed(cfg.output.trackers)
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            if args.command == "run":
                from icl_scale.run import run

                run(cfg)
            elif args.command == "sweep":
                from icl_scale.sweep import sweep

                failed = sweep(cfg)
                if failed:
                    print(f"icl-scale: sweep: {len(failed)} member(s) failed: {', '.join(failed)} (see the sweep "
                          "report)", file=sys.stderr)
                    return 1
            else:
                from icl_scale.suite import suite

                suite(cfg)
        elif args.command == "export":
            from icl_scale.export import export

            check_writable(args.to, "option --to")
            splits = export(args.run_dir, args.to)
            print(f"exported {len(splits)} splits to {args.to}", file=sys.stderr)
        elif args.command == "report":
            from pathlib import Path

            from icl_scale.report.render import write_report
            from icl_scale.runtime.progress import console

            check_writable(args.report_dir, "option --report-dir")
            exclude = None if args.exclude_diverged is None else args.exclude_diverged == "true"
            if (Path(args.run_dir) / "sweep.json").is_file():   # a sweep dir: its members' reports, then its own
                from icl_scale.report.sweep import read_sweep, write_sweep_report

                for m in read_sweep(Path(args.run_dir)):
                    if m["results"] is not None:
                        write_report(Path(args.run_dir) / m["run_dir"], Path(args.report_dir) / Path(args.run_dir).name,
                                     exclude_diverged=exclude)
                write_sweep_report(Path(args.run_dir), Path(args.report_dir), console=console())
                return 0
            write_report(Path(args.run_dir), Path(args.report_dir), console=console(), compare=args.compare_reference,
                         exclude_diverged=exclude)
    except UserError as e:
        say(f"icl-scale: error: {e}")
        return 2
    except KeyboardInterrupt:   # every write is atomic: what finished is kept, the rerun resumes
        say("icl-scale: interrupted; rerun the same command to resume")
        return 130
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise
        say(f"icl-scale: error: {e.strerror} writing {e.filename}; what finished is kept: make room and rerun "
            f"the same command to resume")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
