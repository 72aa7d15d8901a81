"""4 prompts on one image: one ``predict_batch`` call vs 4 ``predict`` calls (CPU, real-size model).

Target (issue 2): ratio <= 0.45. The batch embeds the image once and runs BEiT-3 and the mask
decoder once over the 4 padded prompts.

    .venv/bin/python benchmarks/bench_predictor.py [--repeats 3]
"""

from __future__ import annotations

import argparse

from common import PROMPTS, paired_median_seconds, real_size_predictor, test_image

TARGET = 0.45


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    predictor = real_size_predictor()
    image = test_image()

    def separate() -> None:
        for prompt in PROMPTS:
            predictor.predict(image, prompt)

    def batched() -> None:
        predictor.predict_batch([image], [PROMPTS])

    t_separate, t_batched = paired_median_seconds(separate, batched, args.repeats)
    ratio = t_batched / t_separate
    print(f"model: SAM 2 hiera-tiny @1024 + BEiT-3 base @224, random weights, CPU, {len(PROMPTS)} prompts")
    print(f"4 x predict:      {t_separate:.2f} s")
    print(f"1 x predict_batch: {t_batched:.2f} s")
    print(
        f"ratio batch/separate = {ratio:.3f} (target <= {TARGET}) -> {'PASS' if ratio <= TARGET else 'FAIL'}"
    )


if __name__ == "__main__":
    main()
