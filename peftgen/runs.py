"""Run folders that never lose what was there, and checkpoints a kill cannot spoil.

    run = plan(output_dir, resume=..., overwrite=...)   # refusals first: nothing on disk changes
    create(run)                                         # after the model loaded and the trainer was built
    publish(run)                                        # at the first complete checkpoint, or at the end

A new run goes into its folder directly when the folder is new or empty. With
``--overwrite`` it is written beside the old run, in ``.NAME.partial-PID``,
and replaces the old run only once it holds a complete checkpoint (or at its
end): a run that fails to start, or is killed before then, leaves the old one
as it was. A checkpoint is written under ``STAGING/checkpoint-N`` and renamed
into ``checkpoint-N`` when every file is in, so a ``checkpoint-N`` folder is
always whole, and ``--resume`` picks the newest whole one.

Under torchrun or ``accelerate launch`` the main process alone touches the
folder; ``Processes.on_main`` hands its answer, or its error, to the others.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from peftgen import run_files
from peftgen.errors import PeftgenError

STAGING = ".saving"  # checkpoints and the final model are written here, then renamed into place
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_WEIGHTS = (
    "adapter_model.safetensors",
    "adapter_model.bin",
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "pytorch_model_fsdp",
    "global_step",
)


def note(text: str) -> None:
    print(f"note: {text}", file=sys.stderr, flush=True)


def main_process() -> bool:
    """Whether this is the process that talks to the user (rank 0 under torchrun / accelerate launch)."""
    return os.environ.get("RANK", "0") == "0"


class Processes:
    """The processes of one training job: just this one, or all those torchrun / accelerate launch started."""

    def __init__(self, cpu: bool):
        self.state = None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import PartialState

            # The same process group TrainingArguments would set up a moment later.
            self.state = PartialState(cpu=cpu)
        self.main = self.state.is_main_process if self.state else True

    def barrier(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()

    def on_main(self, function, *args):
        """function(*args), run by the main process alone; every process gets its result.

        An error there stops every process: the main one raises it, the others
        leave quietly (exit code 1) so that the user reads it once.
        """
        if self.state is None:
            return function(*args)
        from accelerate.utils import broadcast_object_list

        payload, failure = [None], None
        if self.main:
            try:
                payload = [("ok", function(*args))]
            except Exception as error:  # noqa: BLE001  handed on, then raised again below
                payload, failure = [("failed", None)], error
        broadcast_object_list(payload, from_process=0)
        kind, value = payload[0]
        if kind == "ok":
            return value
        if failure is not None:
            raise failure
        raise SystemExit(1)


@dataclass
class RunFolder:
    """Where a run lives (final) and where it is being written now (work: final itself, or a sibling)."""

    final: Path
    work: Path
    created: bool = False  # final did not exist: a failed start removes it again
    published: bool = False  # work has become final
    resume_from: Path | None = None  # the checkpoint --resume continues

    @property
    def beside(self) -> bool:
        return self.work != self.final


def checkpoints(folder: Path) -> list[Path]:
    """The checkpoint-N folders of a run, oldest step first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CHECKPOINT.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def incomplete(checkpoint: Path) -> str | None:
    """Why a checkpoint folder cannot be resumed from, or None when it is whole."""
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
        state["global_step"]
    except FileNotFoundError:
        return "no trainer_state.json"
    except (OSError, ValueError, KeyError, TypeError):
        return "its trainer_state.json is damaged"
    names = [p.name for p in checkpoint.iterdir() if not p.is_file() or p.stat().st_size > 0]
    if not any(name.startswith(_WEIGHTS) for name in names):
        return "no model or adapter weights"
    if not any(name.startswith(("optimizer", "global_step")) for name in names):
        return "no optimizer state"
    if "scheduler.pt" not in names and not any(name.startswith("global_step") for name in names):
        return "no scheduler state"
    return None


def resume_point(folder: Path) -> Path:
    """The newest whole checkpoint of a run, saying on stderr which one and what it passed over."""
    skipped = [f"{STAGING}/{p.name} (its save was interrupted)" for p in checkpoints(folder / STAGING)]
    for checkpoint in reversed(checkpoints(folder)):
        problem = incomplete(checkpoint)
        if problem is None:
            passed = f"; skipped {', '.join(skipped)}" if skipped else ""
            note(f"resuming from {checkpoint.name}, the newest complete checkpoint in {folder}{passed}.")
            return checkpoint
        skipped.append(f"{checkpoint.name} ({problem})")
    raise PeftgenError(
        f"Nothing to resume in {folder}: no complete checkpoint-N folder"
        + (f" ({', '.join(skipped)})." if skipped else ".")
        + " Drop --resume and pass --overwrite to start the run again."
    )


