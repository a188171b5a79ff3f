"""Wheels for an offline GPU machine (``make gpu-wheels``): emdppl and the pure-Python part of
its dependencies, at the versions installed here, in ``.whl/``.

A GPU image brings its own JAX (with CUDA) and compiled packages (NumPy, SciPy, ...) but not,
say, blackjax or arviz, and has no package index. ``benchmarks/gpu_check.sh`` installs these
wheels with ``--no-deps`` next to the image's JAX. Left out: JAX and jaxlib (the image's own,
built for its CUDA) and every compiled package (a wheel built here would not match the image's
Python); ``gpu_check.sh`` names any of those the image lacks before it runs.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

#: Installed on the GPU image, built for its CUDA: never shipped.
IMAGE_OWN = {"jax", "jaxlib"}
LIMIT_BYTES = 64 * 2**20


def _name(text: str) -> str:
    return re.sub(r"[-_.]+", "-", text).lower()


def closure(pyproject: Path) -> dict[str, metadata.Distribution]:
    """Installed distributions the project of ``pyproject`` needs (no extras), by normalised
    name (the project's own requirements from the file: its installed metadata may be older)."""
    found = {}
    project = tomllib.loads(pyproject.read_text())["project"]
    todo = [Requirement(r).name for r in project["dependencies"]]
    while todo:
        name = _name(todo.pop())
        if name in found:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        found[name] = dist
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return found


def is_pure(dist: metadata.Distribution) -> bool:
    wheel = dist.read_text("WHEEL") or ""
    return "Root-Is-Purelib: true" in wheel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(".whl"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for old in args.out.glob("*.whl"):
        old.unlink()
    root = Path(__file__).resolve().parent.parent
    dists = closure(root / "pyproject.toml")
    pure = sorted(n for n, d in dists.items() if n not in IMAGE_OWN and is_pure(d))
    compiled = sorted(n for n, d in dists.items() if n not in IMAGE_OWN and not is_pure(d))
    pins = [f"{n}=={dists[n].version}" for n in pure]
    pip = [sys.executable, "-m", "pip"]
    subprocess.run(
        [*pip, "download", "--quiet", "--no-deps", "--only-binary=:all:", "-d", str(args.out)]
        + pins,
        check=True,
    )
    subprocess.run(
        [*pip, "wheel", "--quiet", "--no-deps", "-w", str(args.out), str(root)], check=True
    )
    wheels = sorted(args.out.glob("*.whl"))
    total = sum(w.stat().st_size for w in wheels)
    (args.out / "image-needs.txt").write_text("\n".join(compiled) + "\n")
    print(f"{len(wheels)} wheels, {total / 2**20:.1f} MiB in {args.out}: {', '.join(pure)}")
    print(f"the image must bring: jax, jaxlib, {', '.join(compiled)}")
    if total > LIMIT_BYTES:
        raise SystemExit(f"{total / 2**20:.1f} MiB is above the {LIMIT_BYTES // 2**20} MiB limit")


if __name__ == "__main__":
    main()
