"""Every torchvision classification architecture, allow-listed by name and built with torchvision.

A legacy `model_spec.yaml` names a Python module and class (`flavor_extras`) that the original
imported. We never import anything a file names: the (module, class) pair is looked up in an
allow-list, the model name in torchvision's own list of classification models.

Designer's 13 DenseNet/ResNet names keep the legacy layout the original reads. Every other name
is ours only (and MLflow's): the directory says so.

`Classifier` reproduces the legacy state-dict layout (`model.<torchvision key>`), so a trained
model directory loads in the original's scorer with `pretrained: false` + `num_classes`.
Pretrained backbones get a new classification head sized for the task; the original instead
stacked `Linear(1000, C)` after the ImageNet logits, which we read but never write.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import math
import os
import re
import stat
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch
import torchvision
from torch import nn

from .categories import MAX_CLASSES
from .errors import InvalidModelDirectoryError, PretrainedWeightsNotFoundError, quote
from .input_files import UnreadableInputError, open_input
from .model_names import DENSENET_NAMES, DESIGNER_MODEL_NAMES, MODEL_NAMES, RESNET_NAMES, unknown_name_message  # noqa: F401 (re-exported)

LEGACY_PACKAGE = "azureml.designer.modules.dl.pytorch.initialize_models.vision.classification"

# family -> (legacy module, legacy class, model names, the init_params flag besides pretrained)
FAMILIES = {
    "densenet": (f"{LEGACY_PACKAGE}.densenet", "DenseNet", DENSENET_NAMES, "memory_efficient"),
    "resnet": (f"{LEGACY_PACKAGE}.resnet", "ResNet", RESNET_NAMES, "zero_init_residual"),
}
# The other architectures: recorded under our own (module, class), which only this project reads.
TORCHVISION_FAMILY = "torchvision"
FAMILIES[TORCHVISION_FAMILY] = ("train_pytorch_model.models", "TorchvisionClassifier", (), None)

MODEL_FAMILY = {name: TORCHVISION_FAMILY for name in MODEL_NAMES} | {
    name: family for family, (_, _, names, _) in FAMILIES.items() for name in names}
READERS_NOTE = ("Only train-pytorch-model and MLflow read this model directory: Azure ML designer's modules know "
                "designer's 13 DenseNet/ResNet architectures only.")
IMAGENET_CLASSES = 1000


def check_model_name(name) -> str:
    """`name` if it is a torchvision classification architecture, else InvalidModelDirectoryError."""
    if name not in MODEL_NAMES:
        raise InvalidModelDirectoryError(f"Model name {quote(name)}: {unknown_name_message(str(name)[:100])}")
    return name


def flag_name_of(model_name: str) -> str | None:
    """The legacy init_params flag (memory_efficient / zero_init_residual) of a designer model, else None."""
    return FAMILIES[MODEL_FAMILY[model_name]][3]


def family_of(module: str, cls: str) -> str:
    """The family for a legacy (module, class) pair, or InvalidModelDirectoryError. Nothing is imported."""
    for family, (legacy_module, legacy_class, _, _) in FAMILIES.items():
        # Our own trained directories record the same legacy pair; accept a bare class name too.
        if cls == legacy_class and module in (legacy_module, "", None):
            return family
    allowed = ", ".join(f"{m}.{c}" for m, c, _, _ in FAMILIES.values())
    raise InvalidModelDirectoryError(
        f"model_spec.yaml names model class {quote(f'{module}.{cls}')}, which is not supported "
        f"(nothing named by a file is imported). Supported: {allowed}."
    )


class Classifier(nn.Module):
    """A torchvision net under attribute `model` (the legacy state-dict layout), optionally
    followed by the original's `out_linear_model` stacked on 1000-way ImageNet logits."""

    def __init__(self, net: nn.Module, out_linear: nn.Linear | None = None):
        super().__init__()
        self.model = net
        if out_linear is not None:
            self.out_linear_model = out_linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.model(x)
        if hasattr(self, "out_linear_model"):
            x = self.out_linear_model(x)
        return x

    @property
    def num_classes(self) -> int:
        if hasattr(self, "out_linear_model"):
            return self.out_linear_model.out_features
        return _outputs(head_of(self.model)[1])


