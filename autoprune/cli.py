"""The ``autoprune`` command: parses arguments, calls the Python API, prints results.

A subcommand's flags are its options object's fields (:class:`~autoprune.options.SearchOptions`,
:class:`~autoprune.options.ExportOptions`) where it has one; errors a user can cause come back as one line.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn, Sequence

from autoprune.errors import AutopruneError, one_line
from autoprune.options import (BASE_EPOCHS, BASE_LR, DEFAULTS as D, EXPORT_DEFAULTS as E, FORMATS, ExportOptions,
                               SearchOptions)


def _epochs(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError("epochs cannot be negative")
    return value


def _ratios(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError("write ratios as 0.1,0.2,…") from None


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="resnet18",
                        help="torchvision name, package.module:factory or file.py:factory (default: resnet18)")
    parser.add_argument("--dataset", default="digits",
                        help="digits (offline), mnist, fashion-mnist, cifar10, cifar100, an image folder, "
                             "or file.py:factory returning (train, val, test) (default: digits)")
    parser.add_argument("--data-dir", default=D.data_dir, help="where torchvision data sets live (default: %(default)s)")
    parser.add_argument("--download", action="store_true", help="download the torchvision data set if missing")
    parser.add_argument("--task", default=D.task,
                        help="what the model is trained and judged on: file.py:name or package.module:name of a "
                             "factory returning an autoprune.Task (loss, score, inputs; default: classification)")
    parser.add_argument("--space", help="search space: a YAML file or a shipped name (resnet, mobilenet, vgg, "
                        "…; default: the one shipped for the architecture)")
    parser.add_argument("--importance", help="channel importance: l1, l2, bn_scale, taylor, fpgm or thinet "
                        "(default: the space's, l1)")


class _Parser(argparse.ArgumentParser):
    """Usage errors on one line, as every other error is (argparse adds the whole usage)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``autoprune`` command line: each subcommand's flags are added by its own function below."""
    parser = _Parser(prog="autoprune", description=
                                     "Budgeted structured pruning: sensitivity scan, Optuna search, export.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_add_search, _add_groups, _add_pareto, _add_report, _add_export, _add_dashboard, _add_studies,
                _add_bench, _add_bench_latency, _add_mlp_sweep):
        add(commands)
    return parser


def _add_search(commands: argparse._SubParsersAction) -> None:
    """``search``: its flags are the :class:`~autoprune.options.SearchOptions` fields, with their defaults."""
    search = commands.add_parser("search", help="search per-group pruning ratios under a budget "
                                 "(no arguments: an offline demo on digits)")
    _common(search)
    _base_budget_and_study(search)
    _finetune_and_space(search)
    _modes_latency_and_device(search)


def _base_budget_and_study(search: argparse.ArgumentParser) -> None:
    search.add_argument("--weights", help="state dict or checkpoint of the trained model; DEFAULT for "
                        "torchvision's pretrained weights; omitted: train the base model first")
    search.add_argument("--budget", default="flops=0.3",
                        help="flops=0.3 (share of base), flops=120M, params=1.5M, latency=3ms (or latency=0.5 "
                             "of the base's, timed here: see --latency-*), or several joined by a comma; a range, "
                             "flops=0.05..0.5, searches the whole trade-off in one study over 6 log-spaced "
                             "targets; FLOPs are thop MACs (default: flops=0.3)")
    search.add_argument("--trials", type=int, default=D.trials,
                        help="trials the study should reach, pruned ones included (default: %(default)s); with "
                             "--time-budget, the most candidates to try")
    search.add_argument("--time-budget",
                        help="wall time for the run, e.g. 30m, 1h30m, 600 (seconds), counted once the base "
                             "model is ready: it plans the scan, a successive-halving search and a final "
                             "fine-tune that fills the rest, and ends on time (--final-epochs is then ignored)")
    search.add_argument("--race", action=argparse.BooleanOptionalAction, default=None,
                        help="with --time-budget: race candidates by successive halving (--race), or check the "
                             "sensitivity seed against uniform and give it the rest (--no-race); default: a race "
                             "under 10m only, where it was measured to pay (docs/time-budgets.md)")
    search.add_argument("--study", help="study name (default: MODEL-DATASET-BUDGET)")
    search.add_argument("--storage", help="Optuna storage URL (default: sqlite file in the run directory)")
    search.add_argument("--out", help="run directory (default: results/STUDY)")
    search.add_argument("--workers", type=int, default=D.workers,
                        help="worker processes on this machine sharing the study (default: %(default)s); machines "
                             "join one study through a shared --storage")
    search.add_argument("--new-study", action="store_true", help="discard the stored study and start afresh")
    search.add_argument("--train-epochs", type=_epochs, help=f"epochs to train the base model (default {BASE_EPOCHS:g})")
    search.add_argument("--base-lr", type=float, default=D.base_lr,
                        help="learning rate for training the base model (default: %(default)s; 0.01 for VGG)")


