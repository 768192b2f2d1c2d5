"""`run-component`: run a command component YAML locally, binding it the way Azure ML does.

Azure ML has no workspace-free runner for YAML components (`compute: local` still needs a
workspace), so this one does the part of a job that matters for testing the component:
inputs and outputs become values and folders, `${{inputs.x}}` / `${{outputs.y}}` are
substituted, a `$[[ ... ]]` block is dropped when its optional input is not given, and the
command runs from the `code:` folder in a subprocess whose exit code is returned.

    python -m train_pytorch_model run-component component.yaml \\
        --input training_data=DIR --input epochs=1 ... --output trained_model=DIR

Not emulated: the environment (the current interpreter runs `python`), mounts, and more than
one process (a `pytorch` distribution runs as a single process with WORLD_SIZE=1).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import shlex
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

from .config import integer, number
from .errors import ComponentSpecError, quote
from .legacy_format import read_yaml

log = logging.getLogger(__name__)

EXPRESSION = re.compile(r"\$\{\{(.*?)\}\}")
BINDING = re.compile(r"^\s*(inputs|outputs)\.([A-Za-z_][A-Za-z0-9_]*)\s*$")
OPTIONAL_BLOCK = re.compile(r"\$\[\[(.*?)\]\]", re.DOTALL)
FILE_TYPES = {"uri_file"}
FOLDER_TYPES = {"uri_folder", "mlflow_model", "custom_model", "mltable", "triton_model"}
LITERAL_TYPES = {"string", "integer", "number", "boolean"}


def add_arguments(parser) -> None:
    parser.add_argument("component", type=Path, help="command component YAML, e.g. component.yaml")
    parser.add_argument("--input", action="append", default=[], metavar="NAME=VALUE",
                        help="bind an input: a path for data inputs, a literal for parameters (repeatable)")
    parser.add_argument("--output", action="append", default=[], metavar="NAME=DIR",
                        help="folder for an output, created if missing (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="print the bound command instead of running it")


def run(args) -> int:
    spec_path = Path(args.component).resolve()
    spec = load_spec(spec_path)
    inputs = bind_inputs(spec.get("inputs") or {}, parse_pairs(args.input, "--input"), spec_path.parent)
    outputs = bind_outputs(spec.get("outputs") or {}, parse_pairs(args.output, "--output"))
    argv = bind_command(spec["command"], inputs, outputs)
    if argv[0] in ("python", "python3"):
        argv[0] = sys.executable  # the environment is this interpreter's
    code_dir = resolve_code_dir(spec, spec_path.parent)
    if args.dry_run:
        print(shlex.join(argv))
        return 0
    for name, path in outputs.items():
        # Azure ML hands the command an existing folder (the parent folder for a uri_file).
        is_file = spec["outputs"][name].get("type") in FILE_TYPES
        (Path(path).parent if is_file else Path(path)).mkdir(parents=True, exist_ok=True)
    log.info("Running in %s: %s", code_dir, shlex.join(argv))
    completed = subprocess.run(argv, cwd=code_dir, env=job_environment(spec))
    # A command killed by a signal reports -N; exit like a shell would.
    return completed.returncode if completed.returncode >= 0 else 128 - completed.returncode


def load_spec(path: Path) -> dict:
    """The component YAML, its shape checked up front (read_yaml refuses aliases and huge files), so that a
    malformed one is a ComponentSpecError naming the field, never a crash later."""
    spec = read_yaml(path, ComponentSpecError, inside=None)  # a file the user named, not part of an input
    if not isinstance(spec, dict) or spec.get("type", "command") != "command" or not spec.get("command"):
        raise ComponentSpecError(f"'{path}' is not a command component: it needs `type: command` and a `command`.")
    if not isinstance(spec["command"], str):
        raise ComponentSpecError(f"'{path}': `command` must be one string, got {type(spec['command']).__name__}.")
    for group in ("inputs", "outputs"):
        ports = spec.get(group) or {}
        if not isinstance(ports, dict):
            raise ComponentSpecError(f"'{path}': `{group}` must be a mapping of names to ports, "
                                     f"got {type(ports).__name__}.")
        for name, port in ports.items():
            if not isinstance(name, str) or not isinstance(port, dict):
                raise ComponentSpecError(f"'{path}': {group[:-1]} {quote(name)} must be a mapping "
                                         "(`type: ...`, ...).")
            for key in ("min", "max"):
                if port.get(key) is not None and not is_bound(port[key]):
                    raise ComponentSpecError(f"'{path}': input {quote(name)} `{key}` must be a finite number "
                                             f"within +-2^63, got {quote(port[key], 60)}.")
            if port.get("enum") is not None and not isinstance(port["enum"], list):
                raise ComponentSpecError(f"'{path}': input {quote(name)} `enum` must be a list.")
            if port.get("default") is not None and isinstance(port["default"], (dict, list)):
                raise ComponentSpecError(f"'{path}': input {quote(name)} `default` must be a single value.")
    for key in ("code", "distribution"):
        if spec.get(key) is not None and not isinstance(spec[key], str if key == "code" else dict):
            raise ComponentSpecError(f"'{path}': `{key}` has the wrong shape ({type(spec[key]).__name__}).")
    return spec


def is_bound(value) -> bool:
    """A usable min/max: a finite number that float() can hold (a 401-digit integer cannot)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return -2**63 <= value < 2**63 if isinstance(value, int) else math.isfinite(value)


