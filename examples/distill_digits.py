"""Distil a diffusion model of 8x8 digits into a one-step generator: EMD vs Diff-Instruct.

Trains the teacher, samples it at several NFE (DDIM, Heun), distils it by Diff-Instruct and EMD
(and a torch twin of it by EMD) and writes metrics.json (FID, precision, recall, class coverage,
NFE, timings), samples_<method>.npy and grid.png; see ``emdppl.digits``.

    python examples/distill_digits.py --smoke --out /tmp/digits
"""

import argparse
import json
from pathlib import Path

from emdppl import digits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="short run through every path")
    parser.add_argument("--sweep", action="store_true", help="EMD for K in 1..16, 3 seeds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("digits_out"))
    parser.add_argument("--no-torch", action="store_true", help="skip the torch teacher")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.add_argument(
        "--distill-steps", type=int, default=None, help="steps of each distillation (default 2000)"
    )
    args = parser.parse_args()
    metrics = digits.run_digits(
        args.out,
        scale="smoke" if args.smoke else "full",
        sweep=args.sweep,
        rng_key=args.seed,
        torch_teacher=not args.no_torch,
        progress_bar=not args.no_progress,
        distill_steps=args.distill_steps,
    )
    print(digits.format_table(metrics))
    print(json.dumps({"out": str(args.out)}))


if __name__ == "__main__":
    main()
