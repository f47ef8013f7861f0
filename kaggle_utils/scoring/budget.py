"""Wall-clock budgets: a deadline that every long loop checks before it starts the next unit of work."""

from __future__ import annotations

import time


class Deadline:
    """``seconds`` after ``start`` (default: now; ``None`` or 0 seconds: no limit), read from ``clock``.

    Pass ``start=time.time()`` taken in a notebook's first cell so that imports and model loading count
    against the budget too: Kaggle's 12 hours run from the kernel's start, not from the scoring loop's.
    """

    def __init__(self, seconds: float | None, start: float | None = None, clock=time.time):
        self.clock = clock
        self.start = clock() if start is None else start
        self.seconds = seconds if seconds else None

    def elapsed(self) -> float:
        return self.clock() - self.start

    def remaining(self) -> float:
        return float("inf") if self.seconds is None else self.seconds - self.elapsed()

    def allows(self, estimated_seconds: float) -> bool:
        """Whether work projected to take ``estimated_seconds`` ends before the deadline."""
        return estimated_seconds <= self.remaining()


class RateMeter:
    """Seconds per padded token, measured over the work done so far; projects the next unit's time."""

    def __init__(self, safety: float = 1.25, prior_seconds_per_token: float = 0.0):
        self.safety = safety
        # used until the first measurement, so that a first batch is not free (a slow model's first batch
        # started a minute before the deadline would otherwise run over it)
        self.prior = prior_seconds_per_token
        self.tokens = 0
        self.seconds = 0.0
        # the fastest batch so far: a floor for any batch, whatever its size (per-batch overheads do not shrink
        # with the tokens, so a per-token rate alone under-projects the short batches at the end of a pass)
        self.min_batch_seconds = 0.0

    def add(self, tokens: int, seconds: float) -> None:
        self.min_batch_seconds = seconds if self.tokens == 0 else min(self.min_batch_seconds, seconds)
        self.tokens += tokens
        self.seconds += seconds

    def estimate(self, tokens: int) -> float:
        """Projected seconds for ``tokens`` padded tokens, with a safety factor; the prior before any measurement."""
        per_token = self.seconds / self.tokens if self.tokens else self.prior
        return self.safety * max(tokens * per_token, self.min_batch_seconds)

    @property
    def seconds_per_token(self) -> float:
        """Measured seconds per padded token (the prior before any measurement)."""
        return self.seconds / self.tokens if self.tokens else self.prior
