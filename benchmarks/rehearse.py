"""The real path, end to end, from the shell recipes: every artifact reaches the stage that needs it.

    python -m benchmarks.rehearse --work build/rehearse            # make rehearse: the CPU, tiny models, demo rows

In ``--work`` as the working folder (the recipes' relative paths ``data/``, ``models/``, ``output/`` land there),
with tiny stand-ins of the real architectures under the recipes' model folders, it runs in order:

prepare → the teacher on each fold → its out-of-fold and pool labels → the students (Qwen: two stages; Gemma) →
calibration and blend → ``upload-model`` of both students through the real ``kaggle`` CLI against the loopback
Kaggle → staging of notebook 04 with the ``kaggle`` profile (its checks included) → that staged notebook executed
with papermill as Kaggle runs it: inputs found under a stand-in ``/kaggle/input`` in the 2026 layout
(``competitions/``, ``datasets/<owner>/``, ``models/<owner>/...``; one model mounted as a symlink; the package
dataset left as a zip), its wheels pins, its ``/kaggle/working`` → a checked ``submission.csv``.

Each stage runs as a user runs it, ``python -m kaggle_utils.<stage> --recipe NAME``, with only the size flags of a
CPU run added (:data:`TINY`); the recipes' paths are never overridden, so a recipe that names a file no earlier
stage writes stops the rehearsal at that step, naming it. One line per step: what it consumed and produced.
A step whose outputs exist is skipped (``--fresh`` starts over).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OWNER = "rehearsal"
QWEN_STUDENT, GEMMA_STUDENT = "wsdm-qwen2-5-14b-student", "wsdm-gemma2-9b-student"
FOLDS = 5
TEACHER = "output/teacher-qwen2.5-72b"

# flags of a CPU run on tiny models: sizes only, never a path
TRAIN_TINY = {
    "max_length": 384,
    "num_proc": 1,
    "batch_tokens": 4096,
    "grad_accum": 1,
    "lr": 2e-3,
    "max_train_rows": 256,
}
TRAIN_TINY |= {"gradient_checkpointing": False, "eval_every_steps": 0}
LABEL_TINY = {"max_length": 384, "num_proc": 1, "batch_tokens": 16384, "max_rows": 64}
# --shapes real (a CUDA GPU): the recipes' own lengths and batches; a few hundred rows
TRAIN_REAL = {"max_train_rows": 160, "eval_every_steps": 0}
LABEL_REAL: dict = {}
# a shallow teacher of Qwen2.5-72B's width (2 of its 80 layers), and the full Qwen2.5-14B / Gemma2-9B
TEACHER_72B = dict(hidden_size=8192, intermediate_size=29_568, num_attention_heads=64, num_key_value_heads=8)
REAL_MODELS = {
    "Qwen2.5-72B-Instruct": ("qwen2.5-14b", TEACHER_72B | {"num_hidden_layers": 2}),
    "Qwen2.5-14B-Instruct": ("qwen2.5-14b", {}),
    "gemma-2-9b-it": ("gemma2-9b", {}),
}
# the T4 rehearsed in the notebook's kernel (an IPython start-up file, nothing in the notebook): sm_75 as the
# dtype choice sees it (fp16), and each GPU capped at 15 GiB
T4_STARTUP = """import torch
torch.cuda.get_device_capability = lambda device=None: (7, 5)
for i in range(torch.cuda.device_count()):
    torch.cuda.set_per_process_memory_fraction(15 * 2**30 / torch.cuda.get_device_properties(i).total_memory, i)