def _finetune_and_space(search: argparse.ArgumentParser) -> None:
    search.add_argument("--finetune-epochs", type=_epochs, default=D.finetune_epochs,
                        help="fine-tune epochs per trial, fractions allowed (default: %(default)g)")
    search.add_argument("--final-epochs", type=_epochs, default=D.final_epochs,
                        help="fine-tune epochs for the winner (default: %(default)g)")
    search.add_argument("--lr", type=float, default=D.lr, help="fine-tune learning rate (default: %(default)s)")
    search.add_argument("--batch-size", type=int, default=D.batch_size, help="(default: %(default)s)")
    search.add_argument("--bn-batches", type=int, default=D.bn_batches,
                        help="training batches that recalibrate BatchNorm before the sensitivity scan scores "
                             "a cut (default: %(default)s)")
    search.add_argument("--grid", type=_ratios, default=None,
                        help="sensitivity ratios (default: the space's, e.g. 0.1,0.2,…,0.9)")
    search.add_argument("--max-ratio", type=float, default=None,
                        help="largest share of a group's channels a trial may remove (default: the space's)")
    search.add_argument("--round-to", type=int, default=None,
                        help="keep channel counts in multiples of this (default: the space's)")
    search.add_argument("--pruner", choices=("median", "none"), default=None,
                        help="median: stop a candidate below the median of the trials that got as far, half-way "
                             "through its fine-tune or, where that ranks the finished trials, right after the "
                             "cut (default); none: fine-tune every candidate to the end")
    search.add_argument("--granularity", choices=("channel", "weight"), default=D.granularity,
                        help="channel: remove channels (default); weight: per-layer magnitude sparsity under a "
                             "nonzero-params budget (--budget params=0.2)")


def _modes_latency_and_device(search: argparse.ArgumentParser) -> None:
    search.add_argument("--distill", action=argparse.BooleanOptionalAction, default=None,
                        help="fine-tune against the unpruned model's softened outputs (knowledge distillation); "
                             "default: on for a classifier whose outputs can be computed once (no random "
                             "augmentation), a resumed study as it was made")
    search.add_argument("--distill-weight", type=float, default=D.distill_weight,
                        help="share of the KD term in the loss, the rest cross-entropy (default: %(default)s)")
    search.add_argument("--temperature", type=float, default=D.temperature,
                        help="KD softmax temperature (default: %(default)g)")
    search.add_argument("--soft-epochs", type=_epochs, default=D.soft_epochs,
                        help="soft-prune the winner this many epochs (weakest filters zeroed, re-selected "
                             "each epoch by L2 norm) before removing them (default: 0, off)")
    search.add_argument("--latency-backend", choices=("torch", "onnxruntime"), default=D.latency_backend,
                        help="what --budget latency= times: torch (eager, on --device) or onnxruntime (CPU) "
                             "(default: torch)")
    search.add_argument("--latency-batch", type=int, default=D.latency_batch,
                        help="batch size latency is timed at (default: %(default)s)")
    search.add_argument("--latency-threads", type=int, default=D.latency_threads,
                        help="intra-op threads latency is timed with (default: %(default)s)")
    search.add_argument("--device", default=D.device, help="auto (CUDA if there is one), cpu, cuda, cuda:N")
    search.add_argument("--seed", type=int, default=D.seed)
    search.add_argument("--quiet", action="store_true", help="no progress bars or per-trial lines")


