"""The order ``make push`` pushes kernels in, and the wait for a kernel whose output a later kernel attaches.

A kernel reads another's output through ``kernel_sources``; that output exists only once the other's run has
completed, so a dependant pushed earlier runs without it. The order is derived from the metadata: kernels that
attach no kernel of this push come first, then each kernel one level after the deepest kernel it attaches, in id
order within a level, so that the kernels that have to wait come last. ``dataset_sources`` order nothing: no
kernel writes a dataset, each one comes from a make target (``make dataset``, ``make wheels-dataset``,
``make pool-dataset``, ``make upload-model``), and one missing fails the push with the server's
"not valid dataset sources" line (``publish.CLI_ERRORS``).

Before a kernel is pushed, each kernel of the same push that it attaches is polled with
``kaggle kernels status <owner>/<slug>/<version>`` (the version its push printed) until the run is complete; an
errored or cancelled run, or the time budget running out, stops the push naming the kernel and how to read its
log. With ``wait = false`` a push that holds a kernel and one it attaches is refused before any upload, and the
order to follow is printed instead.

What ``kaggle kernels status`` prints (kaggle 2.2.5 against the loopback server): ``<ref> has status
"KernelWorkerStatus.COMPLETE"`` (kagglesdk's enum: QUEUED, RUNNING, COMPLETE, ERROR, CANCEL_REQUESTED,
CANCEL_ACKNOWLEDGED, NEW_SCRIPT), then ``Failure message: "..."`` when the run left one; the 1.x CLI printed the
bare ``complete`` / ``error`` / ``cancelAcknowledged``. Both read here as lowercase words without separators:
``complete``, ``error``, ``cancelacknowledged``, ...
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

COMPLETE = "complete"
# a run that ended without output: its dependants cannot run
FAILED = ("error", "cancelacknowledged")
STATUS_LINE = re.compile(r'has status "(?:[A-Za-z]+\.)?([A-Za-z_]+)"')
FAILURE_LINE = re.compile(r'^Failure message: "(.*)"$', re.MULTILINE)
# `kaggle kernels status` failing this many times in a row stops the wait (one failure is a network blip)
STATUS_ATTEMPTS = 3


class OrderError(ValueError):
    """The kernels cannot be pushed in one call as asked (a cycle, or dependants with waiting turned off)."""


class KernelRunError(RuntimeError):
    """A kernel that a later kernel attaches did not complete: it failed, was cancelled, or ran past the wait."""


@dataclass(frozen=True)
class Waiting:
    """How a push waits for a kernel that a later kernel of the same push attaches."""

    # true: poll the attached kernel until its run completes, then push its dependants; false: refuse a push that
    # holds both a kernel and one it attaches, and print the order to push them in
    wait: bool = True
    # give up after this many seconds per kernel: Kaggle stops a session at 12 hours, and a run may queue first
    timeout_s: float = 13 * 3600.0
    # seconds between two `kaggle kernels status` calls
    poll_s: float = 60.0

    def __post_init__(self) -> None:
        if not self.timeout_s > 0 or not self.poll_s > 0:
            raise ValueError(f"wait timeout and poll interval must be > 0 s, got {self.timeout_s}, {self.poll_s}")


def slug(ref: str) -> str:
    """``owner/slug[/version]`` → ``slug``: what ``make ... KERNEL=`` takes."""
    return ref.split("/")[1]


def attached(meta: Mapping, ids: Iterable[str]) -> list[str]:
    """The kernels among ``ids`` whose output ``meta``'s kernel attaches (its ``kernel_sources``)."""
    ids = set(ids)
    return [ref for ref in meta.get("kernel_sources", []) if ref in ids]


def push_order(metas: Mapping[str, Mapping]) -> list[str]:
    """The kernel ids of ``metas`` (id → metadata, owner filled in) in the order to push them.

    Level 0: kernels attaching no kernel of ``metas``; level n: one above the deepest kernel attached. OrderError
    names a cycle, which no order can satisfy.
    """
    level: dict[str, int] = {}
    path: list[str] = []

    def depth(ref: str) -> int:
        if ref in level:
            return level[ref]
        if ref in path:
            cycle = " → ".join([*path[path.index(ref) :], ref])
            raise OrderError(f"kernel_sources form a cycle, so no kernel of it can run first: {cycle}")
        path.append(ref)
        level[ref] = 1 + max((depth(dep) for dep in attached(metas[ref], metas)), default=-1)
        path.pop()
        return level[ref]

    return sorted(metas, key=lambda ref: (depth(ref), ref))


def describe(order: Sequence[str], metas: Mapping[str, Mapping], waiting: Waiting) -> str:
    """One line: the order, which kernel waits for which, and the wait's budget."""
    steps = []
    for ref in order:
        deps = attached(metas[ref], order)
        steps.append(slug(ref) + (f" (once {', '.join(map(slug, deps))} completed)" if deps else ""))
    line = "push order: " + ", ".join(steps)
    if any(attached(metas[ref], order) for ref in order):
        line += f"; waiting up to {waiting.timeout_s / 3600:.1f} h per kernel, polling every {waiting.poll_s:g} s"
    return line


