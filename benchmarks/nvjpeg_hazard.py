"""The CUDA JPEG decoder's stream hazard (pytorch/vision#9606), reproduced, and `--decode gpu` checked against it.

torchvision's `decode_jpeg(..., device="cuda")` allocates its outputs on the caller's current stream and decodes
on a stream of its own without waiting for the caller's, and nvJPEG's hardware engine does not honour stream
order. The caching allocator hands a block freed on a stream to that stream's next allocation at once (later use
on the same stream is ordered after the earlier one, it assumes), so the decoder can be handed memory that kernels
queued on the caller's stream have not read yet, and overwrite it.

Each iteration: fill tensors of the decoded image's size with known values and synchronise; queue ~50 ms of
work and then one sum per tensor on the current stream; free the tensors while the sums are still queued; decode
a batch of JPEGs; synchronise; compare each sum with its exact value. An iteration is corrupted when one differs.

Modes: `none` (no decode: the harness itself, always 0), `naive` (decode_jpeg on the caller's stream: the hazard;
a count above 0 shows it on this machine), `side-stream` (train_pytorch_model.gpu_decode, what `--decode gpu`
runs: must be 0).

    python benchmarks/nvjpeg_hazard.py [--iterations 200] [--out hazard.md]

Exit status: 0 when the side-stream path corrupted nothing (and on a machine without CUDA, where there is
nothing to check: it says so), 1 when it corrupted an iteration.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # this checkout's package

WIDTH, HEIGHT, JPEGS, TENSORS = 1920, 1080, 4, 16
SLEEP_CYCLES = 100_000_000  # ~50-70 ms of a GPU at 1.4-2 GHz: the sums stay queued while the decoder runs


def jpeg_bytes(seed: int) -> bytes:
    """A baseline (hardware-decodable) JPEG of a smooth colour field."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    small.resize((WIDTH, HEIGHT), Image.BICUBIC).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def run(iterations: int = 200, mode: str = "side-stream") -> dict:
    """Corrupted iterations of `mode` on the current CUDA device."""
    from torchvision.io import ImageReadMode, decode_jpeg

    from train_pytorch_model import gpu_decode

    device = torch.device("cuda", torch.cuda.current_device())
    files = [jpeg_bytes(seed) for seed in range(JPEGS)]
    encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in files]
    plan = gpu_decode.Plan(1, HEIGHT, WIDTH, None, False, 224, 256)
    decoder = gpu_decode.DeviceDecoder(device)

    def decode():
        if mode == "naive":
            return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
        if mode == "side-stream":
            batch = gpu_decode.collate([(data, plan, 0, row, None) for row, data in enumerate(files)])
            return decoder.decode(batch)
        return None

    decode()  # warm-up: the decoder's first-call setup stays out of the loop
    torch.cuda.synchronize()
    corrupted, seconds = 0, 0.0
    for _ in range(iterations):
        tensors = [torch.full((3, HEIGHT, WIDTH), value, dtype=torch.uint8, device=device)
                   for value in range(1, TENSORS + 1)]
        torch.cuda.synchronize()
        torch.cuda._sleep(SLEEP_CYCLES)
        sums = [t.sum(dtype=torch.int64) for t in tensors]
        del tensors  # freed while the sums are queued: the blocks are this stream's to hand out again
        started = time.perf_counter()
        decoded = decode()
        seconds += time.perf_counter() - started
        torch.cuda.synchronize()
        expected = [value * 3 * HEIGHT * WIDTH for value in range(1, TENSORS + 1)]
        corrupted += torch.stack(sums).tolist() != expected
        del decoded
    return {"mode": mode, "iterations": iterations, "corrupted": corrupted,
            "decode_ms": round(1000 * seconds / max(1, iterations), 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--modes", default="none,naive,side-stream")
    parser.add_argument("--out", type=Path, help="also write the Markdown table here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("nvjpeg_hazard: no CUDA device here, nothing to check (the hazard needs nvJPEG on a GPU).")
        return 0
    import torchvision

    properties = torch.cuda.get_device_properties(0)
    lines = [f"nvJPEG stream hazard (pytorch/vision#9606) on {properties.name}, torch {torch.__version__}, "
             f"torchvision {torchvision.__version__}, {JPEGS} JPEGs {WIDTH}x{HEIGHT} a call", "",
             "| decode | iterations | corrupted | decode call (ms) |", "| --- | --- | --- | --- |"]
    results = [run(args.iterations, mode) for mode in args.modes.split(",")]
    for r in results:
        lines.append(f"| {r['mode']} | {r['iterations']} | {r['corrupted']} | {r['decode_ms']} |")
    safe = all(r["corrupted"] == 0 for r in results if r["mode"] != "naive")
    lines += ["", "side-stream path (--decode gpu): " + ("no corruption" if safe else "CORRUPTED")]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if safe else 1


if __name__ == "__main__":
    sys.exit(main())
