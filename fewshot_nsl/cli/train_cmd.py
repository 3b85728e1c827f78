"""``fewshot-nsl train``: flags mirror ``RunConfig``; a YAML config gives the base, flags override it."""

from __future__ import annotations

import argparse
from pathlib import Path

from fewshot_nsl.backbones import BACKBONES, WEIGHTS
from fewshot_nsl.backbones.similarity import FORMS, KINDS
from fewshot_nsl.config import DISTANCES, LR_SCHEDULES, METHODS, RunConfig, load_config
from fewshot_nsl.engine.distributed import is_main_process
from fewshot_nsl.engine.trainer import resume, train
from fewshot_nsl.errors import UserError
from fewshot_nsl.learners.maml import HEADS, INNER_LOSSES


def _flag(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {value!r}")


# (flag, type or action, help); the config key is the flag with dashes as underscores.
OPTIONS: list[tuple[str, object, str]] = [
    ("--method", METHODS, "learner: protonet, maml, or exemplar (Exemplar-CNN: unsupervised, surrogate classes from the unlabelled training images)"),
    ("--backbone", BACKBONES, "feature extractor; nsl-* use neural similarity layers"),
    ("--similarity", KINDS[1:], "NSL kind for nsl-* backbones (default static)"),
    ("--nsl-form", FORMS, "NSL tap mixing: diagonal (k² weights) or full (k²×k² matrix)"),
    ("--nsl-hidden", int, "width of the dynamic NSL meta-network (default 64)"),
    ("--nsl-kernels", _flag, "dynamic NSL on the compiled CPU kernels, true/false (default true; false: PyTorch ops "
     "throughout, the implementation the kernels replaced, slower; the same function summed in another order)"),
    ("--width", int, "Conv-4 filters (default 64; 32 for MAML on Mini-ImageNet)"),
    ("--weights", WEIGHTS, "plain backbones' convolution weights: real (default), binary ({0,1} connectivity, latent scores "
     "trained straight-through; Colombo & Gao 2020) or random-frozen (seeded random init, only BatchNorm trains)"),
    ("--plain-stem", "store_true", "keep the first convolution plain in nsl-* backbones"),
    ("--drop-rate", float, "ResNet-12 DropBlock rate (default 0)"),
    ("--distance", DISTANCES, "ProtoNet distance (default euclidean)"),
    ("--dataset", str, "omniglot, miniimagenet, or a path to an image folder <dir>/<split>/<class>/<img>"),
    ("--protocol", str, "omniglot: vinyals (default) or lake; miniimagenet: ravi"),
    ("--split-ratios", str, "an image folder of class folders (no split folders): train,val,test class fractions, e.g. 0.64,0.16,0.20"),
    ("--augment", "store_true", "augment training images: torchvision RandomResizedCrop, horizontal flip, ColorJitter (never at evaluation)"),
    ("--augment-crop-scale", float, "smallest RandomResizedCrop area fraction (default 0.08)"),
    ("--augment-jitter", float, "ColorJitter brightness/contrast/saturation strength (default 0.4; 0 turns it off)"),
    ("--augment-flip", _flag, "random horizontal flips with --augment: true/false (default true)"),
    ("--split-seed", int, "seed of the --split-ratios class permutation (default 0)"),
    ("--image-size", int, "resize images to this side (default: dataset's, 28 Omniglot, 84 Mini-ImageNet)"),
    ("--data-root", str, "folder holding omniglot/ and miniimagenet/ (default $FEWSHOT_NSL_DATA or ~/.cache/fewshot-nsl/data)"),
    ("--ways", int, "classes per training episode"),
    ("--shots", int, "support images per class in training"),
    ("--queries", int, "query images per class in training (default 5; MAML: shots on Omniglot, 15 elsewhere, as Finn et al.)"),
    ("--episodes", int, "training iterations (each draws --meta-batch episodes)"),
    ("--meta-batch", int, "episodes per optimiser step (default 1; MAML: Finn et al.'s, 32 Omniglot 5-way, 16 20-way, 4/2 Mini-ImageNet 1/5-shot)"),
    ("--lr", float, "Adam learning rate (default 1e-3)"),
    ("--lr-schedule", LR_SCHEDULES, "step (ProtoNet default), cosine to --min-lr (MAML++'s CA) or constant (MAML default)"),
    ("--lr-step", int, "step schedule: multiply the learning rate by --lr-gamma every this many iterations (default 2000)"),
    ("--lr-gamma", float, "step schedule: decay factor (default 0.5)"),
    ("--min-lr", float, "cosine schedule: final learning rate (default 1e-5, as MAML++)"),
    ("--weight-decay", float, "Adam weight decay (default 0)"),
    ("--inner-steps", int, "MAML adaptation steps in training (default 1 Omniglot 5-way, 5 Omniglot 20-way and Mini-ImageNet)"),
    ("--eval-inner-steps", int, "MAML adaptation steps at evaluation (default 3 Omniglot 5-way, 5 20-way, 10 Mini-ImageNet)"),
    ("--inner-lr", float, "MAML inner learning rate (default 0.4 Omniglot 5-way, 0.1 20-way, 0.01 Mini-ImageNet)"),
    ("--first-order", "store_true", "first-order MAML (no second derivatives)"),
    ("--meta-sgd", "store_true", "learn a per-parameter inner learning rate (Meta-SGD)"),
    ("--anil", "store_true", "adapt only the head in the inner loop (ANIL)"),
    ("--head", HEADS, "MAML head: learned (default; Finn et al.'s meta-learned linear layer, fixed ways) or zero "
     "(Kao et al. 2022's zeroing trick: zero weights every task, any ways; caveat: the first inner step then gives "
     "the backbone a zero gradient, so with 1 inner step the backbone is never adapted in training)"),
    ("--inner-loss", INNER_LOSSES, "MAML support loss: mean (default; Finn et al.'s paper, MAML++) or tf-sum (the "
     "scaling in Finn et al.'s TensorFlow code: summed cross-entropy / shots, a ways-times larger step)"),
    ("--per-step-bn", "store_true", "MAML++ BNWB: per-inner-step BatchNorm weights and biases"),
    ("--lslr", "store_true", "MAML++ LSLR: learned inner learning rate per layer and step"),
    ("--multi-step-loss", "store_true", "MAML++ MSL: query loss after every inner step, weights annealed to the last"),
    ("--msl-anneal-iterations", int, "MAML++ MSL: meta-iterations to anneal over (default 5000)"),
    ("--first-order-until", int, "MAML++ DA: first order up to this meta-iteration, second order after (default 0)"),
    ("--vectorise", _flag, "MAML: vmap the meta-batch over tasks, true/false (default: true on CUDA and, on CPU, for tasks of <= 40 images, where it is faster: benchmarks/results/maml_speed.md; false backpropagates task by task, memory of one task)"),
    ("--surrogate-classes", int, "exemplar: surrogate classes, one seed window each (default 8000)"),
    ("--samples-per-class", int, "exemplar: transformed samples per surrogate class (default 100)"),
    ("--surrogate-batch", int, "exemplar: samples per training step (default 128); transformation magnitudes: "
     "exemplar_transforms in a --config YAML (defaults: Dosovitskiy et al. 2014)"),
    ("--init", str, "start the backbone from this run directory's trained backbone (e.g. an exemplar run), then train with --method"),
    ("--train-on-val", "store_true", "train on train + val classes (Snell et al.'s final models); no validation, the last checkpoint is used"),
    ("--val-every", int, "validate every this many iterations (default 500)"),
    ("--val-episodes", int, "validation episodes (default 200)"),
    ("--val-ways", int, "validation ways (default: the dataset's evaluation ways)"),
    ("--val-shots", int, "validation shots (default: training shots)"),
    ("--val-queries", int, "validation queries per class (default: the dataset's evaluation queries, 15)"),
    ("--checkpoint-every", int, "save the full training state (last.pt) every this many iterations (default 500)"),
    ("--skip-nonfinite", "store_true", "skip and count meta-batches whose loss is NaN/Inf instead of stopping"),
    ("--seed", int, "seed of every generator of the run (default 0)"),
    ("--device", str, "auto, cpu or cuda (default auto)"),
    ("--amp", _flag, "automatic mixed precision, true/false (default false): bfloat16 autocast for training steps, a GPU speed option; weights and evaluation stay float32"),
    ("--channels-last", _flag, "channels_last memory format: true/false (default true, false for MAML)"),
    ("--run-dir", str, "where config, checkpoints and metrics.csv go (default runs/<method>-<backbone>-...)"),
]


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("train", help="train a learner episodically", description=__doc__)
    parser.add_argument("--config", help="YAML config file; command-line flags override its values")
    for flag, kind, help_text in OPTIONS:
        if kind == "store_true":
            parser.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=help_text)
        elif isinstance(kind, tuple):
            parser.add_argument(flag, choices=kind, default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=help_text)
    parser.add_argument("--overwrite", action="store_true", help="start over in an existing run directory (the old run is moved aside)")
    parser.add_argument(
        "--resume-if-stopped", action="store_true",
        help="continue the run directory's stopped run of this same config if there is one, else start: for "
        "`torchrun --max-restarts`, which restarts the original command",
    )  # fmt: skip
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last.pt (no other training flags)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> None:
    keys = set(RunConfig.field_names())
    overrides = {k: v for k, v in vars(args).items() if k in keys}
    if args.resume:
        if overrides or args.config or args.overwrite or args.resume_if_stopped:
            raise UserError("--resume continues a run exactly as configured; drop the other training flags")
        result = resume(Path(args.resume), progress=not args.no_progress)
    else:
        if args.overwrite and args.resume_if_stopped:
            raise UserError("--overwrite starts over and --resume-if-stopped continues: choose one")
        config = load_config(args.config) if args.config else RunConfig()
        result = train(
            config.updated(overrides), overwrite=args.overwrite, progress=not args.no_progress,
            resume_stopped=args.resume_if_stopped,
        )  # fmt: skip
    best = "n/a" if result.best_val_acc is None else f"{100 * result.best_val_acc:.2f}%"
    if is_main_process():
        print(f"trained {result.iterations} iterations in {result.seconds:.0f} s; best validation accuracy {best}; run in {result.run_dir}")