def plan(order: Sequence[str], metas: Mapping[str, Mapping]) -> str:
    """The commands that push ``order`` one call at a time, each dependant after the runs it attaches."""
    lines = []
    for n, ref in enumerate(order, 1):
        deps = attached(metas[ref], order)
        after = f"   once `make status KERNEL={' '.join(map(slug, deps))}` says complete" if deps else ""
        lines.append(f"  {n}. make push KERNEL={slug(ref)}{after}")
    return "\n".join(lines)


def refuse_dependants(order: Sequence[str], metas: Mapping[str, Mapping]) -> None:
    """With waiting off: OrderError, printing the order to follow, when a kernel attaches another of this push."""
    pairs = [(ref, dep) for ref in order for dep in attached(metas[ref], order)]
    if pairs:
        why = "; ".join(f"{slug(ref)} attaches the output of {dep}" for ref, dep in pairs)
        raise OrderError(
            f"--no-wait: {why}, which exists only once that run completes. Nothing was pushed; push them in this "
            f"order (or without --no-wait / NO_WAIT, to have one push wait):\n{plan(order, metas)}"
        )


def parse_status(output: str, ref: str) -> tuple[str, str]:
    """``(status, failure message)`` from ``kaggle kernels status`` output; status lowercased, ``_`` removed."""
    found = STATUS_LINE.search(output)
    if not found:
        raise KernelRunError(f"`kaggle kernels status {ref}` printed no status line: {output.strip()[-300:]!r}")
    failure = FAILURE_LINE.search(output)
    return found.group(1).replace("_", "").lower(), failure.group(1) if failure else ""


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _status(ref: str, status: Callable[[str], str], waiting: Waiting, sleep: Callable[[float], None]) -> str:
    """``status(ref)``, tried up to STATUS_ATTEMPTS times a poll interval apart; the last failure stops the wait."""
    failure: RuntimeError | None = None
    for attempt in range(STATUS_ATTEMPTS):
        if attempt:
            sleep(waiting.poll_s)
        try:
            return status(ref)
        except RuntimeError as err:
            failure = err
    raise KernelRunError(f"{failure} ({STATUS_ATTEMPTS} times in a row): the wait for {ref} stops") from failure


def wait_for_run(
    ref: str,
    waiting: Waiting,
    status: Callable[[str], str],
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Poll ``status(ref)`` (``kaggle kernels status ref``'s output) until the run completes; each change of status
    is printed. KernelRunError when it errored or was cancelled, or still ran after ``waiting.timeout_s``."""
    start, last = clock(), None
    while True:
        state, failure = parse_status(_status(ref, status, waiting, sleep), ref)
        elapsed = clock() - start
        if state != last:
            print(f"{ref}: {state} (after {_hms(elapsed)})", flush=True)
            last = state
        if state == COMPLETE:
            return
        if state in FAILED:
            said = f': "{failure}"' if failure else ""
            raise KernelRunError(
                f"{ref} ended with status {state}{said}, so it has no output to attach. Read its log: `make output "
                f"KERNEL={slug(ref)}` (into build/kaggle/output/{slug(ref)}/) or `kaggle kernels logs {ref}`"
            )
        if elapsed + waiting.poll_s > waiting.timeout_s:
            raise KernelRunError(
                f"{ref} is still {state} after {_hms(elapsed)} (wait timeout {waiting.timeout_s:g} s): follow it with "
                f"`make status KERNEL={slug(ref)}`, or raise WAIT_TIMEOUT / --wait-timeout"
            )
        sleep(waiting.poll_s)


def push_in_order(
    metas: Mapping[str, Mapping],
    push: Callable[[str], int | None],
    status: Callable[[str], str],
    waiting: Waiting = Waiting(),
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, int | None]:
    """Push every kernel of ``metas`` in :func:`push_order`: ``push(id)`` uploads one and returns the version Kaggle
    gave it; before a kernel, each kernel of this push it attaches is waited for (:func:`wait_for_run`, polling
    ``status(ref)``). With waiting off, dependants in one call are refused first (:func:`refuse_dependants`).

    Returns id → version. A failed wait raises KernelRunError naming the kernels left unpushed.
    """
    order = push_order(metas)
    if not waiting.wait:
        refuse_dependants(order, metas)
    print(describe(order, metas, waiting), flush=True)
    versions: dict[str, int | None] = {}
    completed: set[str] = set()
    for n, ref in enumerate(order):
        for dep in attached(metas[ref], versions):
            if dep in completed:
                continue
            polled = dep if versions[dep] is None else f"{dep}/{versions[dep]}"
            print(f"{slug(ref)} attaches {dep}'s output: waiting for its run to complete", flush=True)
            try:
                wait_for_run(polled, waiting, status, sleep=sleep)
            except KernelRunError as err:
                left = ", ".join(slug(r) for r in order[n:])
                raise KernelRunError(
                    f"{err}\nnot pushed: {left}. Push each with `make push KERNEL=<slug>` once the kernels it "
                    f"attaches have a completed run"
                ) from None
            completed.add(dep)
        print(f"pushing {ref}", flush=True)
        versions[ref] = push(ref)
    return versions
