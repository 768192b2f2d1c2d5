"""`init-model`: write an untrained model directory, as designer's DenseNet and ResNet modules did
(spec section 3), for any torchvision classification architecture.

The directory always holds the `model` state dict (1000-way ImageNet head, keys `model.*`):
- pretrained: torchvision's ImageNet weights, from `--weights FILE`, else the local torch hub
  cache, else downloaded (torchvision's URL, or the `--weights-url` mirror) and checked against
  the sha256 in the file name. This is the only command that may use the network: training (here
  or in Azure ML) reads the `model` file;
- not pretrained: the random initialisation drawn with `--random-seed`, so every training run
  from this directory starts from exactly the same weights. Designer's readers also require the
  file (spec 5.10, defect 4), so the directory works there too.
`model_info.json` records the weights' source and the architecture's preprocessing defaults.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from .config import seed
from .errors import InvalidParameterError, PretrainedWeightsNotFoundError
from .model_names import DESIGNER_MODEL_NAMES, MODEL_NAMES, unknown_name_message

if TYPE_CHECKING:
    from .model_directory import ModelSpec

# torch and the modules that import it load in run(): `--help` and a mistyped name are answered at once.

log = logging.getLogger(__name__)


def model_name(text: str) -> str:
    if text not in MODEL_NAMES:
        raise argparse.ArgumentTypeError(unknown_name_message(text))
    return text


def parse_bool(text: str) -> bool:
    """`true`/`false` (any case, also 1/0, yes/no): Azure ML renders booleans as `True`/`False`."""
    value = str(text).strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-name", required=True, type=model_name, metavar="NAME",
                        help=f"any torchvision classification architecture ({len(MODEL_NAMES)}: "
                             f"torchvision.models.list_models()); designer's are {', '.join(DESIGNER_MODEL_NAMES)}")
    parser.add_argument("--untrained-model", required=True, type=Path, help="output folder (new or empty)")
    parser.add_argument("--pretrained", type=parse_bool, nargs="?", const=True, default="false", metavar="BOOL",
                        help="start from torchvision's DEFAULT ImageNet weights: --weights, else the torch hub "
                             "cache, else downloaded (default %(default)s)")
    parser.add_argument("--weights", type=Path, default=None,
                        help="torchvision state dict file with the ImageNet weights (implies --pretrained)")
    parser.add_argument("--weights-url", default=None, metavar="URL",
                        help="download the weights from this mirror instead of torchvision's URL; the file name "
                             "must be torchvision's (<arch>-<sha256 prefix>.pth), the content is checked against "
                             "it (implies --pretrained)")
    parser.add_argument("--memory-efficient", type=parse_bool, nargs="?", const=True, default="false", metavar="BOOL",
                        help="DenseNet only: checkpointing, less memory for more compute (default %(default)s)")
    parser.add_argument("--zero-init-residual", type=parse_bool, nargs="?", const=True, default="false", metavar="BOOL",
                        help="ResNet only: zero-initialise the last BatchNorm of each residual block "
                             "(default %(default)s)")
    parser.add_argument("--random-seed", type=seed, default=1,
                        help="seed of the random initialisation when not pretrained, 0 to 2^63-1 (default %(default)s)")


def run(args: argparse.Namespace) -> int:
    from .model_directory import write_untrained_model_directory
    from .output_folder import reserved_output

    # A weights file or URL means pretrained, whatever --pretrained says: the component always passes
    # `--pretrained <value>`, and connecting "weights" should be enough there.
    out = args.untrained_model
    with reserved_output(out, inputs=[args.weights]):  # before any download
        spec, state, source = build_untrained(
            args.model_name, pretrained=bool(args.pretrained) or args.weights is not None or bool(args.weights_url),
            weights=args.weights, weights_url=args.weights_url, memory_efficient=args.memory_efficient,
            zero_init_residual=args.zero_init_residual, seed=args.random_seed)
        write_untrained_model_directory(out, spec, state, source)
    print(f"Untrained {spec.model_name} ({source}) written to {out}")
    return 0


def build_untrained(model_name: str, *, pretrained: bool, weights: Path | None = None, weights_url: str | None = None,
                    memory_efficient: bool = False, zero_init_residual: bool = False,
                    seed: int = 1) -> tuple[ModelSpec, dict, str]:
    """The spec, the `model` state dict of an untrained directory, and where the weights came from."""
    import torch

    from .model_directory import ModelSpec
    from .models import (
        IMAGENET_CLASSES,
        Classifier,
        build_net,
        cpu_state_dict,
        flag_name_of,
        load_legacy_state,
        load_weights_file,
    )
    from .weights import check_weights_url, pretrained_weights

    flag_name = flag_name_of(model_name)
    flags = {"memory_efficient": memory_efficient, "zero_init_residual": zero_init_residual}
    for name, value in flags.items():
        if value and name != flag_name:
            family = "DenseNet" if name == "memory_efficient" else "ResNet"
            raise InvalidParameterError(name.replace("_", " ").capitalize(), value,
                                        f"only applies to {family} models, not {model_name}")
    flag_value = bool(flags.get(flag_name, False))
    if weights is not None and weights_url:
        raise InvalidParameterError("Weights url", weights_url, "give either --weights or --weights-url, not both")
    spec = ModelSpec(model_name, pretrained, flag_value)
    if not pretrained:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = Classifier(build_net(model_name, IMAGENET_CLASSES, flag_value))
        return spec, cpu_state_dict(model), f"random initialisation (seed {seed})"
    if weights is not None:
        if not Path(weights).exists():
            raise PretrainedWeightsNotFoundError(f"Weights file '{weights}' does not exist.")
        path = Path(weights)
    else:
        path = pretrained_weights(model_name, [check_weights_url(weights_url)] if weights_url else None)
    # load_legacy_state checks the file really is this architecture (keys and shapes) before building it.
    model = load_legacy_state(model_name, flag_value, load_weights_file(path, model_name, flag_value), str(path))
    log.info("Pretrained %s weights from %s", model_name, path)
    return spec, cpu_state_dict(model), f"ImageNet weights from {weights_url or path}"