def _add_groups(commands: argparse._SubParsersAction) -> None:
    groups = commands.add_parser("groups", help="list the prunable channel groups of a model")
    _common(groups)


def _add_bench(commands: argparse._SubParsersAction) -> None:
    bench = commands.add_parser("bench", help="benchmark autoprune against uniform, global, seed-only and "
                                "random pruning at the same budgets (writes results/benchmarks/)")
    bench.add_argument("--models", type=_names, help="comma-separated models (default: resnet18,mobilenet_v2)")
    bench.add_argument("--budgets", type=_ratios, help="FLOPs shares (default: 0.1,0.05,0.02)")
    bench.add_argument("--seeds", type=_ints, help="comma-separated seeds (default: 0,1,2)")
    bench.add_argument("--methods", type=_names, help="methods (default: uniform,global,seed,random,autoprune,uniform-matched; add autoprune-distill and uniform-matched-distill for the rows that distill, fastnas for NVIDIA ModelOpt's FastNAS: pip install \"autoprune[bench-peers]\")")
    bench.add_argument("--dataset", help="data set (default: fashion-mnist; --quick: digits)")
    bench.add_argument("--task", help="file.py:name of an autoprune.Task factory (default: classification)")
    bench.add_argument("--train-images", type=int,
                       help="train on a fixed random subset of this many images (default: 20000; 0: all)")
    bench.add_argument("--time-budget", help="wall time of each search run, scan included, e.g. 120 or 2m "
                       "(default: 120 s; 0: the trial-count search)")
    bench.add_argument("--time-budgets", type=_names, help="the anytime curve: each method at each of these wall "
                       "times, e.g. 2m,10m,30m (default methods: seed-matched, autoprune, autoprune-race where "
                       "autoprune does not race, uniform-matched, random at the longest)")
    bench.add_argument("--random-every-time", action="store_true",
                       help="with --time-budgets, run random at each time budget, not only the longest")
    bench.add_argument("--proxy-sweep", action="store_true", help="only re-measure proxies.csv's plans: "
                       "BatchNorm-recalibrated score at 2, 8, 32, 100 batches on 1,000 and all validation images")
    bench.add_argument("--converged-epochs", type=_epochs,
                       help="fine-tune epochs of the *-converged rows (default: 10)")
    bench.add_argument("--trials", type=int, help="most candidates per search (default: 12)")
    bench.add_argument("--train-epochs", type=_epochs, help="base training epochs (default: 15)")
    bench.add_argument("--base-lr", type=float, help=f"base training learning rate (default: {BASE_LR:g})")
    bench.add_argument("--pruner", choices=("median", "none"), help="the searches' pruner (default: median)")
    bench.add_argument("--finetune-epochs", type=_epochs, help="per-trial fine-tune epochs (default: 1)")
    bench.add_argument("--final-epochs", type=_epochs,
                       help="fine-tune epochs of uniform, global and seed (default: 1)")
    bench.add_argument("--rank-plans", type=int, help="random plans, at the tightest budget, on which to measure "
                       "how well each cheap score ranks by converged accuracy (default: 0, none; --quick: 4)")
    bench.add_argument("--out", help="output folder (default: results/benchmarks)")
    bench.add_argument("--quick", action="store_true",
                       help="smoke test: digits, resnet18, flops=0.25, one seed, a 20 s time budget")
    bench.add_argument("--device", default="auto")
    bench.add_argument("--quiet", action="store_true")


