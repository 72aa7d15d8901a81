"""Cost of a negative prompt: ``evf.segment`` with vs without one (CPU, real-size model).

Target (issue 3): ratio <= 1.35. The negative prompt reuses the image's SAM 2 embedding, so it
adds one BEiT-3 pass and one decoder row, not a second image encoding.

    .venv/bin/python benchmarks/bench_negative_prompt.py [--repeats 3]
"""

from __future__ import annotations

import argparse

from common import paired_median_seconds, real_size_predictor, test_image

from evf import segment

TARGET = 1.35


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    predictor = real_size_predictor()
    image = test_image()
    plain = {"prompt": "the cat on the left"}
    negative = {**plain, "negative_prompt": "its tail"}
    t_plain, t_negative = paired_median_seconds(
        lambda: segment(image, plain, predictor), lambda: segment(image, negative, predictor), args.repeats
    )
    ratio = t_negative / t_plain
    print("model: SAM 2 hiera-tiny @1024 + BEiT-3 base @224, random weights, CPU")
    print(f"without negative prompt: {t_plain:.2f} s")
    print(f"with negative prompt:    {t_negative:.2f} s")
    print(f"ratio = {ratio:.3f} (target <= {TARGET}) -> {'PASS' if ratio <= TARGET else 'FAIL'}")


if __name__ == "__main__":
    main()