print("rehearsal: sm_75 (fp16) and 15 GiB per GPU")
"""


class RehearsalError(RuntimeError):
    """A step of the real path failed or did not leave what the next one needs; the message names it."""


@dataclass(frozen=True)
class Step:
    """One stage as a user runs it: ``python -m <module> [--recipe R] [flags]`` in the work folder."""

    name: str
    module: str
    recipe: str = ""
    command: tuple[str, ...] = ()  # a sub-command after the module (``upload``)
    flags: dict = field(default_factory=dict)
    consumes: tuple[str, ...] = ()
    produces: tuple[str, ...] = ()

    def argv(self) -> list[str]:
        args = [sys.executable, "-m", self.module, *self.command]
        args += ["--recipe", self.recipe] if self.recipe else []
        for key, value in self.flags.items():
            text = json.dumps(value) if isinstance(value, (list, dict, bool)) else str(value)
            args += [f"--{key.replace('_', '-')}", text]
        return args


def _train(name: str, recipe: str, out: str, consumes: tuple[str, ...], sizes: dict, **flags) -> Step:
    produces = (f"{out}/adapter/adapter_config.json", f"{out}/train_config.json", f"{out}/val_predictions.parquet")
    return Step(name, "kaggle_utils.train", recipe, flags=sizes | flags, consumes=consumes, produces=produces)


def chain(shapes: str = "tiny") -> list[Step]:
    """The shell profile's path (kaggle_utils/recipes/profiles.toml ``[shell]``), in order; at real shapes without
    the two-stage Qwen alternative (its two 14B trainings), which the CPU run covers."""
    train, label = (TRAIN_TINY, LABEL_TINY) if shapes == "tiny" else (TRAIN_REAL, LABEL_REAL)
    prepared = "output/prepared/train.parquet"
    folds = [
        _train(f"teacher fold {k}", "teacher-qwen2.5-72b", f"{TEACHER}-fold{k}" if k else TEACHER, (prepared,), train,
               **({"val_fold": k, "out_dir": f"{TEACHER}-fold{k}"} if k else {}))
        for k in range(FOLDS)
    ]  # fmt: skip
    oof, pool = "output/pseudo/train-oof.parquet", "output/pseudo/pool.parquet"
    teachers = tuple(f"{s.produces[0].rsplit('/', 2)[0]}/adapter" for s in folds)
    stage1, stage2 = "output/student-qwen2.5-14b-stage1", "output/student-qwen2.5-14b-stage2"
    qwen, gemma = "output/student-qwen2.5-14b", "output/student-gemma2-9b"
    calibrated = (f"{qwen}/adapter/calibration.json", f"{gemma}/adapter/calibration.json")
    steps = [
        Step("prepare", "kaggle_utils.prepare", "prepare", consumes=("data/competition/train.parquet",),
             produces=(prepared, "output/prepared/unlabeled.parquet")),
        *folds,
        Step("out-of-fold labels", "kaggle_utils.pseudo_label", "pseudo-label-oof-qwen2.5-72b", flags=label,
             consumes=(prepared, *teachers), produces=(oof,)),
        Step("pool labels", "kaggle_utils.pseudo_label", "pseudo-label", flags=label,
             consumes=("output/prepared/unlabeled.parquet", teachers[0]), produces=(pool,)),
        _train("Qwen student", "student-qwen2.5-14b", qwen, (prepared, oof, pool), train),
        _train("Gemma student", "student-gemma2-9b", gemma, (prepared, oof, pool), train),
        Step("calibration + blend", "kaggle_utils.evaluation.calibration", "calibrate-students",
             consumes=(f"{qwen}/val_predictions.parquet", f"{gemma}/val_predictions.parquet"),
             produces=(*calibrated, f"{gemma}/adapter/blend.json")),
    ]  # fmt: skip
    init = f"{stage1}/adapter"
    if shapes == "tiny":  # the two-stage alternative to the Qwen student (its adapter would be uploaded in its place)
        steps += [
            _train("Qwen stage 1 (pool)", "student-qwen2.5-14b-stage1", stage1, (pool,), train),
            _train("Qwen stage 2 (folds)", "student-qwen2.5-14b-stage2", stage2, (prepared, oof, init), train),
        ]  # fmt: skip
    return steps


def run_step(step: Step, work: Path, env: dict[str, str], log: Path) -> str:
    """Run ``step`` in ``work`` (its output to ``log``); checks what it consumes before and produces after; returns
    how long it took, or that its outputs were already there."""
    missing = [p for p in step.consumes if not (work / p).exists()]
    if missing:
        raise RehearsalError(f"{step.name}: needs {missing}, which no earlier step wrote")
    if step.produces and all((work / p).exists() for p in step.produces):
        return "kept (outputs exist)"
    started = time.monotonic()
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(step.argv())}\n")
        out.flush()
        proc = subprocess.run(step.argv(), cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise RehearsalError(f"{step.name}: `{' '.join(step.argv()[1:])}` exited {proc.returncode}; see {log}")
    absent = [p for p in step.produces if not (work / p).exists()]
    if absent:
        raise RehearsalError(f"{step.name}: finished without writing {absent}")
    return f"{time.monotonic() - started:.0f} s"


def say(step: str, consumed: Sequence[str], produced: Sequence[str], how: str) -> None:
    print(f"{step:<24} {how:>22}  {', '.join(consumed) or '-'}  ->  {', '.join(produced) or '-'}", flush=True)


def lay_out_models(work: Path, env: dict[str, str], log: Path, shapes: str) -> None:
    """The demo's competition files as ``make data`` leaves them, and stand-ins where the recipes read the models:
    tiny ones (CPU), or random weights of the real shapes (a CUDA GPU: :data:`REAL_MODELS`)."""
    rows = {} if shapes == "tiny" else {"n_train": 800, "n_test": 200, "n_unlabeled": 200, "length_scale": 1.0}
    data = Step("demo data", "kaggle_utils.data.demo", flags={"out_dir": "data/competition"} | rows,
                produces=("data/competition/train.parquet", "data/competition/test.parquet"))  # fmt: skip
    say(data.name, [], data.produces, run_step(data, work, env, log))
    (work / "models").mkdir(exist_ok=True)
    if shapes == "real":
        from benchmarks.bench_infer import build

        for name, (shape, overrides) in REAL_MODELS.items():
            started = time.monotonic()
            build(shape, work / "models" / name, **overrides)
            say(
                f"build {name}",
                [],
                [f"models/{name} ({shape} {overrides or 'shape'})"],
                f"{time.monotonic() - started:.0f} s",
            )
        return
    made = ("build/tiny-models/qwen2-tiny/config.json", "build/tiny-models/gemma2-tiny/config.json")
    tiny = Step("tiny models", "kaggle_utils.models.demo", flags={"out_dir": "build/tiny-models"}, produces=made)
    say(tiny.name, [], tiny.produces, run_step(tiny, work, env, log))
    links = {"Qwen2.5-72B-Instruct": "qwen2-tiny", "Qwen2.5-14B-Instruct": "qwen2-tiny", "gemma-2-9b-it": "gemma2-tiny"}
    for name, small in links.items():
        if not (work / "models" / name).exists():
            (work / "models" / name).symlink_to(work / "build/tiny-models" / small, target_is_directory=True)
    say("models", [], [f"models/{n} (tiny {t})" for n, t in links.items()], "linked")


# ------------------------------------------------------------------------------------------- the Kaggle side


def kaggle_env(env: dict[str, str], work: Path, server) -> dict[str, str]:
    """The real CLI pointed at the loopback Kaggle, with fake credentials in a HOME of its own."""
    from kaggle_utils.kaggle.loopback import fake_credentials

    home = work / "build/home"
    home.mkdir(parents=True, exist_ok=True)
    clean = {k: v for k, v in env.items() if not k.startswith("KAGGLE_")}
    return clean | fake_credentials(home, OWNER) | server.routing()


def upload_students(work: Path, env: dict[str, str], log: Path) -> None:
    """``make upload-model`` of both students (calibration and blend with them) through the real CLI."""
    from kaggle_utils.kaggle.loopback import FakeKaggle

    students = {QWEN_STUDENT: "output/student-qwen2.5-14b", GEMMA_STUDENT: "output/student-gemma2-9b"}
    with FakeKaggle() as server:
        for name, folder in students.items():
            flags = {
                "dir": folder,
                "name": name,
                "owner": OWNER,
                "message": "rehearsal",
                "stage_dir": "build/kaggle/models",
            }
            step = Step(f"upload {name}", "kaggle_utils.kaggle.models", command=("upload",), flags=flags,
                        consumes=(folder,), produces=(f"build/kaggle/models/{name}/train_config.json",))  # fmt: skip
            how = run_step(step, work, kaggle_env(env, work, server), log)
            sent = sorted(os.listdir(work / f"build/kaggle/models/{name}"))
            say(step.name, step.consumes, [f"{name}/{{{','.join(sent)}}}"], how)


def stage_inference(work: Path) -> Path:
    """Notebook 04 built and staged as ``make push`` stages it (the ``kaggle`` profile's recipe injected, then the
    bootstrap cell), its checks against the uploaded students' training configs included; returns the notebook."""
    import jupytext

    from kaggle_utils.kaggle import publish

    built = work / "build/notebooks"
    built.mkdir(parents=True, exist_ok=True)
    jupytext.write(jupytext.read(ROOT / "notebooks/04_inference.py"), built / "04_inference.ipynb", fmt="ipynb")
    meta_dir = ROOT / "kernel-metadata/wsdm-arena-04-inference"
    staged = publish.stage_kernel(meta_dir, built, OWNER, work / "build/kaggle/kernels", work / "build/kaggle/models")
    notebook = staged / "04_inference.ipynb"
    say("stage notebook 04", ["build/kaggle/models/*/train_config.json"], [str(notebook.relative_to(work))], "checked")
    return notebook