def _sibling(final: Path, kind: str, pid: int | None = None) -> Path:
    return final.parent / f".{final.name}.{kind}-{pid if pid is not None else os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, but another user's
        return True
    return True


def _clear_leftovers(final: Path) -> None:
    """Remove what a killed --overwrite run left beside final; put back an old run a kill left aside."""
    if not final.parent.is_dir():
        return
    pattern = re.compile(rf"^\.{re.escape(final.name)}\.(partial|old)-(\d+)$")
    for path in final.parent.iterdir():
        match = pattern.match(path.name)
        if not match or _alive(int(match.group(2))):
            continue
        if match.group(1) == "old" and not final.exists():  # killed between the two renames of publish()
            os.rename(path, final)
            note(f"put back {final}, which a killed run had moved aside.")
        elif path.is_symlink():
            path.unlink()
        else:
            shutil.rmtree(path, ignore_errors=True)


def plan(output_dir: str | Path, *, resume: bool = False, overwrite: bool = False) -> RunFolder:
    """Decide where the run goes, refusing to clobber a run or unrelated files. Changes nothing on disk."""
    folder = Path(output_dir)
    if folder.is_file():
        raise PeftgenError(f"--output-dir {folder} is a file. Pick a folder path.")
    existing = list(folder.iterdir()) if folder.is_dir() else []
    found = checkpoints(folder)
    holds_run = run_files.is_run(folder) or bool(found)
    if resume:
        if not found and not checkpoints(folder / STAGING):
            raise PeftgenError(f"Nothing to resume in {folder}: it holds no checkpoint-N folder. Drop --resume to start a new run.")
        return RunFolder(folder, folder, published=True, resume_from=resume_point(folder))
    if holds_run and not overwrite:
        raise PeftgenError(f"{folder} already holds a peftgen run. Pass --overwrite to replace it, --resume to continue it, or choose another --output-dir.")
    if existing and not holds_run:
        raise PeftgenError(
            f"{folder} is not empty and is not a peftgen run ({len(existing)} entries, e.g. {existing[0].name}). "
            "Choose an empty or new --output-dir; peftgen will not mix its files with yours."
        )
    if holds_run:  # --overwrite: the new run is written beside the old one until it has something to show
        return RunFolder(folder, _sibling(folder, "partial"))
    return RunFolder(folder, folder, created=not folder.exists())


def create(run: RunFolder) -> None:
    """Make the folder the run writes into (main process)."""
    _clear_leftovers(run.final)
    if run.published:
        shutil.rmtree(run.work / STAGING, ignore_errors=True)  # saves a kill interrupted; resume_point named them
        return
    try:
        run.work.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise PeftgenError(f"--output-dir {run.final} cannot be created: {error.strerror or error}. Choose a folder you can write to.") from None


def publish(run: RunFolder) -> None:
    """Make the run being written the run in its folder (main process). With --overwrite the old run goes now.

    Until the run ends, the sibling's name stays a link to the folder, so a
    path taken before (a tracker's log folder, a callback's file) still works.
    """
    if run.published:
        return
    if run.beside:
        old = _sibling(run.final, "old")
        os.rename(run.final, old)
        os.rename(run.work, run.final)
        shutil.rmtree(old)
        run.work.symlink_to(run.final.resolve(), target_is_directory=True)
    run.published = True


def finish(run: RunFolder) -> None:
    """The run ended well: drop the link publish() left (main process)."""
    if run.beside and run.work.is_symlink():
        run.work.unlink()
    shutil.rmtree(run.final / STAGING, ignore_errors=True)


def discard(run: RunFolder) -> None:
    """The run failed: remove what it wrote unless it has been published (main process)."""
    if run.published:
        finish(run)
        return
    if run.beside or run.created:
        shutil.rmtree(run.work, ignore_errors=True)
    elif run.work.is_dir():  # it was empty before this run
        for path in run.work.iterdir():
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def move_into(source: Path, target: Path, last: tuple[str, ...]) -> None:
    """Rename every file of source into target, the names in ``last`` at the end, then remove source.

    Those last names are what makes a folder look like a finished model
    (config.json, adapter_config.json): a kill part-way leaves it unfinished.
    """
    names = sorted(p.name for p in source.iterdir())
    for name in sorted(names, key=lambda n: n in last):
        destination = target / name
        if destination.is_dir() and not destination.is_symlink():
            shutil.rmtree(destination)
        os.replace(source / name, destination)
    source.rmdir()


def write_text(path: Path, text: str) -> None:
    """Write a file under a temporary name and rename it, so it is whole or absent."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)
