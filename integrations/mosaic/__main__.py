"""python -m integrations.mosaic {train,eval,figures} ...   (image mosaics, paper sections 4.2-4.3)

Defaults mirror paper appendix F.2: Adam 1e-3, batch 32, T = 4 inner steps, 20 epochs, 64 conv channels and
cost hidden size 64 (128 for the ImageNet stand-in, where F.2 trains 1 epoch).

  train   --task mosaic    explicit reconstruction (Tables 1, 4)
          --task pretrain  the ResNet-18 for the implicit task, on the original images
          --task classify  implicit, through the frozen ResNet-18 of --classifier (Tables 2, 5)
  eval    re-evaluate the latest checkpoint of --out on the test split (writes eval.json)
  figures reconstruction rows as the permutation is optimised (paper figures 12-19), PNG
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from integrations.common import add_kernel_argument, resolve_device

from .datasets import DATASETS, default_data_root
from .model import MODELS


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m integrations.mosaic", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=("train", "eval", "figures"))
    p.add_argument("--dataset", choices=DATASETS, default="mnist")
    p.add_argument("--tiles", type=int, default=2, help="n: the image is cut into n x n tiles")
    p.add_argument("--model", choices=MODELS, default="po-u")
    p.add_argument("--task", choices=("mosaic", "pretrain", "classify"), default="mosaic")
    p.add_argument("--data-root", default=str(default_data_root()))
    p.add_argument("--epochs", type=int, default=None, help="20 (1 for tiny-imagenet), paper F.2")
    p.add_argument("--subset", type=int, default=None, help="train on the first SUBSET training images only")
    p.add_argument("--test-subset", type=int, default=None, help="evaluate on the first TEST_SUBSET test images")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=4, help="T, inner gradient-descent steps (0 for linassign)")
    p.add_argument("--sinkhorn-iters", type=int, default=4)
    add_kernel_argument(p)
    p.add_argument("--conv-channels", type=int, default=None, help="64 (128 for tiny-imagenet)")
    p.add_argument("--cost-hidden", type=int, default=None, help="hidden size of f: 64 (128 for tiny-imagenet)")
    p.add_argument("--logit-clip", type=float, default=None,
                   help="clip linear-assignment logits to [-c, c]; default 10 for linassign (F.3) and for po-la on "
                        "classify/tiny-imagenet (released code), none otherwise; <= 0 disables")
    p.add_argument("--resnet-width", type=int, default=64, help="ResNet-18 first-stage width (64 = standard)")
    p.add_argument("--classifier", default=None, help="classify: run folder (or .pt) of a --task pretrain run")
    p.add_argument("--out", default=None, help="run folder (default runs/mosaic/<dataset>-<n>x<n>-<task>-<model>)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: on a shared 2-core machine a second OpenMP thread makes small ops ~1000x slower)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--checkpoint-every", type=int, default=500, help="also checkpoint every N steps (0: per epoch only)")
    p.add_argument("--num-examples", type=int, default=8, help="figures: test images (columns)")
    p.add_argument("--figure", default=None, help="figures: PNG path (default <out>/reconstruction.png)")
    return p


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    big = args.dataset == "tiny-imagenet"
    if args.epochs is None:
        args.epochs = 1 if big else 20
    if args.conv_channels is None:
        args.conv_channels = 128 if big else 64
    if args.cost_hidden is None:
        args.cost_hidden = 128 if big else 64
    if args.model == "linassign" and args.task != "pretrain":
        args.steps = 0
    if args.tiles < 1:
        raise ValueError(f"--tiles: expected >= 1, got {args.tiles}")
    if args.out is None:
        tag = "resnet" if args.task == "pretrain" else args.model
        args.out = str(Path("runs") / "mosaic" / f"{args.dataset}-{args.tiles}x{args.tiles}-{args.task}-{tag}")
    args.device = str(resolve_device(args.device))
    return args


def main(argv=None) -> int:
    args = resolve(parser().parse_args(argv))
    from . import train as T

    if args.command == "train":
        final = T.train(args)
        print(json.dumps({"final": final}, indent=1))
    elif args.command == "eval":
        print(json.dumps(T.run_eval(args), indent=1))
    else:
        import torch

        from .figures import reconstruction_rows, save_figure

        torch.set_num_threads(args.threads)
        found = T.latest_checkpoint(Path(args.out) / "checkpoints")
        if found is None:
            raise FileNotFoundError(f"--out: no checkpoint in {Path(args.out) / 'checkpoints'}")
        state = torch.load(found, map_location="cpu", weights_only=False)
        saved = argparse.Namespace(**{**state["config"], "data_root": args.data_root, "subset": 1,
                                      "test_subset": args.num_examples})
        data = T.load_data(saved)
        model = T.build_model(saved, data)
        model.load_state_dict(state["model"])
        mosaic = model.mosaic if saved.task == "classify" else model
        rows = reconstruction_rows(mosaic, data, saved.tiles, args.num_examples)
        path = args.figure or str(Path(args.out) / "reconstruction.png")
        name = {"linassign": "LinAssign", "po-u": "PO-U", "po-la": "PO-LA"}[saved.model]
        title = f"{name}, {saved.dataset} {saved.tiles}x{saved.tiles}, {saved.task} (test images, not cherry-picked)"
        print(save_figure(rows, path, title))
    return 0


if __name__ == "__main__":
    from .datasets import DataFormatError

    try:
        sys.exit(main())
    except (DataFormatError, FileNotFoundError) as e:  # bad data: one clear line, not a traceback
        sys.exit(f"python -m integrations.mosaic: error: {e}")
