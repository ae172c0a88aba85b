"""The ``autoprune`` command: parses arguments, calls the Python API, prints results.

It holds no logic of its own; errors a user can cause come back as one line.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from .errors import AutopruneError


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
    parser.add_argument("--data-dir", default="data", help="where torchvision data sets live (default: data)")
    parser.add_argument("--download", action="store_true", help="download the torchvision data set if missing")
    parser.add_argument("--importance", default="l1", help="channel importance: l1 (default), l2, or thinet "
                        "(greedy reconstruction of the next layer's output on a few training batches)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="autoprune", description=
                                     "Budgeted structured pruning: sensitivity scan, Optuna search, export.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    search = commands.add_parser("search", help="search per-group pruning ratios under a budget "
                                 "(no arguments: an offline demo on digits)")
    _common(search)
    search.add_argument("--weights", help="state dict or checkpoint of the trained model; DEFAULT for "
                        "torchvision's pretrained weights; omitted: train the base model first")
    search.add_argument("--budget", default="flops=0.3",
                        help="flops=0.3 (share of base), flops=120M, params=1.5M, or both joined by a "
                             "comma; FLOPs are thop MACs (default: flops=0.3)")
    search.add_argument("--trials", type=int, default=12, help="finished trials the study should reach")
    search.add_argument("--study", help="study name (default: MODEL-DATASET-BUDGET)")
    search.add_argument("--storage", help="Optuna storage URL (default: sqlite file in the run directory)")
    search.add_argument("--out", help="run directory (default: results/STUDY)")
    search.add_argument("--new-study", action="store_true", help="discard the stored study and start afresh")
    search.add_argument("--train-epochs", type=_epochs, help="epochs to train the base model (default 15)")
    search.add_argument("--finetune-epochs", type=_epochs, default=1.0,
                        help="fine-tune epochs per trial, fractions allowed (default: 1)")
    search.add_argument("--final-epochs", type=_epochs, default=5.0,
                        help="fine-tune epochs for the winner (default: 5)")
    search.add_argument("--lr", type=float, default=0.01, help="fine-tune learning rate (default: 0.01)")
    search.add_argument("--batch-size", type=int, default=64)
    search.add_argument("--grid", type=_ratios, default=None,
                        help="sensitivity ratios (default: 0.1,0.2,…,0.9)")
    search.add_argument("--max-ratio", type=float, default=0.9,
                        help="largest share of a group's channels a trial may remove (default: 0.9)")
    search.add_argument("--granularity", choices=("channel", "weight"), default="channel",
                        help="channel: remove channels (default); weight: per-layer magnitude sparsity under a "
                             "nonzero-params budget (--budget params=0.2)")
    search.add_argument("--distill", action="store_true",
                        help="fine-tune against the unpruned model's softened outputs (knowledge distillation)")
    search.add_argument("--distill-weight", type=float, default=0.5,
                        help="share of the KD term in the loss, the rest cross-entropy (default: 0.5)")
    search.add_argument("--temperature", type=float, default=4.0, help="KD softmax temperature (default: 4)")
    search.add_argument("--soft-epochs", type=_epochs, default=0.0,
                        help="soft-prune the winner this many epochs (weakest filters zeroed, re-selected "
                             "each epoch by L2 norm) before removing them (default: 0, off)")
    search.add_argument("--device", default="auto", help="auto (CUDA if there is one), cpu, cuda, cuda:N")
    search.add_argument("--seed", type=int, default=0)
    search.add_argument("--quiet", action="store_true", help="no progress bars or per-trial lines")

    groups = commands.add_parser("groups", help="list the prunable channel groups of a model")
    _common(groups)

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
    return parser


def _search(args: argparse.Namespace) -> None:
    from .api import search
    from .counting import human
    from .sensitivity import GRID

    result = search(args.model, args.dataset, args.budget, weights=args.weights, trials=args.trials,
                    study=args.study, storage=args.storage, out=args.out, new_study=args.new_study,
                    train_epochs=args.train_epochs, finetune_epochs=args.finetune_epochs,
                    final_epochs=args.final_epochs, lr=args.lr, batch_size=args.batch_size,
                    grid=args.grid or GRID, max_ratio=args.max_ratio, importance=args.importance,
                    device=args.device, seed=args.seed, quiet=args.quiet, data_dir=args.data_dir,
                    download=args.download, distill=args.distill, distill_weight=args.distill_weight,
                    temperature=args.temperature, soft_epochs=args.soft_epochs, granularity=args.granularity)
    s = result.summary
    if args.granularity == "weight":
        _weight_summary(result)
        return
    print(f"best trial {s['trial']} of {s['trials']}: "
          f"FLOPs {human(s['flops'])} ({s['flops_share']:.1%} of {human(s['base_flops'])}, thop MACs), "
          f"params {human(s['params'])} ({s['params_share']:.1%} of {human(s['base_params'])})")
    print(f"test accuracy {s['test_accuracy']:.2%} (base {s['base_test_accuracy']:.2%}), "
          f"val {s['val_accuracy']:.2%} (base {s['base_val_accuracy']:.2%}), {s['seconds']:.0f}s")
    print(f"wrote {result.out}/: model.pt weights.pt plan.json summary.json sensitivity.csv trials.csv")


def _weight_summary(result) -> None:
    from .counting import human

    s = result.summary
    print(f"best trial {s['trial']} of {s['trials']}: {human(s['nonzero_params'])} {s['nonzero_unit']} "
          f"({s['nonzero_share']:.1%} of {human(s['base_params'])}); FLOPs {human(s['flops'])} (thop MACs, dense)")
    print(f"size: {s['model_dense_bytes'] / 1e6:.2f} MB dense, {s['model_sparse_bytes'] / 1e6:.2f} MB sparse (CSR)")
    print(f"test accuracy {s['test_accuracy']:.2%} (base {s['base_test_accuracy']:.2%}), "
          f"val {s['val_accuracy']:.2%} (base {s['base_val_accuracy']:.2%}), {s['seconds']:.0f}s")
    print(f"wrote {result.out}/: model.pt weights.pt weights_sparse.pt plan.json summary.json "
          "sensitivity.csv trials.csv")


def _sweep(args: argparse.Namespace) -> None:
    from .sweep import FOOTNOTE, HEADER, LEVELS, format_row, mlp_sweep

    print(HEADER)
    mlp_sweep(args.dataset, args.levels or LEVELS, args.train_epochs, args.finetune_epochs, args.trials,
              device=args.device, seed=args.seed, quiet=args.quiet, data_dir=args.data_dir, download=args.download,
              report=lambda row: print(format_row(row), flush=True))
    print(FOOTNOTE)


def _groups(args: argparse.Namespace) -> None:
    from .costmodel import CostModel
    from .data import load_data
    from .groups import ChannelGroups
    from .models import build_model

    data = load_data(args.dataset, args.data_dir, args.download)
    model = build_model(args.model, data.num_classes, input_shape=data.input_shape).eval()
    groups = ChannelGroups(model, data.example_input(), importance=args.importance)
    costs = CostModel(groups)
    print(f"{args.model} on {args.dataset} {tuple(data.example_input().shape)}: {costs.base}, "
          f"{len(groups)} prunable groups")
    print(f"{'group':32s} {'channels':>8s} {'FLOPs share':>11s}  layers")
    for group in groups:
        without = costs.predict({group.id: 1}).flops
        share = (costs.base.flops - without) / costs.base.flops
        print(f"{group.id:32s} {group.channels:8d} {share:11.1%}  {', '.join(group.layers)}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        {"search": _search, "groups": _groups, "mlp-sweep": _sweep}[args.command](args)
    except AutopruneError as err:
        print(f"autoprune: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("autoprune: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0
