"""`make wheelhouse`: the wheels an offline GPU host needs to run benchmarks/gpu_check.sh, in `.whl/`.

Such a host is assumed to have python3 with pip and HOST_PACKAGES (a typical PyTorch image: torch, torchvision and
the scientific stack) and no package index. What `train` needs beyond them is MLflow's client (the output model is
an MLflow model): mlflow-skinny and its dependencies, less what HOST_PACKAGES already bring. The versions are the
ones installed here (the tested ones); compiled wheels are fetched for CPython 3.10-3.13 on x86_64 Linux, pure ones
once. torch is never bundled: the host's own is what the check measures.

    python benchmarks/wheelhouse.py [--out .whl]      # needs PyPI; run it from the project's venv

Writes `<out>/*.whl` and `<out>/requirements.txt` (name==version, what gpu_check.sh installs with
`--no-index --no-deps --find-links <out>`); fails when the folder would exceed MAX_MIB.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from packaging.requirements import Requirement

HOST_PACKAGES = ("torch", "torchvision", "numpy", "pandas", "pyarrow", "pillow", "pyyaml", "matplotlib",
                 "scikit-learn", "tqdm", "scipy", "onnx", "onnxruntime")
NEEDED = ("mlflow-skinny",)  # `import mlflow`, the pyfunc model writer; the tracking server's parts are not needed
NEVER = ("torch", "torchvision", "triton")
PYTHONS = ("3.10", "3.11", "3.12", "3.13")
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64", "manylinux_2_34_x86_64")
MAX_MIB = 60


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(names) -> dict[str, str]:
    """Installed distributions `names` need (themselves included), by canonical name -> installed version."""
    found, todo = {}, list(names)
    while todo:
        name = canonical(todo.pop())
        if name in found:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # not installed here: not needed on this platform (a marker this machine does not meet)
        found[name] = dist.version
        for line in dist.requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return found


def wanted() -> dict[str, str]:
    """What the host lacks: NEEDED's dependency closure less HOST_PACKAGES' (and never torch)."""
    host = closure(HOST_PACKAGES)
    return {name: version for name, version in closure(NEEDED).items() if name not in host and name not in NEVER}


def download(name: str, version: str, into: Path) -> list[Path]:
    """The wheel(s) of name==version: one pure wheel, or one per CPython version for a compiled one."""
    pip = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--dest"]
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([*pip, tmp, f"{name}=={version}"], check=True)
        (wheel,) = Path(tmp).glob("*.whl")
        if wheel.name.endswith("-none-any.whl"):
            return [Path(shutil.move(wheel, into / wheel.name))]
        wheel.unlink()
        kept = []
        for python in PYTHONS:
            platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
            done = subprocess.run([*pip, tmp, "--python-version", python, "--implementation", "cp", *platforms,
                                   f"{name}=={version}"], capture_output=True, text=True)
            if done.returncode != 0:
                print(f"  {name} {version}: no wheel for CPython {python} ({done.stderr.strip()[-200:]})")
        for wheel in sorted(Path(tmp).glob("*.whl")):
            if not (into / wheel.name).exists():
                kept.append(Path(shutil.move(wheel, into / wheel.name)))
        return kept


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / ".whl")
    args = parser.parse_args(argv)
    needed = wanted()
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    for name, version in sorted(needed.items()):
        wheels = download(name, version, args.out)
        print(f"{name}=={version}: " + ", ".join(w.name for w in wheels))
    (args.out / "requirements.txt").write_text("".join(f"{n}=={v}\n" for n, v in sorted(needed.items())))
    mib = sum(f.stat().st_size for f in args.out.iterdir()) / 2**20
    print(f"{args.out}: {len(needed)} packages, {mib:.1f} MiB")
    if mib > MAX_MIB:
        print(f"wheelhouse: {mib:.1f} MiB is more than the {MAX_MIB} MiB allowed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