def _mount(src: Path, dest: Path, link: bool = False) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if link:
        dest.symlink_to(src.resolve(), target_is_directory=True)
    else:
        # hard links: real files, as a mounted copy is, without a second copy of a real-shape model on the disk
        shutil.copytree(src, dest, ignore=shutil.ignore_patterns("dataset-metadata.json"), copy_function=os.link)


def lay_out_kaggle_input(work: Path) -> Path:
    """``kaggle/input`` as a 2026 kernel mounts its sources (competitions/, datasets/<owner>/, models/<owner>/...):
    one model mounted as a symlink, the package dataset left packed as a zip; returns the stand-in for /kaggle."""
    from importlib.metadata import version

    from kaggle_utils.kaggle import publish

    kaggle = work / "kaggle"
    shutil.rmtree(kaggle, ignore_errors=True)
    inp, datasets = kaggle / "input", kaggle / "input/datasets" / OWNER
    comp = inp / "competitions/wsdm-cup-multilingual-chatbot-arena"
    comp.mkdir(parents=True)
    for name in ("train.parquet", "test.parquet", "sample_submission.csv"):
        shutil.copy2(work / "data/competition" / name, comp / name)
    _mount(work / "models/Qwen2.5-14B-Instruct", inp / "models/qwen-lm/qwen2.5/transformers/14b-instruct/1", link=True)
    _mount(work / "models/gemma-2-9b-it", inp / "models/google/gemma-2/transformers/gemma-2-9b-it/2")
    for name in (QWEN_STUDENT, GEMMA_STUDENT):
        _mount(work / "build/kaggle/models" / name, datasets / name)
    staged = publish.stage_dataset(ROOT / "kaggle_utils", ROOT / publish.DATASET_METADATA, OWNER, work / "build/pkg")
    shutil.make_archive(str(datasets / "wsdm-arena-kaggle-utils/package"), "zip", staged / "package")
    wheels = datasets / "wsdm-arena-wheels"
    wheels.mkdir()
    # the pins the image already satisfies (nothing is installed into this venv); the target is this Python
    pins = [f"{name}=={version(name)}" for name in ("transformers", "peft", "accelerate", "bitsandbytes")]
    (wheels / publish.WHEELS_PINS).write_text("\n".join(pins) + "\n")
    (wheels / publish.WHEELS_TARGET).write_text(json.dumps({"python": f"{sys.version_info[0]}.{sys.version_info[1]}"}))
    (kaggle / "working").mkdir()
    mounts = sorted(str(p.relative_to(inp)) for p in inp.glob("*/*/*") if p.is_dir() or p.is_symlink())
    say("lay out /kaggle/input", [], mounts, "2026 layout")
    return kaggle


