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
    parser.add_argument("--space", help="search space: a YAML file or a shipped name (resnet, mobilenet, vgg, "
                        "…; default: the one shipped for the architecture)")
    parser.add_argument("--importance", help="channel importance: l1, l2, bn_scale, taylor or fpgm "
                        "(default: the space's, l1)")


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
                        help="sensitivity ratios (default: the space's, e.g. 0.1,0.2,…,0.9)")
    search.add_argument("--max-ratio", type=float, default=None,
                        help="largest share of a group's channels a trial may remove (default: the space's)")
    search.add_argument("--round-to", type=int, default=None,
                        help="keep channel counts in multiples of this (default: the space's)")
    search.add_argument("--device", default="auto", help="auto (CUDA if there is one), cpu, cuda, cuda:N")
    search.add_argument("--seed", type=int, default=0)
    search.add_argument("--quiet", action="store_true", help="no progress bars or per-trial lines")

    groups = commands.add_parser("groups", help="list the prunable channel groups of a model")
    _common(groups)
    return parser


def _search(args: argparse.Namespace) -> None:
    from .api import search
    from .counting import human

    result = search(args.model, args.dataset, args.budget, weights=args.weights, trials=args.trials,
                    study=args.study, storage=args.storage, out=args.out, new_study=args.new_study,
                    train_epochs=args.train_epochs, finetune_epochs=args.finetune_epochs,
                    final_epochs=args.final_epochs, lr=args.lr, batch_size=args.batch_size,
                    space=args.space, grid=args.grid, max_ratio=args.max_ratio, importance=args.importance,
                    round_to=args.round_to,
                    device=args.device, seed=args.seed, quiet=args.quiet, data_dir=args.data_dir,
                    download=args.download)
    s = result.summary
    print(f"best trial {s['trial']} of {s['trials']}: "
          f"FLOPs {human(s['flops'])} ({s['flops_share']:.1%} of {human(s['base_flops'])}, thop MACs), "
          f"params {human(s['params'])} ({s['params_share']:.1%} of {human(s['base_params'])})")
    print(f"test accuracy {s['test_accuracy']:.2%} (base {s['base_test_accuracy']:.2%}), "
          f"val {s['val_accuracy']:.2%} (base {s['base_val_accuracy']:.2%}), {s['seconds']:.0f}s")
    print(f"wrote {result.out}/: model.pt weights.pt plan.json summary.json sensitivity.csv trials.csv")


def _groups(args: argparse.Namespace) -> None:
    from .api import describe_groups

    print(describe_groups(args.model, args.dataset, space=args.space, importance=args.importance,
                          data_dir=args.data_dir, download=args.download))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        {"search": _search, "groups": _groups}[args.command](args)
    except AutopruneError as err:
        print(f"autoprune: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("autoprune: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0
