"""Synthetic generator speed: images per second on one core, per modality (issue 3 asks for >= 50 at 256 px).

Renders and encodes (no disk writes) a fixed set of images in this process; prints wall-clock and CPU
figures. On a shared machine the CPU figure is the fairer one: it counts only this process's core time.

    python benchmarks/synth_speed.py [--n 200] [--size 256] [--difficulty medium]
"""

from __future__ import annotations

import argparse
import time

from verity.datasets.synth import DIFFICULTIES, ImageJob, cue_policy, generator_for, plan_cases


def measure(
    modality: str, n: int, size: int, difficulty: str, dual_energy: bool = False
) -> tuple[float, float]:
    """(images per wall-clock second, images per CPU second) for n renders."""
    generator = generator_for(modality)
    cases = plan_cases(0, n, cue_policy(generator))
    jobs = [ImageJob(i, 0, cases[i], DIFFICULTIES[difficulty], size, dual_energy) for i in range(n)]
    generator.render(jobs[0])  # warm caches (fonts, noise bank) outside the timing
    wall, cpu = time.perf_counter(), time.process_time()
    for job in jobs:
        generator.render(job)
    return n / (time.perf_counter() - wall), n / (time.process_time() - cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--difficulty", default="medium", choices=tuple(DIFFICULTIES))
    args = parser.parse_args()
    for modality, dual in (("photo", False), ("xray", False), ("xray", True)):
        wall, cpu = measure(modality, args.n, args.size, args.difficulty, dual)
        name = modality + (" dual-energy" if dual else "")
        print(f"{name:<17} {args.size} px: {wall:6.1f} images/s wall, {cpu:6.1f} images/s per CPU second")


if __name__ == "__main__":
    main()