def kernel_env(env: dict[str, str], kaggle: Path, shapes: str) -> dict[str, str]:
    """The environment of the notebook's kernel: a Kaggle batch run with the stand-in /kaggle, no ``PYTHONPATH``, and
    at real shapes an IPython start-up file that makes the kernel a T4 (:data:`T4_STARTUP`)."""
    from kaggle_utils.kaggle.env import ROOT_VARIABLE

    tmp = kaggle / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    # no PYTHONPATH: a Kaggle kernel has no checkout on its path. A rehearsal run from a worktree (PYTHONPATH=$PWD,
    # the venv's editable install pointing at another checkout) would otherwise hand the kernel this checkout, and
    # the bootstrap would import it instead of the packed package dataset that this step is here to test
    kept = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    run_env = kept | {"KAGGLE_KERNEL_RUN_TYPE": "Batch", ROOT_VARIABLE: str(kaggle), "TMPDIR": str(tmp)}
    if shapes == "real":
        startup = kaggle / "ipython/profile_default/startup"
        startup.mkdir(parents=True, exist_ok=True)
        (startup / "00-t4.py").write_text(T4_STARTUP)
        run_env["IPYTHONDIR"] = str(kaggle / "ipython")
    return run_env


def papermill_argv(notebook: Path, executed: Path, cwd: Path) -> list[str]:
    """papermill as a module of this interpreter: its script may be installed elsewhere (/usr/local/bin for
    /usr/bin)."""
    return [
        sys.executable,
        "-m",
        "papermill",
        "--cwd",
        str(cwd),
        "--log-level",
        "WARNING",
        str(notebook),
        str(executed),
    ]


