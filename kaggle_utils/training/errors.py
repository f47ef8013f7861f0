"""Why a training run stops on its own: a non-finite loss, or a row that does not fit in memory."""

from __future__ import annotations


class NonFiniteLossError(RuntimeError):
    """The training loss became inf/NaN; the message names the step, the rows and what to try."""


class TrainMemoryError(RuntimeError):
    """A single training row does not fit in GPU memory; the message names the row and the settings to change."""
