"""`make push` in dependency order: the order comes from the kernels' ``kernel_sources``; a kernel that a later one
attaches is polled with the real ``kaggle kernels status`` (against the loopback fake Kaggle, which plays a run's
statuses) until it completes; an errored run stops the push naming it; ``--no-wait`` refuses and prints the order."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kaggle_utils.kaggle import publish as kc
from kaggle_utils.kaggle import push_order
from kaggle_utils.kaggle.loopback import OWNER

ROOT = Path(__file__).resolve().parents[2]
PREP, POOL, TRAIN, INFER = (
    f"{OWNER}/wsdm-arena-0{n}" for n in ("1-data-prep", "2-pseudo-label", "3-train", "4-inference")
)
# fast polling for the tests; Kaggle's defaults are 60 s and 13 h
FAST = ("--poll-interval", "0.05", "--wait-timeout", "60")


def _metas() -> dict[str, dict]:
    """The committed kernel metadata, owner filled in, by id."""
    metas = [kc.load_kernel_metadata(d / kc.KERNEL_METADATA, OWNER) for d in kc.kernel_dirs(ROOT)]
    return {meta["id"]: meta for meta in metas}


def _push(tmp_path: Path, built_notebooks: Path, models_dir: Path, *extra: str) -> int:
    """``python -m kaggle_utils.kaggle.publish push`` in this process, staging under tmp_path."""
    args = ["push", "--notebooks-dir", str(built_notebooks), "--stage-dir", str(tmp_path / "stage")]
    return kc.main([*args, "--models-dir", str(models_dir), *extra])


def _saved(kaggle) -> list[str]:
    return [r.body["slug"] for r in kaggle.calls("SaveKernel")]


# --------------------------------------------------------------------------------------------------------- order


def test_the_order_is_derived_from_kernel_sources():
    metas = _metas()
    # 03 attaches 01's output: it goes after 01, and after every kernel that waits for nothing
    assert push_order.push_order(metas) == [PREP, POOL, INFER, TRAIN]
    # an edge written in the metadata moves the kernel: 04 attaching 03 goes after it
    metas[INFER] = {**metas[INFER], "kernel_sources": [TRAIN]}
    assert push_order.push_order(metas) == [PREP, POOL, TRAIN, INFER]
    # a source outside this push orders nothing (pushing 03 alone needs no wait within the call)
    assert push_order.push_order({TRAIN: metas[TRAIN]}) == [TRAIN]
    metas[PREP] = {**metas[PREP], "kernel_sources": [INFER]}
    with pytest.raises(push_order.OrderError, match=f"cycle.*{PREP} → {INFER} → {TRAIN} → {PREP}"):
        push_order.push_order(metas)


@pytest.mark.parametrize(
    "output,expected",
    [
        ('o/k has status "KernelWorkerStatus.COMPLETE"\n', ("complete", "")),
        ('o/k has status "KernelWorkerStatus.CANCEL_ACKNOWLEDGED"\n', ("cancelacknowledged", "")),
        ('o/k has status "KernelWorkerStatus.ERROR"\nFailure message: "OOM"\n', ("error", "OOM")),
        ('o/k has status "cancelAcknowledged"\n', ("cancelacknowledged", "")),  # the 1.x CLI
    ],
)
def test_status_lines_of_both_cli_generations_are_read(output, expected):
    assert push_order.parse_status(output, "o/k") == expected


def test_the_wait_stops_at_its_time_budget_naming_the_kernel():
    """A run still going when the budget is spent: the last poll is at the deadline, then the command to follow it."""
    now = [0.0]
    polls = []

    def status(ref: str) -> str:
        polls.append(now[0])
        return f'{ref} has status "KernelWorkerStatus.RUNNING"\n'

    waiting = push_order.Waiting(timeout_s=600, poll_s=60)
    with pytest.raises(push_order.KernelRunError, match=r"o/k/3 is still running after 0:10:00") as err:
        push_order.wait_for_run(
            "o/k/3", waiting, status, clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s)
        )
    assert polls == [60.0 * n for n in range(11)] and "make status KERNEL=k" in str(err.value)


# -------------------------------------------------------------------------------------- waiting, real kaggle CLI


def test_make_push_waits_for_the_attached_kernel_to_complete(kaggle, models_dir, make):
    kaggle.script_run("wsdm-arena-01-data-prep", "QUEUED", "RUNNING", "RUNNING", "COMPLETE")
    proc = make("push", f"KAGGLE_USERNAME={OWNER}", f"MODELS_DIR={models_dir}", "POLL_INTERVAL=0.05")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _saved(kaggle) == [PREP, POOL, INFER, TRAIN]
    # 03 is pushed only after four polls of 01, the version its push printed, the last one complete
    methods = [(r.method, (r.body or {}).get("slug") or (r.body or {}).get("kernelSlug")) for r in kaggle.requests]
    calls = [m for m in methods if m[0] in ("SaveKernel", "GetKernelSessionStatus")]
    assert calls[3:] == [("GetKernelSessionStatus", "wsdm-arena-01-data-prep")] * 4 + [("SaveKernel", TRAIN)]
    assert {r.body["versionLabel"] for r in kaggle.calls("GetKernelSessionStatus")} == {"v7"}
    assert "push order: wsdm-arena-01-data-prep, wsdm-arena-02-pseudo-label, wsdm-arena-04-inference, " in proc.stdout
    assert "wsdm-arena-03-train (once wsdm-arena-01-data-prep completed)" in proc.stdout
    said = re.findall(rf"{PREP}/7: (\w+) \(after", proc.stdout)
    assert said == ["queued", "running", "complete"], proc.stdout  # each change once
    assert f"pushed {TRAIN} version 7" in proc.stdout


@pytest.mark.parametrize("status", ["ERROR", "CANCEL_ACKNOWLEDGED"])
def test_an_errored_dependency_stops_the_push_naming_it(status, kaggle, models_dir, built_notebooks, tmp_path, capsys):
    failure = "Your notebook tried to allocate more memory than is available" if status == "ERROR" else ""
    kaggle.script_run("wsdm-arena-01-data-prep", "RUNNING", status, failure=failure)
    assert _push(tmp_path, built_notebooks, models_dir, *FAST) == 1
    assert _saved(kaggle) == [PREP, POOL, INFER], "the kernel that attaches it is not pushed"
    err = capsys.readouterr().err
    word = status.replace("_", "").lower()
    assert f"{PREP}/7 ended with status {word}" in err and (failure in err)
    assert "make output KERNEL=wsdm-arena-01-data-prep" in err and f"kaggle kernels logs {PREP}/7" in err
    assert "not pushed: wsdm-arena-03-train" in err


def test_a_status_call_that_keeps_failing_stops_the_wait(kaggle, models_dir, built_notebooks, tmp_path, capsys):
    kaggle.replies["GetKernelSessionStatus"] = 500
    assert _push(tmp_path, built_notebooks, models_dir, *FAST) == 1
    assert len(kaggle.calls("GetKernelSessionStatus")) == push_order.STATUS_ATTEMPTS
    err = capsys.readouterr().err
    assert f"`kaggle kernels status {PREP}/7` failed" in err and "the wait for" in err
    assert TRAIN not in _saved(kaggle)


# ------------------------------------------------------------------------------------------------------ no wait


def test_no_wait_refuses_dependants_before_any_upload_and_prints_the_order(kaggle, models_dir, make):
    proc = make("push", f"KAGGLE_USERNAME={OWNER}", f"MODELS_DIR={models_dir}", "NO_WAIT=1")
    assert proc.returncode != 0
    assert kaggle.requests == [], "nothing is pushed"
    assert f"wsdm-arena-03-train attaches the output of {PREP}, which exists only once that run completes" in (
        proc.stderr
    )
    steps = re.findall(r"^  (\d)\. make push KERNEL=(\S+)(.*)$", proc.stderr, re.MULTILINE)
    assert [(n, slug) for n, slug, _ in steps] == [
        ("1", "wsdm-arena-01-data-prep"),
        ("2", "wsdm-arena-02-pseudo-label"),
        ("3", "wsdm-arena-04-inference"),
        ("4", "wsdm-arena-03-train"),
    ]
    assert steps[3][2].strip() == "once `make status KERNEL=wsdm-arena-01-data-prep` says complete"


def test_no_wait_pushes_a_kernel_whose_sources_are_outside_the_call(kaggle, models_dir, built_notebooks, tmp_path):
    assert _push(tmp_path, built_notebooks, models_dir, "--kernel", "03_train", "--no-wait") == 0
    assert _saved(kaggle) == [TRAIN] and kaggle.calls("GetKernelSessionStatus") == []
    assert kaggle.calls("SaveKernel")[0].body["kernelDataSources"] == [PREP]
