"""How recognizable a generative run's digits are: draw N class-conditioned samples (N / classes per class) and
count those a classifier run (e.g. ``formerkit train cct-digits --out /tmp/cls``) assigns to the requested class; also
times 64 samples at the recipe's step count.

    python benchmarks/dit_quality.py RUN CLASSIFIER_RUN [--num 1000] [--steps N] [--guidance G] [--seed S]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from formerkit.data.images import normalize_images
from formerkit.runs import load_run_model
from formerkit.sample import load_image_generator


def recognized(generator, classifier, preprocessing, *, num: int, steps, guidance, seed: int) -> dict:
    classes = len(generator.classes)
    labels = torch.arange(num) % classes
    images = generator.sample(labels, steps=steps, guidance=guidance, seed=seed)
    pixels = images * preprocessing["scale"]
    inputs = normalize_images(pixels, preprocessing["mean"], preprocessing["std"])
    with torch.no_grad():
        predicted = torch.cat([classifier(chunk).argmax(-1) for chunk in inputs.split(250)])
    right = predicted == labels
    per_class = [float(right[labels == c].float().mean()) for c in range(classes)]
    return {"recognized": float(right.float().mean()), "per_class": [round(v, 3) for v in per_class]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("classifier")
    parser.add_argument("--num", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    generator = load_image_generator(args.run)
    classifier, _, extra = load_run_model(args.classifier)
    result = recognized(generator, classifier, extra["preprocessing"], num=args.num, steps=args.steps,
                        guidance=args.guidance, seed=args.seed)
    timings = []
    for repeat in range(3):
        started = time.perf_counter()
        generator.sample(torch.arange(64) % len(generator.classes), steps=args.steps, guidance=args.guidance,
                         seed=repeat)
        timings.append(time.perf_counter() - started)
    config = generator.objective.config
    result.update({"run": args.run, "num": args.num, "steps": args.steps or config.sample_steps,
                   "guidance": config.guidance if args.guidance is None else args.guidance,
                   "sampler": config.sampler, "seconds_64_median": round(sorted(timings)[1], 3)})
    print(json.dumps(result))


if __name__ == "__main__":
    main()