def run_on_kaggle(notebook: Path, kaggle: Path, env: dict[str, str], log: Path, shapes: str) -> Path:
    """The staged notebook executed by papermill as a Kaggle batch run would: its own parameters, the stand-in
    /kaggle as input and working folder (:func:`kernel_env`). Returns the executed notebook."""
    run_env = kernel_env(env, kaggle, shapes)
    executed = kaggle / "working" / "04_inference.executed.ipynb"
    argv = papermill_argv(notebook, executed, kaggle / "working")
    started = time.monotonic()
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(argv)}\n")
        out.flush()
        proc = subprocess.run(argv, env=run_env, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise RehearsalError(f"notebook 04 on the stand-in Kaggle exited {proc.returncode}; see {log} and {executed}")
    say(
        "notebook 04 (papermill)",
        ["kaggle/input"],
        ["kaggle/working/submission.csv"],
        f"{time.monotonic() - started:.0f} s",
    )
    return executed


def _printed(executed: Path) -> str:
    cells = json.loads(executed.read_text())["cells"]
    return "".join("".join(o.get("text", "")) for c in cells for o in c.get("outputs", []) if o.get("name") == "stdout")


def check_submission(work: Path, kaggle: Path, executed: Path) -> dict:
    """The submission is valid for the test file, the blend was fitted (not the default weight), and the package
    the notebook ran was the one unpacked from the input tree, not this checkout."""
    import pandas as pd

    from kaggle_utils.data import schema

    test = pd.read_parquet(kaggle / "input/competitions/wsdm-cup-multilingual-chatbot-arena/test.parquet")
    sub = pd.read_csv(kaggle / "working/submission.csv")
    problems = []
    if list(sub.columns) != ["id", "winner"] or sorted(sub["id"]) != sorted(test["id"]):
        problems.append(f"submission columns {list(sub.columns)} / ids do not match the test file's {len(test)} ids")
    if not sub["winner"].isin(schema.WINNERS).all():
        problems.append(f"winner values outside {schema.WINNERS}")
    report = json.loads((kaggle / "working/report.json").read_text())
    blend = report.get("blend", {})
    if not blend or "no blend.json" in blend.get("reason", ""):
        problems.append(f"the blend was not fitted: report.json says {blend}")
    said = [ln.split(": ", 1)[1] for ln in _printed(executed).splitlines() if ln.startswith("kaggle_utils: ")]
    package = said[-1] if said else ""  # the last: where the package was imported from (after "unpacked ...")
    if not Path(package).is_relative_to(kaggle / "tmp"):
        problems.append(f"the notebook did not import the packed package dataset (bootstrap said {package!r})")
    if problems:
        raise RehearsalError("; ".join(problems))
    say("check submission", ["kaggle/working/submission.csv", "report.json"], [f"{len(sub)} rows valid"], "ok")
    return report


def report_lines(report: dict) -> list[str]:
    """What the inference run says of itself (``report.json``), one line per pass: where it ran, the placement and
    token budget it chose, rows scored, seconds, out-of-memory retries."""
    lines = [f"inference on {', '.join(report.get('devices', []))}: {report.get('rows')} rows, "
             f"{report.get('elapsed_minutes')} min, fallback rows {report.get('fallback_rows')}"]  # fmt: skip
    for role in ("primary", "tta", "secondary"):
        done = report.get(role)
        if not isinstance(done, dict):
            continue
        place = report.get("placement", {}).get(role, {}).get("reason", "")
        budget = report.get("token_budget", {}).get(role, {}).get("how", "")
        lines.append(
            f"  {role}: {done.get('scored')} rows in {done.get('seconds')} s, load {done.get('load_seconds')}, "
            f"oom {done.get('oom')}"
            + (f"; placement: {place}" if place else "")
            + (f"; batches: {budget}" if budget else "")
        )
    return lines


def rehearse(work: Path, fresh: bool = False, shapes: str = "tiny") -> dict:
    """The whole path in ``work``; returns the submission's report. Raises :class:`RehearsalError` at the first
    step that fails or leaves something missing."""
    if fresh:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    work = work.resolve()
    log = work / "rehearse.log"
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
    print(f"rehearsal in {work} (each step's output: {log})", flush=True)
    started = time.monotonic()
    lay_out_models(work, env, log, shapes)
    for step in chain(shapes):
        say(step.name, step.consumes, step.produces, run_step(step, work, env, log))
    upload_students(work, env, log)
    notebook = stage_inference(work)
    kaggle = lay_out_kaggle_input(work)
    executed = run_on_kaggle(notebook, kaggle, env, log, shapes)
    report = check_submission(work, kaggle, executed)
    print("\n".join(report_lines(report)), flush=True)
    print(f"rehearse: the real path passed in {time.monotonic() - started:.0f} s; blend {report['blend']}", flush=True)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("build/rehearse"), help="the working folder")
    parser.add_argument("--fresh", action="store_true", help="start over: remove --work first")
    parser.add_argument("--shapes", choices=("tiny", "real"), default="tiny",
                        help="tiny models on the CPU, or random weights of the real shapes on a CUDA GPU")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        rehearse(args.work, args.fresh, args.shapes)
    except RehearsalError as err:
        print(f"rehearse: FAILED at {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
