"""How many anchors does the pair-masking rule of `loss.mask_duplicates` touch on a training set?

For each global batch of the deterministic schedule (the one training uses), an anchor is affected
when another pair of its batch shares its query text or its document text: exactly the anchors
whose softmax can differ between the old rule (mask a candidate only when its text equals the
anchor's own positive) and the pair rule. Prints counts per (seed, batch size, steps).

    python scripts/masking_impact.py DATA_DIR [--seeds 42 2] [--batch-sizes 64 1024 4096] [--steps 150 0]
"""

from __future__ import annotations

import argparse
from collections import Counter

from samtone_ray.data.batching import Schedule
from samtone_ray.data.sources import load_training_pairs


def affected(queries: list[str], documents: list[str], schedule: Schedule) -> tuple[int, int]:
    """(batches with an affected anchor, affected anchors) over the schedule."""
    batches = anchors = 0
    for step in range(schedule.total_steps):
        idx = schedule.batch(step)
        q = Counter(queries[i] for i in idx)
        d = Counter(documents[i] for i in idx)
        hit = sum(1 for i in idx if q[queries[i]] > 1 or d[documents[i]] > 1)
        anchors += hit
        batches += hit > 0
    return batches, anchors


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data")
    p.add_argument("--split", default="train")
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 2])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 1024, 4096])
    p.add_argument("--steps", type=int, nargs="+", default=[150, 0], help="0 = one full epoch")
    args = p.parse_args()
    pairs = load_training_pairs(args.data, args.split).to_pairs()
    print(f"{len(pairs)} pairs, {len(set(pairs.queries))} distinct queries, {len(set(pairs.documents))} distinct documents")
    for seed in args.seeds:
        for batch_size in args.batch_sizes:
            seen = set()
            for steps in args.steps:
                schedule = Schedule(len(pairs), batch_size, seed, 1, steps)
                if schedule.total_steps in seen:  # a cap beyond the epoch is the epoch
                    continue
                seen.add(schedule.total_steps)
                batches, anchors = affected(pairs.queries, pairs.documents, schedule)
                print(f"seed={seed} batch={batch_size} steps={schedule.total_steps}: "
                      f"{batches} batches / {anchors} of {schedule.total_steps * batch_size} anchors affected")


if __name__ == "__main__":
    main()