def _add_bench_latency(commands: argparse._SubParsersAction) -> None:
    latency = commands.add_parser("bench-latency", help="how well the latency predictor predicts: random plans, "
                                  "predicted against timed, per model, backend and batch")
    latency.add_argument("--models", type=_names, default=["resnet18", "mobilenet_v2"],
                         help="comma-separated models (default: resnet18,mobilenet_v2)")
    latency.add_argument("--backends", type=_names, default=["torch", "onnxruntime"],
                         help="comma-separated backends (default: torch,onnxruntime)")
    latency.add_argument("--batches", type=_ints, default=[1, 32], help="comma-separated batch sizes (default: 1,32)")
    latency.add_argument("--plans", type=int, default=30, help="random plans per model and setting (default: 30)")
    latency.add_argument("--threads", type=int, default=1, help="intra-op threads (default: 1)")
    latency.add_argument("--search", metavar="MODEL",
                         help="instead: is a latency budget worth it on MODEL? per seed, a FLOPs-budgeted search "
                              "(--flops), then a latency-budgeted one capped at its winner's latency, both re-timed "
                              "after export (the benchmark's base model and data; torch, batch 1, one thread)")
    latency.add_argument("--flops", type=float, default=0.3, help="with --search: the FLOPs budget (default: 0.3)")
    latency.add_argument("--seeds", type=_ints, default=[0, 1, 2], help="with --search (default: 0,1,2)")
    latency.add_argument("--trials", type=int, default=D.trials, help="with --search (default: %(default)s)")
    latency.add_argument("--finetune-epochs", type=_epochs, default=D.finetune_epochs,
                         help="with --search (default: %(default)g)")
    latency.add_argument("--final-epochs", type=_epochs, default=D.final_epochs,
                         help="with --search (default: %(default)g)")
    latency.add_argument("--out", default="results/benchmarks", help="output folder (default: results/benchmarks)")
    latency.add_argument("--quiet", action="store_true")


def _add_mlp_sweep(commands: argparse._SubParsersAction) -> None:
    sweep = commands.add_parser("mlp-sweep", help="the MLP experiment: uniform weight pruning 10-60 %% before "
                                "and after fine-tuning, then the weight-level search at the same budgets")
    sweep.add_argument("--dataset", default="digits", help="digits (offline, default) or mnist (with --data-dir)")
    sweep.add_argument("--data-dir", default="data")
    sweep.add_argument("--download", action="store_true")
    sweep.add_argument("--levels", type=_ratios, default=None, help="sparsity levels (default: 0.1,0.2,…,0.6)")
    sweep.add_argument("--train-epochs", type=_epochs, default=10.0, help="epochs to train the MLP (default: 10)")
    sweep.add_argument("--finetune-epochs", type=_epochs, default=1.0,
                       help="fine-tune epochs after pruning, per trial and per result (default: 1)")
    sweep.add_argument("--trials", type=int, default=6, help="search trials per level (default: 6)")
    sweep.add_argument("--device", default="auto")
    sweep.add_argument("--seed", type=int, default=0)
    sweep.add_argument("--quiet", action="store_true")


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in _names(text)]
    except ValueError:
        raise argparse.ArgumentTypeError("write seeds as 0,1,2") from None