def parse_pairs(pairs: list[str], flag: str) -> dict[str, str]:
    bound: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise ComponentSpecError(f"{flag} '{pair}' is not NAME=VALUE.")
        if name.strip() in bound:
            raise ComponentSpecError(f"{flag} {name.strip()} is given twice.")
        bound[name.strip()] = value
    return bound


def bind_inputs(ports: dict, given: dict[str, str], spec_dir: Path) -> dict[str, str | None]:
    """Value of every declared input as command text; None for an optional one left unbound."""
    unknown = sorted(set(given) - set(ports))
    if unknown:
        raise ComponentSpecError(f"Unknown input(s) {', '.join(unknown)}; the component declares {', '.join(ports)}.")
    values: dict[str, str | None] = {}
    for name, port in ports.items():
        kind = port.get("type")
        if not isinstance(kind, str) or kind not in FILE_TYPES | FOLDER_TYPES | LITERAL_TYPES:
            raise ComponentSpecError(f"Input '{name}' has type {quote(kind)}, which is not a v2 component input type.")
        value = given.get(name)
        if value == "":
            value = None  # an empty value means "not given", as in the designer's parameter panel
        if value is None and port.get("default") is not None:
            value = port["default"]
            base = spec_dir  # a default path is relative to the YAML, like every path in it
        else:
            base = Path.cwd()
        if value is None:
            if not port.get("optional", False):
                raise ComponentSpecError(f"Input '{name}' ({kind}) is required: pass --input {name}=VALUE.")
            values[name] = None
        elif kind in FILE_TYPES or kind in FOLDER_TYPES:
            values[name] = check_path(name, kind, base / str(value))
        else:
            values[name] = check_literal(name, port, value)
    return values


def check_path(name: str, kind: str, path: Path) -> str:
    # Absolute, because the command runs from the code folder, not from here.
    path = path.resolve()
    if kind in FILE_TYPES and not path.is_file():
        raise ComponentSpecError(f"Input '{name}' ({kind}) must be an existing file: '{path}'.")
    if kind in FOLDER_TYPES and not path.is_dir():
        raise ComponentSpecError(f"Input '{name}' ({kind}) must be an existing folder: '{path}'.")
    return str(path)


def check_literal(name: str, port: dict, value) -> str:
    kind = port.get("type")
    text = str(value)
    if kind == "boolean":
        if text.lower() not in ("true", "false"):
            raise ComponentSpecError(f"Input '{name}' must be a boolean (true or false), got {quote(text)}.")
        return text
    if kind in ("integer", "number"):
        try:
            parsed = integer(text) if kind == "integer" else number(text)  # the train flags' own rules
        except (ValueError, argparse.ArgumentTypeError):
            raise ComponentSpecError(f"Input '{name}' must be an {kind}, got {quote(text, 60)}.") from None
        if not math.isfinite(parsed):
            raise ComponentSpecError(f"Input '{name}' must be a finite number, got {quote(text)}.")
        if port.get("min") is not None and parsed < float(port["min"]):
            raise ComponentSpecError(f"Input '{name}' is {text}; the minimum is {port['min']}.")
        if port.get("max") is not None and parsed > float(port["max"]):
            raise ComponentSpecError(f"Input '{name}' is {text}; the maximum is {port['max']}.")
        return text
    if port.get("enum") and text not in [str(choice) for choice in port["enum"]]:
        raise ComponentSpecError(f"Input '{name}' is {quote(text)}; allowed: {quote(port['enum'], 300)}.")
    return text


