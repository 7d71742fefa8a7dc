"""Mixing sources by weight: ``--dataset a.jsonl:0.7,tang:0.3``.

Weights are shares of the training mixture, counted in examples (``--mix_by examples``, the default) or in tokens
(``--mix_by tokens``: a source of long conversations then contributes fewer of them). The mixture is as large as it
can be without using any example twice: the source that runs out first, relative to its share, is used whole and
sets the size; the others contribute a seeded random subset of the size their share asks for. What is left out of
each source is counted in the data report, never dropped silently.

Example: 10,000 examples of ``a`` at 0.7 and 1,000 of ``tang`` at 0.3 → ``tang`` is the limit (1,000 / 0.3 = 3,333
examples in all), so the mixture takes all of ``tang`` and 2,333 of ``a``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MIX_BY = ("examples", "tokens")


def mixture(lengths: Sequence[np.ndarray], weights: Sequence[float], by: str = "examples",
            seed: int = 0) -> list[np.ndarray]:
    """For each source, the (ascending) indices of its examples that go into the mixture.

    ``lengths[i]`` are the token counts of source ``i``'s examples; ``weights`` need not sum to 1.
    """
    if by not in MIX_BY:
        raise ValueError(f"--mix_by {by!r}: expected one of {', '.join(MIX_BY)}")
    if len(lengths) != len(weights) or not lengths:
        raise ValueError("one weight per source is needed")
    shares = np.asarray(weights, dtype=np.float64) / float(sum(weights))
    sizes = np.array([len(x) if by == "examples" else int(np.sum(x, dtype=np.int64)) for x in lengths],
                     dtype=np.float64)
    total = float(np.min(sizes / shares))  # the largest mixture in which no example repeats
    limit = int(np.argmin(sizes / shares))
    chosen = []
    for i, (source_lengths, share) in enumerate(zip(lengths, shares)):
        order = np.random.default_rng([seed, i]).permutation(len(source_lengths))
        if i == limit:
            take = len(source_lengths)
        elif by == "examples":
            take = min(len(source_lengths), int(round(share * total)))
        else:  # as many examples, in the seeded order, as fit in the source's share of the tokens
            budget = share * total
            take = int(np.searchsorted(np.cumsum(source_lengths[order], dtype=np.int64), budget, side="right"))
        chosen.append(np.sort(order[:take]))
    return chosen
