"""Neural anisotropy directions of conv vs static vs dynamic NSL Conv-4, one report with the pictures.

For each backbone: the gradient-covariance NADs at initialisation (``fewshot-nsl nads``: leading
directions with their Fourier magnitudes, eigenvalue spectrum) and the directional separability
test over 2-D DCT directions with the paper's recipe (``SeparabilityRecipe``: 10,000 samples, noise
σ = 3, 20 epochs of SGD; test accuracy per direction, with a linear model trained the same way as
the control that must solve every direction). Omniglot-sized input (1×28×28).

    python benchmarks/nads_report.py            # 16 directions (0, 9, 18, 27 per axis): about an hour on 2 cores
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import RESULTS, add_allow_dirty, machine, provenance, write_results  # noqa: E402
from fewshot_nsl.analysis.nads import SeparabilityRecipe  # noqa: E402
from fewshot_nsl.cli.main import run  # noqa: E402

VARIANTS = {
    "conv4": ["--backbone", "conv4"],
    "nsl-conv4-static": ["--backbone", "nsl-conv4", "--similarity", "static"],
    "nsl-conv4-dynamic-h16": ["--backbone", "nsl-conv4", "--similarity", "dynamic", "--nsl-hidden", "16"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--frequency-step", type=int, default=9)
    add_allow_dirty(parser)
    args = parser.parse_args()
    origin = provenance(args.allow_dirty)
    folder = RESULTS / "nads"
    sections = []
    for name, flags in VARIANTS.items():
        out = folder / name
        command = ["nads", *flags, "--input-size", "28", "--samples", str(args.samples), "--out", str(out),
                   "--separability", "--frequency-step", str(args.frequency_step)]  # fmt: skip
        if run(command) != 0:
            sys.exit(f"fewshot-nsl {' '.join(command)} failed")
        rows = [line.split(",") for line in (out / "separability.csv").read_text().splitlines()[1:]]
        network = [float(r[2]) for r in rows]
        control = [float(r[3]) for r in rows]
        solved = sum(a >= 0.9 for a in network)
        eigen = [float(line.split(",")[2]) for line in (out / "spectrum.csv").read_text().splitlines()[1:]]
        sections.append(
            f"## {name}\n\n`fewshot-nsl {' '.join(command).replace(str(out), f'benchmarks/results/nads/{name}')}`\n\n"
            f"Directions solved (test accuracy ≥ 90%): **{solved} of {len(rows)}**; linear control: "
            f"{sum(a >= 0.9 for a in control)} of {len(rows)} (lowest {min(control):.3f}). Leading eigenvalue "
            f"{eigen[0]:.3g}, 10th {eigen[9]:.3g}, 100th {eigen[99]:.3g} (spectrum.csv).\n\n"
            f"![NADs of {name}](nads/{name}/nads.png)\n\n![spectrum](nads/{name}/spectrum.png)\n\n"
            f"![separability](nads/{name}/separability.png)\n"
        )
    info = machine()
    recipe = SeparabilityRecipe()
    text = (
        "# Neural anisotropy directions: conv vs static vs dynamic NSL (Conv-4, 1×28×28)\n\n"
        f"`python benchmarks/nads_report.py {' '.join(sys.argv[1:])}` on {info['cpu_count']} CPU cores. "
        f"Gradient covariance over {args.samples} random initialisations at one fixed standard-normal input; "
        f"separability: 2-D DCT directions at frequencies 0, {args.frequency_step}, ... per axis, the paper's recipe "
        f"(its reference code): x = ±{recipe.epsilon}·v + noise of σ = {recipe.noise} orthogonal to v, "
        f"{recipe.train_samples} training samples, {recipe.epochs} epochs of SGD in batches of {recipe.batch} "
        f"(learning rate {recipe.lr} decayed linearly to 0, gradient norm clipped at {recipe.clip}) from a fresh "
        f"initialisation, {recipe.test_samples} test samples; the linear control is trained the same way. "
        "Ortiz-Jiménez et al. (NeurIPS 2020).\n\n"
        + "\n".join(sections)
    )
    write_results("nads-report", {"machine": info, "samples": args.samples, "frequency_step": args.frequency_step,
                                  "separability": vars(recipe)}, text, origin)  # fmt: skip


if __name__ == "__main__":
    main()