def bind_outputs(ports: dict, given: dict[str, str]) -> dict[str, str]:
    unknown = sorted(set(given) - set(ports))
    if unknown:
        raise ComponentSpecError(f"Unknown output(s) {', '.join(unknown)}; the component declares {', '.join(ports)}.")
    empty = sorted(name for name, path in given.items() if not path.strip())
    if empty:  # Path("") is the current folder: an output there would write into whatever folder this runs in
        raise ComponentSpecError(f"Output(s) {', '.join(empty)} bound to an empty path; give --output NAME=DIR.")
    bound = {name: str(Path(path).resolve()) for name, path in given.items()}
    for name in ports:
        if name not in bound:
            # Azure ML gives every output a fresh folder of the job's own; do the same, and say where.
            bound[name] = os.path.join(tempfile.gettempdir(), f"component-output-{name}-{uuid.uuid4().hex[:8]}")
            log.info("Output '%s' not bound (--output %s=DIR): using %s", name, name, bound[name])
    return bound


def bind_command(command: str, inputs: dict[str, str | None], outputs: dict[str, str]) -> list[str]:
    """Resolve the `$[[ ]]` blocks, split like a shell, then substitute inside each word.

    Substituting after the split keeps every value one argument, whatever it holds (spaces,
    quotes, `$`), and keeps the YAML's own quoting meaningful.
    """
    def resolve_block(match: re.Match) -> str:
        body = match.group(1)
        if "$[[" in body:
            raise ComponentSpecError("Nested $[[ ]] blocks are not supported.")
        bound = [binding(expr, inputs, outputs) for expr in EXPRESSION.findall(body)]
        if not bound:
            raise ComponentSpecError(f"The block $[[{body}]] binds no input.")
        keep = all(inputs[name] is not None for group, name in bound if group == "inputs")
        return body if keep else ""

    text = OPTIONAL_BLOCK.sub(resolve_block, command)
    if "$[[" in text:
        raise ComponentSpecError("The command has a $[[ block without its closing ]].")
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise ComponentSpecError(f"The command cannot be split into arguments: {exc}.") from None
    if not words:
        raise ComponentSpecError("The command is empty once optional blocks are dropped.")
    return [EXPRESSION.sub(lambda m: value_of(m.group(1), inputs, outputs), word) for word in words]


def binding(expression: str, inputs: dict, outputs: dict) -> tuple[str, str]:
    match = BINDING.match(expression)
    if not match:
        raise ComponentSpecError(f"Unsupported expression ${{{{{quote(expression)}}}}}: only inputs.NAME and "
                                 "outputs.NAME bind.")
    group, name = match.groups()
    if name not in (inputs if group == "inputs" else outputs):
        raise ComponentSpecError(f"The command uses ${{{{{group}.{name}}}}}, which the component does not declare.")
    return group, name


def value_of(expression: str, inputs: dict, outputs: dict) -> str:
    group, name = binding(expression, inputs, outputs)
    value = inputs[name] if group == "inputs" else outputs[name]
    if value is None:
        raise ComponentSpecError(f"Optional input '{name}' is not given but is used outside a $[[ ]] block.")
    return value


def resolve_code_dir(spec: dict, spec_dir: Path) -> Path:
    code = spec.get("code")
    if code is None:
        return spec_dir  # no code folder: run next to the YAML
    path = (spec_dir / str(code)).resolve()
    if not path.is_dir():
        raise ComponentSpecError(f"code: '{code}' is not a local folder next to the component ('{path}').")
    return path


def job_environment(spec: dict) -> dict[str, str]:
    env = dict(os.environ)
    # The command runs in the code folder, which Azure ML uploads with the component: the MLflow store (and its
    # artifacts) stays where the caller runs, as it would for `train` run from here.
    env.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}")
    distribution = spec.get("distribution") or {}
    if distribution.get("type") == "pytorch":
        # What Azure ML sets for each process of a pytorch distribution; here there is one.
        count = distribution.get("process_count_per_instance", 1)
        if count != 1:
            log.warning("run-component starts one process; process_count_per_instance=%s is ignored.", count)
        for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "WORLD_SIZE": "1",
                           "NODE_RANK": "0", "RANK": "0", "LOCAL_RANK": "0"}.items():
            env.setdefault(key, value)
    return env
