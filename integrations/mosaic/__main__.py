"""python -m integrations.mosaic {train,eval,figures} ...   (image mosaics, paper sections 4.2-4.3)

Defaults mirror paper appendix F.2: Adam 1e-3, batch 32, T = 4 inner steps, 20 epochs, 64 conv channels and
cost hidden size 64 (128 for the ImageNet stand-in, where F.2 trains 1 epoch).

  train   --task mosaic    explicit reconstruction (Tables 1, 4)
          --task pretrain  the ResNet-18 for the implicit task, on the original images
          --task classify  implicit, through the frozen ResNet-18 of --classifier (Tables 2, 5)
  eval    re-evaluate a run's newest checkpoint on the test split (writes <run>/eval.json)
  figures reconstruction rows as the permutation is optimised (paper figures 12-19), PNG

Each subcommand has its own flags: python -m integrations.mosaic train --help
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from integrations.common import (refuse_po_u_without_steps, with_help_formatter, add_data_root_argument, add_kernel_argument, add_run_arguments, add_threads_argument,
                                 device_name,
                                 non_negative_int, positive_float, positive_int, resolve_device, ensure_new,
                                 run_command, run_folder, write_new_json)
from integrations.common.datasets import DATASETS, DataFormatError

from .model import PERMUTATIONS

PROG = "python -m integrations.mosaic"
# Side of each data set's images: the tiles must be at least 2 pixels wide (the tile encoder's 2x2 pool).
IMAGE_SIDE = {"mnist": 28, "fashion-mnist": 28, "cifar10": 32, "tiny-imagenet": 64}


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", choices=DATASETS, default="mnist", help="image data set (paper section 4.2)")
    p.add_argument("--tiles", type=positive_int, default=2, help="n: the image is cut into n x n tiles (n >= 2)")
    p.add_argument("--permutation", choices=PERMUTATIONS, default="po-u",
                   help="linassign (Mena et al. 2018), po-u or po-la (paper Table 1)")
    p.add_argument("--task", choices=("mosaic", "pretrain", "classify"), default="mosaic",
                   help="mosaic: reassemble shuffled tiles; pretrain: ResNet-18 on the whole images (for classify); "
                        "classify: ResNet-18 on the reassembled image (implicit permutation, section 4.3)")
    add_data_root_argument(p, what="data sets (mnist/, fashion-mnist/, cifar10/, tiny-imagenet-200/)")
    p.add_argument("--epochs", type=positive_int, default=None, help="20 (1 for tiny-imagenet), paper F.2")
    p.add_argument("--subset", type=positive_int, default=None, help="train on the first SUBSET training images only")
    p.add_argument("--test-subset", type=positive_int, default=None,
                   help="evaluate on the first TEST_SUBSET test images")
    p.add_argument("--batch-size", type=positive_int, default=32, help="images per step (paper F.2)")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="Adam learning rate (paper F.2)")
    p.add_argument("--steps", type=non_negative_int, default=4, help="T, inner gradient-descent steps (>= 1 for po-u; linassign has none)")
    p.add_argument("--sinkhorn-iters", type=positive_int, default=4, help="Sinkhorn normalisations L per step")
    add_kernel_argument(p)
    p.add_argument("--conv-channels", type=positive_int, default=None, help="64 (128 for tiny-imagenet)")
    p.add_argument("--cost-hidden", type=positive_int, default=None, help="hidden size of f: 64 (128 for tiny-imagenet)")
    p.add_argument("--logit-clip", type=float, default=None,
                   help="clip linear-assignment logits to [-c, c]; default 10 for linassign (F.3) and for po-la on "
                        "classify/tiny-imagenet (released code), none otherwise; <= 0 disables")
    p.add_argument("--resnet-width", type=positive_int, default=None,
                   help="ResNet-18 first-stage width: 64 (standard) unless given; classify uses the width of "
                        "--classifier's ResNet-18 and refuses another")
    p.add_argument("--classifier", default=None, help="classify: run folder (or .pt) of a --task pretrain run")
    add_run_arguments(p, out_help="run folder (default runs/mosaic/<dataset>-<n>x<n>-<task>-<permutation>)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the weights, tile shuffles and data order")
    p.add_argument("--device", type=device_name, default="auto", help="auto, cpu, cuda[:i] or mps")
    add_threads_argument(p)
    p.add_argument("--log-every", type=positive_int, default=20, help="TensorBoard scalars every N steps")
    p.add_argument("--checkpoint-every", type=non_negative_int, default=500,
                   help="also checkpoint every N steps (0: per epoch only)")


def _add_read_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run folder (its newest intact checkpoint) or a checkpoint .pt")
    p.add_argument("--data-root", default=None, help="data folder (default: the one stored in the run's config)")
    p.add_argument("--test-subset", type=positive_int, default=None,
                   help="evaluate on the first TEST_SUBSET test images (default: the run's own setting)")
    add_threads_argument(p)
    p.add_argument("--overwrite", action="store_true", help="replace the output file if it exists")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{train,eval,figures}")
    _add_train_flags(sub.add_parser("train", help="train a mosaic, classify or pretrain model",
                                    description="Train a permutation model on image mosaics (paper F.2, F.3)."))
    e = sub.add_parser("eval", help="re-evaluate a run on the test split",
                       description="Re-evaluate a run's newest intact checkpoint on the test split. Every data "
                                   "setting comes from the run's config.json.")
    _add_read_flags(e)
    e.add_argument("--out", default=None, help="JSON file (default: <run>/eval.json; never replaced unless --overwrite)")
    e.add_argument("--device", type=device_name, default="cpu", help="auto, cpu, cuda[:i] or mps")
    f = sub.add_parser("figures", help="reconstruction rows along the optimisation (PNG)",
                       description="Reconstruction rows as the permutation is optimised (paper figures 12-19).")
    _add_read_flags(f)
    f.add_argument("--num-examples", type=positive_int, default=8, help="test images (columns)")
    f.add_argument("--out", default=None, help="PNG path (default: <run>/reconstruction.png)")
    return with_help_formatter(p)


def resolve(args: argparse.Namespace, p: argparse.ArgumentParser) -> argparse.Namespace:
    """Fill the dataset-dependent defaults of ``train`` and check what argparse alone cannot."""
    side = IMAGE_SIDE[args.dataset]
    if not 2 <= args.tiles <= side // 2:
        p.error(f"argument --tiles: {args.dataset} images are {side} px: n must be in [2, {side // 2}] so that "
                f"each tile is >= 2 px (the tile encoder pools 2x2), got {args.tiles}")
    big = args.dataset == "tiny-imagenet"
    if args.epochs is None:
        args.epochs = 1 if big else 20
    if args.conv_channels is None:
        args.conv_channels = 128 if big else 64
    if args.cost_hidden is None:
        args.cost_hidden = 128 if big else 64
    if args.permutation == "linassign" and args.task != "pretrain":
        args.steps = 0
    if args.permutation == "po-u" and args.task != "pretrain" and args.steps == 0:
        refuse_po_u_without_steps(p, "--steps")
    if args.logit_clip is not None and not math.isfinite(args.logit_clip):
        p.error(f"argument --logit-clip: must be a finite number (<= 0 for no clip), got {args.logit_clip}")
    if args.permutation == "po-u" and args.task != "pretrain" and args.logit_clip is not None and args.logit_clip > 0:
        p.error("argument --logit-clip: PO-U starts from zero logits and clips none (the clip applies to "
                "linassign's and po-la's linear-assignment logits)")
    if args.task != "classify" and args.classifier:
        p.error(f"argument --classifier: only the classify task reads a classifier, this is --task {args.task}")
    if args.task == "mosaic" and args.resnet_width is not None:
        p.error("argument --resnet-width: the mosaic task has no ResNet-18 (pretrain trains one, classify reads it)")
    if args.task == "classify" and not args.classifier:
        p.error("argument --classifier: the classify task needs the run folder of a '--task pretrain' run")
    if args.task != "classify" and args.resnet_width is None:
        args.resnet_width = 64          # classify takes its width from the --classifier checkpoint (train)
    if args.out is None:
        tag = "resnet" if args.task == "pretrain" else args.permutation
        args.out = str(Path("runs") / "mosaic" / f"{args.dataset}-{args.tiles}x{args.tiles}-{args.task}-{tag}")
    args.device = str(resolve_device(args.device))
    return args


def cmd_train(args) -> int:
    from .train import train

    summary = train(args)
    print(json.dumps({"final": summary.get("final")}, indent=1))
    print(f"results: {Path(args.out) / 'summary.json'}")
    return 0


def cmd_eval(args) -> int:
    import torch

    from .train import evaluate, load_run

    torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else run_folder(args.run) / "eval.json"
    ensure_new(out, overwrite=args.overwrite)        # refuse before spending the evaluation time
    saved, model, data, path = load_run(args.run, data_root_flag=args.data_root, test_subset=args.test_subset)
    device = resolve_device(args.device)
    metrics = evaluate(saved, model.to(device), data, device)
    metrics["checkpoint"] = path
    write_new_json(out, metrics, overwrite=args.overwrite)
    print(json.dumps(metrics, indent=1))
    print(f"results: {out}")
    return 0


def cmd_figures(args) -> int:
    import torch

    from .figures import reconstruction_rows, save_figure
    from .train import load_run

    torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else run_folder(args.run) / "reconstruction.png"
    ensure_new(out, overwrite=args.overwrite)
    saved, model, data, _ = load_run(args.run, data_root_flag=args.data_root, test_subset=args.num_examples)
    mosaic = model.mosaic if saved.task == "classify" else model
    if saved.task == "pretrain":
        raise SystemExit(f"{PROG} figures: error: {args.run} is a pretrain run (no permutation to draw)")
    rows = reconstruction_rows(mosaic, data, saved.tiles, args.num_examples)
    name = {"linassign": "LinAssign", "po-u": "PO-U", "po-la": "PO-LA"}[saved.permutation]
    title = f"{name}, {saved.dataset} {saved.tiles}x{saved.tiles}, {saved.task} (test images, not cherry-picked)"
    print(f"results: {save_figure(rows, out, title)}")
    return 0


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.command == "train":
        return cmd_train(resolve(args, p))
    return {"eval": cmd_eval, "figures": cmd_figures}[args.command](args)


if __name__ == "__main__":
    sys.exit(run_command(main, PROG, errors=(DataFormatError,)))
