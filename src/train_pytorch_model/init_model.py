"""`init-model`: write an untrained model directory, as designer's DenseNet and ResNet modules did
(spec section 3).

The directory always holds the `model` state dict (1000-way ImageNet head, keys `model.*`):
- pretrained: torchvision's ImageNet weights, read from `--weights FILE` or the local torch hub
  cache, so training (here or in Azure ML) never needs the network;
- not pretrained: the random initialisation drawn with `--random-seed`, so every training run
  from this directory starts from exactly the same weights. Designer's readers also require the
  file (spec 5.10, defect 4), so the directory works there too.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from .errors import InvalidParameterError, PretrainedWeightsNotFoundError
from .model_directory import ModelSpec, write_untrained_model_directory
from .models import (FAMILIES, MODEL_FAMILY, MODEL_NAMES, Classifier, build_net, find_cached_weights,
                     imagenet_weights_file, load_legacy_state, load_weights_file)

log = logging.getLogger(__name__)

IMAGENET_CLASSES = 1000


def parse_bool(text: str) -> bool:
    """`true`/`false` (any case, also 1/0, yes/no): Azure ML renders booleans as `True`/`False`."""
    value = str(text).strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-name", required=True, choices=MODEL_NAMES, metavar="NAME",
                        help=f"architecture: {', '.join(MODEL_NAMES)}")
    parser.add_argument("--untrained-model", required=True, type=Path, help="output folder (new or empty)")
    parser.add_argument("--pretrained", type=parse_bool, nargs="?", const=True, default=False, metavar="BOOL",
                        help="start from torchvision's ImageNet weights (IMAGENET1K_V1), taken from --weights or "
                             "the torch hub cache; never downloaded (default false)")
    parser.add_argument("--weights", type=Path, default=None,
                        help="torchvision state dict file with the ImageNet weights (implies --pretrained, even --pretrained false)")
    parser.add_argument("--memory-efficient", type=parse_bool, nargs="?", const=True, default=False, metavar="BOOL",
                        help="DenseNet only: checkpointing, less memory for more compute (default false)")
    parser.add_argument("--zero-init-residual", type=parse_bool, nargs="?", const=True, default=False, metavar="BOOL",
                        help="ResNet only: zero-initialise the last BatchNorm of each residual block (default false)")
    parser.add_argument("--random-seed", type=int, default=1,
                        help="seed of the random initialisation when not pretrained (default 1)")


def run(args: argparse.Namespace) -> int:
    # A weights file means pretrained, whatever --pretrained says: the component always passes
    # `--pretrained <value>` (default false), and connecting "weights" should be enough there.
    spec, state = build_untrained(args.model_name, pretrained=bool(args.pretrained) or args.weights is not None,
                                  weights=args.weights, memory_efficient=args.memory_efficient,
                                  zero_init_residual=args.zero_init_residual, seed=args.random_seed)
    write_untrained_model_directory(args.untrained_model, spec, state)
    source = "ImageNet weights" if spec.pretrained else f"random initialisation (seed {args.random_seed})"
    print(f"Untrained {spec.model_name} ({source}) written to {args.untrained_model}")
    return 0


def build_untrained(model_name: str, *, pretrained: bool, weights: Path | None = None, memory_efficient: bool = False,
                    zero_init_residual: bool = False, seed: int = 1) -> tuple[ModelSpec, dict]:
    """The spec and the `model` state dict of an untrained directory."""
    family = MODEL_FAMILY[model_name]
    flag_name = FAMILIES[family][3]
    flags = {"memory_efficient": memory_efficient, "zero_init_residual": zero_init_residual}
    for name, value in flags.items():
        if value and name != flag_name:
            raise InvalidParameterError(name.replace("_", " ").capitalize(), value,
                                        f"only applies to {'DenseNet' if name == 'memory_efficient' else 'ResNet'} models, "
                                        f"not {model_name}")
    flag_value = flags[flag_name]
    spec = ModelSpec(model_name, pretrained, flag_value)
    if pretrained:
        path = weights if weights is not None else find_cached_weights(model_name)
        if path is None:
            raise weights_missing_error(model_name)
        if not Path(path).is_file():
            raise PretrainedWeightsNotFoundError(f"Weights file '{path}' does not exist.")
        # load_legacy_state checks the file really is this architecture (keys and shapes).
        model = load_legacy_state(model_name, flag_value, load_weights_file(path), str(path))
        log.info("Pretrained %s weights from %s", model_name, path)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = Classifier(build_net(model_name, IMAGENET_CLASSES, flag_value))
    return spec, {k: v.contiguous() for k, v in model.state_dict().items()}


def weights_missing_error(model_name: str) -> PretrainedWeightsNotFoundError:
    cache = Path(torch.hub.get_dir()) / "checkpoints" / imagenet_weights_file(model_name)
    return PretrainedWeightsNotFoundError(
        f"Pretrained {model_name} weights are not available offline: '{cache}' does not exist and no --weights "
        f"file was given (nothing is downloaded at run time). Download torchvision's {imagenet_weights_file(model_name)} "
        f"once, then pass it with --weights FILE or copy it to '{cache}'; or leave out --pretrained."
    )