def _build_kwargs(model_name: str, flag_value: bool) -> dict:
    """What torchvision's builder would set itself when given the DEFAULT weights (we pass weights=None)."""
    flag = flag_name_of(model_name)
    kwargs = {flag: bool(flag_value)} if flag else {}
    if model_name in ("googlenet", "inception_v3"):
        # Without the auxiliary heads the net returns a tensor in training too; the ported weights
        # expect transform_input, as torchvision sets it for them.
        kwargs.update(aux_logits=False, init_weights=True, transform_input=True)
    elif model_name.startswith("vit_"):
        kwargs["image_size"] = default_weights(model_name).meta["min_size"][0]  # the position embedding's size
    return kwargs


def build_net(model_name: str, num_classes: int, flag_value: bool = False) -> nn.Module:
    """A randomly initialised torchvision net (never downloads: weights=None)."""
    check_model_name(model_name)
    return torchvision.models.get_model(model_name, weights=None, num_classes=num_classes,
                                        **_build_kwargs(model_name, flag_value))


def head_of(net: nn.Module) -> tuple[str, nn.Module]:
    """(qualified name, module) of the classification head: the last Linear or Conv2d, which is where
    every torchvision classifier ends (fc, classifier[-1], heads.head, head, SqueezeNet's final conv)."""
    layers = [(name, m) for name, m in net.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return layers[-1]


def _outputs(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def replace_head(net: nn.Module, num_classes: int) -> None:
    """Swap the head for a fresh one with `num_classes` outputs (seeded by the caller)."""
    name, old = head_of(net)
    bias = old.bias is not None  # MaxViT's head has none
    if isinstance(old, nn.Linear):
        new = nn.Linear(old.in_features, num_classes, bias=bias)
    else:
        new = nn.Conv2d(old.in_channels, num_classes, old.kernel_size, old.stride, old.padding, bias=bias)
    parent_name, _, attr = name.rpartition(".")
    setattr(net.get_submodule(parent_name), attr, new)


@functools.lru_cache(maxsize=8)
def _reference_shapes(model_name: str, flag_value: bool) -> tuple[dict, str, frozenset]:
    """The state-dict shapes of the net with a 1000-way head, the head's key prefix, and the keys whose tensors
    are floating point (not BatchNorm's int64 counters): built on the meta device (no memory), or for real where
    an architecture cannot be (RegNet), without touching the RNG."""
    try:
        with torch.device("meta"):
            net = build_net(model_name, IMAGENET_CLASSES, flag_value)
    except NotImplementedError:
        with torch.random.fork_rng(devices=[]):
            net = build_net(model_name, IMAGENET_CLASSES, flag_value)
    state = net.state_dict()
    shapes = {f"model.{k}": tuple(v.shape) for k, v in state.items()}
    floating = frozenset(f"model.{k}" for k, v in state.items() if v.is_floating_point())
    return shapes, f"model.{head_of(net)[0]}.", floating


def expected_weights_bytes(model_name: str, flag_value: bool = False) -> int:
    """Bytes of a float32 state dict of `model_name` with a 1000-way head."""
    return 4 * sum(max(1, math.prod(s)) for s in _reference_shapes(model_name, flag_value)[0].values())


def preprocessing_defaults(model_name: str) -> dict:
    """The preprocessing torchvision's DEFAULT ImageNet weights of `model_name` were trained with.

    `image_size` is the crop fed to the net, `resize_size` the shorter side before the centre crop.
    `fixed_size` True: the architecture only takes `image_size` (ViT's position embedding, Swin's
    and MaxViT's windows); other nets take any size from `min_size` up.
    """
    weights = default_weights(check_model_name(model_name))
    transforms = weights.transforms()
    crop, resize = transforms.crop_size[0], transforms.resize_size[0]
    min_size = weights.meta["min_size"][0]
    return {"image_size": crop, "resize_size": resize, "interpolation": transforms.interpolation.value,
            "mean": list(transforms.mean), "std": list(transforms.std), "min_size": min_size,
            "fixed_size": min_size == crop}


def default_weights(model_name: str):
    """torchvision's DEFAULT ImageNet weights entry (URL, sha256 prefix in the file name, transforms)."""
    return torchvision.models.get_model_weights(model_name).DEFAULT


def imagenet_weights_file(model_name: str) -> str:
    """The file name torchvision's DEFAULT weights have in the torch hub cache (and on download.pytorch.org)."""
    return os.path.basename(default_weights(model_name).url)


def hub_cache_path(file_name: str) -> Path:
    """Where torch.hub keeps a downloaded weights file (TORCH_HOME/hub/checkpoints)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / file_name


def find_cached_weights(model_name: str) -> Path | None:
    """ImageNet weights for `model_name` in the local torch hub cache, if they were downloaded or put there:
    the DEFAULT file, else the IMAGENET1K_V1 file (what designer's modules used, e.g. resnet50-0676ba61.pth)."""
    weights = torchvision.models.get_model_weights(model_name)
    for entry in dict.fromkeys((weights.DEFAULT, getattr(weights, "IMAGENET1K_V1", weights.DEFAULT))):
        path = hub_cache_path(os.path.basename(entry.url))
        if path.is_file():
            return path
    return None


def pretrained_missing_error(model_name: str, where: str) -> PretrainedWeightsNotFoundError:
    """The one "ImageNet weights are not here" error: `where` says what asked for them."""
    cache = hub_cache_path(imagenet_weights_file(model_name))
    return PretrainedWeightsNotFoundError(
        f"{where} asks for pretrained {model_name} weights, but there is no 'model' weights file and '{cache}' "
        f"does not exist (only init-model downloads). Re-create the directory with `python -m train_pytorch_model "
        f"init-model --model-name {model_name} --pretrained true` (downloads them), add `--weights FILE` or "
        f"`--weights-url URL` (a mirror) to it, copy torchvision's {imagenet_weights_file(model_name)} to "
        f"'{cache}', or set pretrained: false."
    )


def cpu_state_dict(model: nn.Module) -> OrderedDict:
    """Detached CPU copies of the model's state: later training steps never change them. The modules'
    version metadata goes along (torch.save keeps it; MNASNet and BatchNorm read it when loading)."""
    state = model.state_dict()
    return _rekey(state, lambda k: k, {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()})


def cpu_copy(obj):
    """`obj` with every tensor copied to the CPU (for a checkpoint written while training goes on)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        copied = type(obj)((k, cpu_copy(v)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):  # a state dict's module versions (load_state_dict reads them)
            copied._metadata = copy.deepcopy(obj._metadata)
        return copied
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_copy(v) for v in obj)
    return copy.deepcopy(obj)


def weights_digest(state: dict) -> str:
    """A fingerprint of a state dict's names, dtypes, shapes and values (what a run starts from)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(f"{name}\t{tensor.dtype}\t{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return f"sha256 {digest.hexdigest()[:20]}"


def _rekey(state: dict, rename, values: dict | None = None) -> OrderedDict:
    """`state` with every key (and its `_metadata` module prefix) renamed by `rename`; `values` replaces tensors."""
    values = state if values is None else values
    out = OrderedDict((rename(k), values[k]) for k in state)
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:
        out._metadata = OrderedDict((rename(f"{k}." if k else "").removesuffix("."), v) for k, v in metadata.items())
    return out


# --- reading weights files ----------------------------------------------------------------------------------

def weights_bytes_limit(model_name: str, flag_value: bool = False) -> int:
    """The most bytes a `model` file of this architecture may hold: the net plus room for a large head."""
    expected = expected_weights_bytes(model_name, flag_value)
    return expected + max(expected, 256 * 2**20)


def load_weights_file(path: Path, model_name: str, flag_value: bool = False, *, inside: Path | None = None) -> dict:
    """Plain tensors only, checked before they are inflated or used.

    weights_only=True refuses pickles that would run code. Before loading: a regular file, and for
    torch's zip format uncompressed members (torch.save never compresses) whose sizes, read from the
    archive's directory, stay within what the architecture can hold. `inside`: the model directory the file
    must resolve into (None: a file named by the user or the torch hub cache).
    """
    path = Path(path)
    limit = weights_bytes_limit(model_name, flag_value)
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise InvalidModelDirectoryError(f"Weights file '{path}' cannot be read: {exc.strerror or exc}.") from None
    if stat.S_ISDIR(mode):
        raise InvalidModelDirectoryError(
            f"Weights file '{path}' is a folder. It must be the state dict file written by torch.save: re-create the "
            "model directory with init-model."
        )
    try:  # the one input opener: a regular file (a FIFO or device would block or never end)
        handle = open_input(path, inside=inside, max_bytes=None)
    except UnreadableInputError as exc:
        raise InvalidModelDirectoryError(
            f"Weights file '{path}' is {exc.reason}. It must be the state dict file written by torch.save: "
            "re-create the model directory with init-model."
        ) from None
    with handle:
        return _load_weights(handle, path, model_name, limit)


def _load_weights(handle, path: Path, model_name: str, limit: int) -> dict:
    members = []
    try:
        if zipfile.is_zipfile(handle):
            with zipfile.ZipFile(handle) as archive:
                members = archive.infolist()
    except Exception as exc:  # a damaged archive directory fails in many ways (BadZipFile, struct.error, ...)
        raise _weights_error(path, f"{type(exc).__name__}: {str(exc)[:200]}") from None
    size = sum(m.file_size for m in members) if members else os.fstat(handle.fileno()).st_size
    compressed = [m.filename for m in members if m.compress_type != zipfile.ZIP_STORED]
    if compressed:
        raise _weights_error(path, f"it has compressed members (e.g. {quote(compressed[0])}), which torch.save "
                                   "never writes")
    if size > limit:
        raise _weights_error(path, f"it holds {size / 2**20:.0f} MiB, more than a {model_name} state dict can "
                                   f"({limit / 2**20:.0f} MiB)")
    try:
        handle.seek(0)
        state = torch.load(handle, map_location="cpu", weights_only=True)
    except Exception as exc:  # every failure means the same thing to the user
        raise _weights_error(path, f"{type(exc).__name__}: {_load_failure_reason(exc)}") from None
    return state  # load_legacy_state checks the tensors


def _weights_error(path: Path, reason: str) -> InvalidModelDirectoryError:
    return InvalidModelDirectoryError(
        f"'{path}' cannot be loaded as PyTorch weights ({reason}). Only plain state dicts (tensors) are accepted, "
        "never pickled code: re-create the directory with init-model, or save the weights with "
        "torch.save(model.state_dict(), path)."
    )


def _check_tensors(state, path: Path) -> None:
    """A mapping of names to dense, real-valued CPU tensors, each holding its own values: a stride-0 or
    overlapping view (`torch.zeros(1).expand(200000, 200000)`, 1.6 KB on disk) claims more elements than its
    storage has, and would allocate its claimed size at the first operation on its values. Values are not
    touched here: shapes are checked against the architecture first (load_legacy_state)."""
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise _weights_error(path, "it is not a PyTorch state dict, a mapping of names to tensors")
    for key, tensor in state.items():
        if tensor.layout != torch.strided or tensor.is_meta or tensor.is_quantized or tensor.is_complex():
            kind = ("sparse" if tensor.layout != torch.strided else "meta" if tensor.is_meta
                    else "quantized" if tensor.is_quantized else "complex")
            raise _weights_error(path, f"tensor {quote(key)} is {kind}; weights must be dense real tensors")
        stored = tensor.untyped_storage().nbytes()
        if tensor.numel() * tensor.element_size() > stored:
            raise _weights_error(path, f"tensor {quote(key)} of shape {tuple(tensor.shape)} is a view of only "
                                       f"{stored} bytes (stride 0 or overlapping); weights must hold their values")


def _check_values(state: dict, path: Path) -> None:
    """Finite values only (after the shapes are known to be the architecture's: bounded work)."""
    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise InvalidModelDirectoryError(
                f"'{path}': tensor {quote(key)} holds NaN or infinite values, so the model cannot learn or "
                "predict. Re-create the model directory with init-model, or train again."
            )


def _load_failure_reason(exc: Exception) -> str:
    """The useful part of a torch.load error. Its generic text suggests weights_only=False, which we never do."""
    text = str(exc)
    specific = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\.\s|\n|$)", text)
    if specific:
        return specific.group(1).strip()[:200]
    return (text.splitlines() or [""])[0][:200]


def load_legacy_state(model_name: str, flag_value: bool, state: dict, source: str) -> Classifier:
    """A Classifier holding `state` (a legacy wrapper state dict), with whatever head it was saved with.

    Keys and shapes are compared with the architecture's (meta-device) shapes before any net of the
    file's head size is built, so a huge head costs nothing.
    """
    _check_tensors(state, Path(source))
    # Our own copy (keys renamed and filtered below). Saved from DataParallel/DDP: drop their prefix.
    state = _rekey(state, lambda k: k.removeprefix("module.") if k.startswith("module.") else k)
    if not any(k.startswith("model.") for k in state):
        # Also accept a bare torchvision state dict (e.g. a torch hub cache file).
        state = _rekey(state, lambda k: f"model.{k}")
    reference, head, floating = _reference_shapes(model_name, bool(flag_value))
    # Auxiliary heads (GoogLeNet, Inception) are in torchvision's files, not in the nets we build.
    for key in [k for k in state if k not in reference and _is_aux_head(model_name, k)]:
        del state[key]
    head_weight = state.get(f"{head}weight")
    linear = state.get("out_linear_model.weight")
    # No head at all: another architecture, reported below with the other missing keys.
    classes = head_weight.shape[0] if head_weight is not None and head_weight.dim() >= 2 else IMAGENET_CLASSES
    if classes == 0 or (linear is not None and (linear.dim() != 2 or min(linear.shape) == 0)):
        raise InvalidModelDirectoryError(
            f"'{source}' does not hold a {model_name} state dict (no usable classification head weights found). "
            "Re-create the untrained model directory with init-model."
        )
    outputs = linear.shape[0] if linear is not None else classes
    if max(classes, outputs) > MAX_CLASSES:
        raise InvalidModelDirectoryError(
            f"'{source}' has a classification head of {max(classes, outputs)} classes, more than the {MAX_CLASSES} "
            "allowed. Re-create the model directory with init-model, or train again."
        )
    expected = {k: ((classes,) + s[1:] if k.startswith(head) else s) for k, s in reference.items()}
    if linear is not None:  # the original's Linear(1000, C) stacked on the net's logits
        expected |= {"out_linear_model.weight": (outputs, classes), "out_linear_model.bias": (outputs,)}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    reshaped = [f"{k} {tuple(v.shape)} instead of {expected[k]}"
                for k, v in state.items() if k in expected and tuple(v.shape) != expected[k]]
    if missing or unexpected or reshaped:
        raise InvalidModelDirectoryError(
            f"'{source}' does not match architecture {model_name}: {len(missing)} missing keys (e.g. "
            f"{quote(missing[:3])}), {len(unexpected)} unexpected keys (e.g. {quote(unexpected[:3])}), "
            f"{len(reshaped)} of another shape (e.g. {quote(reshaped[:2], 240)}). "
            "Was it saved from another model? Re-create the untrained model directory with init-model."
        )
    floating |= {"out_linear_model.weight", "out_linear_model.bias"}
    integers = [f"{k} ({str(v.dtype).removeprefix('torch.')})" for k, v in state.items()
                if k in floating and not v.is_floating_point()]
    if integers:  # cast silently, they would be a degenerate start (all zeros and ones)
        raise InvalidModelDirectoryError(
            f"'{source}' holds weights that are not floating point: {quote(integers[:3], 240)}"
            f"{f' and {len(integers) - 3} more' if len(integers) > 3 else ''}. Save the state dict of a float model "
            "(torch.save(model.state_dict(), path)), or re-create the directory with init-model."
        )
    _check_values(state, Path(source))
    out_linear = nn.Linear(classes, outputs) if linear is not None else None
    model = Classifier(build_net(model_name, classes, flag_value), out_linear)
    try:
        model.load_state_dict(state)
    except (RuntimeError, ValueError) as exc:  # e.g. MNASNet needs the version metadata torch.save keeps
        raise InvalidModelDirectoryError(
            f"'{source}' cannot be loaded into {model_name}: {str(exc)[:200]}. Save it with "
            "torch.save(model.state_dict(), path) (the state dict itself, with its metadata)."
        ) from None
    return model


def _is_aux_head(model_name: str, key: str) -> bool:
    return model_name in ("googlenet", "inception_v3") and key.split(".")[1] in ("aux1", "aux2", "AuxLogits")


def adapt_to_classes(model: Classifier, num_classes: int) -> Classifier:
    """Give the model a head for `num_classes`, keeping an existing head that already fits."""
    if model.num_classes == num_classes and not hasattr(model, "out_linear_model"):
        return model
    if hasattr(model, "out_linear_model"):
        # Legacy layout: fold back to a plain net with a fresh head; the 1000-way ImageNet head goes.
        del model.out_linear_model
    replace_head(model.model, num_classes)
    return model