def _stored(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--study", required=True, help="study name (as search named it)")
    parser.add_argument("--storage", help="Optuna storage URL (default: sqlite:///RUN_DIR/study.db)")
    parser.add_argument("--run-dir", help="the folder search wrote, with base.pt and sensitivity.csv "
                        "(default: with --storage, the folder the study recorded; else results/STUDY)")


def _add_pareto(commands: argparse._SubParsersAction) -> None:
    pareto = commands.add_parser("pareto", help="the non-dominated trials: accuracy against FLOPs and params")
    _stored(pareto)
    pareto.add_argument("--csv", help="also save the front as CSV here")
    pareto.add_argument("--json", help="also save the front as JSON here")
    pareto.add_argument("--optuna-study", action="store_true",
                        help="also copy the trials into a 3-objective study STUDY-front in the same storage, "
                             "so `optuna best-trials --study-name STUDY-front` shows this front")


def _add_report(commands: argparse._SubParsersAction) -> None:
    report = commands.add_parser("report", help="PNG plots and report.md for a study")
    _stored(report)
    report.add_argument("--trial", type=int, help="trial whose channels to show (default: the best)")
    report.add_argument("--out", help="report folder (default: RUN_DIR/report)")


def _add_export(commands: argparse._SubParsersAction) -> None:
    """``export``: its flags are the :class:`~autoprune.options.ExportOptions` fields, with their defaults."""
    export = commands.add_parser("export", help="rebuild a trial, fine-tune, test and write it out")
    _stored(export)
    export.add_argument("--trial", type=int, help="trial number (default: the best)")
    export.add_argument("--flops", help="export the most accurate trial at or under this many FLOPs (thop MACs): "
                        "a share of the base (0.2, 20%%) or a count (8M); picks a point of a range study")
    export.add_argument("--params", help="likewise for params (0.1, 1.5M); with --flops, both must hold")
    export.add_argument("--out", help="output folder (default: RUN_DIR/trial-N)")
    export.add_argument("--final-epochs", type=_epochs, default=E.final_epochs,
                        help="fine-tune epochs (default: %(default)g)")
    export.add_argument("--format", action="append", default=[], choices=FORMATS,
                        help="also write this format, checked against PyTorch (repeatable)")
    export.add_argument("--quantize", choices=["dynamic"], help="also write an int8 dynamically quantized copy")
    export.add_argument("--latency-batch", type=int, default=E.latency_batches[-1],
                        help="the larger batch for CPU latency, besides batch 1 (default: %(default)s)")
    export.add_argument("--repeats", type=int, default=E.repeats,
                        help="timed runs per latency (median; default: %(default)s)")
    export.add_argument("--latency-threads", type=int, default=E.threads,
                        help="CPU threads while timing (default: %(default)s, steady on a busy machine)")
    export.add_argument("--data-dir", default=E.data_dir,
                        help="where torchvision data sets live (default: %(default)s)")
    export.add_argument("--download", action="store_true", help="download the torchvision data set if missing")
    export.add_argument("--task", help="the search's --task (default: the one the study records)")
    export.add_argument("--device", default=E.device, help="for the fine-tune: auto, cpu, cuda, cuda:N")
    export.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_dashboard(commands: argparse._SubParsersAction) -> None:
    dashboard = commands.add_parser("dashboard", help="serve optuna-dashboard on the study's storage "
                                    "(the search and its front copy) on localhost; Ctrl-C stops it")
    _stored(dashboard)
    dashboard.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    dashboard.add_argument("--port", type=int, default=8080, help="port (default: 8080; 0: a free one)")


def _add_studies(commands: argparse._SubParsersAction) -> None:
    studies = commands.add_parser("studies", help="list studies with trial counts, budget and best accuracy")
    studies.add_argument("--storage", help="Optuna storage URL (default: every results/*/study.db)")


def _search(args: argparse.Namespace) -> None:
    from autoprune.api import search
    from autoprune.counting import human

    result = search(args.model, args.dataset, args.budget, SearchOptions.from_args(args))
    s = result.summary
    if args.granularity == "weight":
        _weight_summary(result)
        return
    print(f"best trial {s['trial']} of {s['trials']} ({s['pruned_trials']} pruned): "
          f"FLOPs {human(s['flops'])} ({s['flops_share']:.1%} of {human(s['base_flops'])}, thop MACs), "
          f"params {human(s['params'])} ({s['params_share']:.1%} of {human(s['base_params'])})")
    _latency_and_accuracy(s)
    print(f"wrote {result.out}/: model.pt weights.pt plan.json summary.json sensitivity.csv trials.csv")


def _latency_and_accuracy(s: dict) -> None:
    """The summary lines both searches print: the winner's latency (where timed) and its accuracy."""
    if "ms" in s.get("latency", {}):
        t, again = s["latency"], s.get("latency_check")
        print(f"latency {t['ms']:.3g} ± {t['spread_ms']:.2g} ms ({t['share']:.1%} of {t['base_ms']:.3g} ms; "
              f"{t['latency_backend']}, batch {t['latency_batch']}, {t['latency_threads']} thread(s))"
              + (f"; re-timed after export {again['measured_ms']:.3g} ms of {again['limit_ms']:.3g} ms allowed"
                 if again else ""))
    from autoprune.inputs.task import Score

    score = Score.of(s)
    print(f"test {score.name} {score.show(s['test_accuracy'])} (base {score.show(s['base_test_accuracy'])}), "
          f"val {score.show(s['val_accuracy'])} (base {score.show(s['base_val_accuracy'])}), {s['seconds']:.0f}s")


def _weight_summary(result) -> None:
    from autoprune.counting import human

    s = result.summary
    print(f"best trial {s['trial']} of {s['trials']}: {human(s['nonzero_params'])} {s['nonzero_unit']} "
          f"({s['nonzero_share']:.1%} of {human(s['base_params'])}); FLOPs {human(s['flops'])} (thop MACs, dense)")
    print(f"size: {s['model_dense_bytes'] / 1e6:.2f} MB dense, {s['model_sparse_bytes'] / 1e6:.2f} MB sparse (CSR)")
    _latency_and_accuracy(s)
    print(f"wrote {result.out}/: model.pt weights.pt weights_sparse.pt plan.json summary.json "
          "sensitivity.csv trials.csv")


def _sweep(args: argparse.Namespace) -> None:
    from autoprune.bench.mlp_sweep import FOOTNOTE, HEADER, LEVELS, format_row, mlp_sweep

    print(HEADER)
    mlp_sweep(args.dataset, args.levels or LEVELS, args.train_epochs, args.finetune_epochs, args.trials,
              device=args.device, seed=args.seed, quiet=args.quiet, data_dir=args.data_dir, download=args.download,
              report=lambda row: print(format_row(row), flush=True))
    print(FOOTNOTE)


def _groups(args: argparse.Namespace) -> None:
    from autoprune.api import describe_groups

    print(describe_groups(args.model, args.dataset, space=args.space, importance=args.importance,
                          data_dir=args.data_dir, download=args.download, task=args.task))


def _pareto(args: argparse.Namespace) -> None:
    from autoprune.files import write_json, write_text
    from autoprune.report.pareto import pareto_front, save_front_study, to_text
    from autoprune.study.runs import open_run

    run = open_run(args.study, args.storage, args.run_dir)
    front = pareto_front(run)
    base = run.base_cost()
    print(f"{run.name}: {len(front)} of {len(run.complete())} finished trials on the front "
          f"(budget {run.config.get('budget')}; base {base})")
    print(to_text(front, run.score))
    if args.csv:
        write_text(args.csv, front.to_csv(index=False))
    if args.json:
        write_json(args.json, front.to_dict(orient="records"))
    if args.optuna_study:
        copy = save_front_study(run)
        print(f"saved study {copy.study_name!r} in {run.storage}: optuna best-trials --study-name "
              f"{copy.study_name} --storage {run.storage}")


def _report(args: argparse.Namespace) -> None:
    from autoprune.report.plots import write_report
    from autoprune.study.runs import open_run

    print(f"wrote {write_report(open_run(args.study, args.storage, args.run_dir), args.out, args.trial)}")


def _export(args: argparse.Namespace) -> None:
    from autoprune.api import export_trial
    from autoprune.counting import human

    s = export_trial(args.study, ExportOptions.from_args(args))
    from autoprune.inputs.task import Score

    score = Score.of(s)
    print(f"trial {s['trial']}: FLOPs {human(s['flops'])} ({s['flops_share']:.1%} of base, thop MACs), "
          f"params {human(s['params'])} ({s['params_share']:.1%}); test {score.name} {score.show(s['test_accuracy'])} "
          f"(base {score.show(s['base_test_accuracy'])})")
    for name, times in s["latency_ms"].items():
        print(f"CPU latency {name}: " + ", ".join(f"batch {b} {ms:.2f} ms" for b, ms in times.items())
              + f" (median of {s['latency_repeats']}, {s['latency_threads']} thread(s))")
    for name in ("onnx", "torchscript"):
        if name in s and "error" not in s[name]:
            print(f"{s[name]['file']}: matches PyTorch (largest difference {s[name]['max_abs_diff']:.2g})")
    if "quantized" in s:
        q = s["quantized"]
        print(f"int8: {q['state_dict_bytes'] / 1e6:.3f} MB on disk (float {q['float_state_dict_bytes'] / 1e6:.3f} MB), "
              f"test {score.name} {score.show(q['test_accuracy'])}, {q['quantized_layers']} int8 layer(s) "
              "(Linear/RNN only)")
    print(f"wrote {s['out']}/: model.pt weights.pt plan.json summary.json"
          + "".join(f" {s[k]['file']}" for k in ("onnx", "torchscript", "quantized") if "file" in s.get(k, {})))


def _dashboard(args: argparse.Namespace) -> None:
    from autoprune.report.dashboard import serve
    from autoprune.study.runs import open_run

    run = open_run(args.study, args.storage, args.run_dir)
    try:
        serve(run, args.host, args.port, ready=lambda line: print(line, flush=True))
    except KeyboardInterrupt:  # how a server is stopped, not an interruption to resume from
        print("dashboard stopped")


def _studies(args: argparse.Namespace) -> None:
    from autoprune.study.runs import list_studies

    table = list_studies(args.storage)
    if table.empty:
        print("no studies found" + ("" if args.storage else " under results/; pass --storage URL"))
        return
    table["best_val_accuracy"] = table["best_val_accuracy"].map(lambda v: "" if v != v or v is None else f"{v:.2%}")
    print(table.drop(columns=["storage"]).to_string(index=False))


def _bench(args: argparse.Namespace) -> None:
    from dataclasses import replace
    from pathlib import Path

    from autoprune.bench.equal_time import BenchConfig, benchmark, quick
    from autoprune.study.halving import parse_duration

    config = quick(BenchConfig()) if args.quick else BenchConfig()
    budget = args.time_budget
    given = {"models": args.models, "budgets": args.budgets, "methods": args.methods, "trials": args.trials,
             "pruner": args.pruner, "dataset": args.dataset, "task": args.task, "train_images": args.train_images,
             "time_budget": None if budget is None else 0.0 if budget.strip() == "0" else parse_duration(budget),
             "converged_epochs": args.converged_epochs, "base_lr": args.base_lr,
             "train_epochs": args.train_epochs, "finetune_epochs": args.finetune_epochs,
             "final_epochs": args.final_epochs, "rank_plans": args.rank_plans,
             "seeds": args.seeds,
             "out": Path(args.out) if args.out else None}
    if args.time_budgets:  # the anytime curve
        from autoprune.bench.anytime import ANYTIME_METHODS
        given.update(time_budgets=[parse_duration(t) for t in args.time_budgets],
                     methods=args.methods or list(ANYTIME_METHODS))
    config = replace(config, **{k: v for k, v in given.items() if v is not None}, device=args.device,
                     quiet=args.quiet, command=args.command_line, random_every_time=args.random_every_time,
                     proxy_sweep=args.proxy_sweep)
    benchmark(config)
    print(f"wrote {config.out}/: bench.csv BENCHMARKS.md bench.png")


def _bench_latency(args: argparse.Namespace) -> None:
    from pathlib import Path

    from autoprune.bench.latency import bench_latency, latency_searches, search_lines, table_lines
    from autoprune.bench.markdown import update_section

    if args.plans < 1:
        raise AutopruneError("--plans must be at least 1")
    out = Path(args.out)
    if args.search:
        options = SearchOptions(trials=args.trials, finetune_epochs=args.finetune_epochs,
                                final_epochs=args.final_epochs)
        frame = latency_searches(args.search, args.flops, args.seeds, options, out, args.quiet)
        update_section(out / "BENCHMARKS.md", search_lines(frame), args.command_line)
        print(f"wrote {out}/: latency_search.csv, its section of BENCHMARKS.md")
        return
    frame = bench_latency(args.models, args.backends, args.batches, args.plans, args.threads, out, args.quiet)
    update_section(out / "BENCHMARKS.md", table_lines(frame), args.command_line)
    print(f"wrote {out}/: latency.csv, its section of BENCHMARKS.md")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.command_line = "autoprune " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.command is None:
        parser.print_help()
        return 0
    commands = {"search": _search, "groups": _groups, "pareto": _pareto, "report": _report,
                "export": _export, "studies": _studies, "dashboard": _dashboard, "bench": _bench,
                "bench-latency": _bench_latency, "mlp-sweep": _sweep}
    try:
        commands[args.command](args)
    except KeyboardInterrupt:
        print("autoprune: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except (AutopruneError, OSError) as err:  # OSError: a file or folder the user named cannot be used
        if os.environ.get(DEBUG_ENV):
            raise
        print(f"autoprune: error: {_one_line(err)}", file=sys.stderr)
        return 2
    return 0


DEBUG_ENV = "AUTOPRUNE_DEBUG"  # set to 1 to see the traceback behind a one-line error


def _one_line(err: BaseException) -> str:
    """The error as one line: messages from other libraries can span several."""
    text = one_line(err)
    return text if isinstance(err, AutopruneError) else f"{text} (set {DEBUG_ENV}=1 for the traceback)"
