"""Which checkpoint a run starts from, decided before any work, so nothing is lost or mixed.

The rules (README, "Failure behaviour"):
- A new run in a folder that already holds checkpoints is refused: continue it with
  `--resume`, pick another `run.dir`, or pass `--fresh`, which moves the old checkpoints
  into `run.dir/previous-<time>/` (kept, never deleted).
- `--resume` takes the newest checkpoint whose checksum verifies. Newer ones that do not
  (corrupt, truncated, empty) are named, moved into `run.dir/corrupt-<time>/` and skipped.
- `--resume PATH` to an older checkpoint rolls back: checkpoints in `run.dir` newer than
  it are an abandoned timeline, moved into `run.dir/abandoned-<time>/`, so a later plain
  `--resume` continues the new timeline.
- Resuming with a changed config is refused when the change breaks exactness (batch size,
  seed, data, model) unless `--allow-config-change`; other changes are listed in the log.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from train import checkpoint as ckpt
from train import distributed as D
from train.config import ConfigError

# Changing these under a resumed run changes what the run computes, not just how fast.
EXACTNESS_KEYS = ("schedule.batch_size", "run.seed", "data.", "model.")
# Under those prefixes but not changing what is computed: the VAE only decodes samples to look
# at (a run moved to another machine finds it elsewhere).
NOT_EXACTNESS_KEYS = ("data.vae",)


@dataclass
class ResumePlan:
    path: str | None  # the checkpoint to load, or None for a new run
    notes: list[str] = field(default_factory=list)


def _requested_checkpoint(resume: str) -> str:
    """A file, or the newest valid checkpoint of a folder."""
    if os.path.isdir(resume):
        path, skipped = ckpt.latest_valid_checkpoint(resume)
        if path is None:
            reasons = "; ".join(str(e) for e in skipped) or "it holds no ckpt-*.pt"
            raise ConfigError(f"--resume {resume}: no usable checkpoint ({reasons})")
        return path
    if not os.path.isfile(resume):
        raise ConfigError(f"--resume {resume}: no such file or folder")
    ckpt.verify_checkpoint(resume)
    return resume


def _new_run(run_dir: str, fresh: bool) -> ResumePlan:
    existing = ckpt.list_checkpoints(run_dir)
    if not existing:
        return ResumePlan(None)
    if not fresh:
        raise ConfigError(
            f"run.dir {run_dir} already holds {len(existing)} checkpoint(s) (newest "
            f"{os.path.basename(existing[-1][1])}) from another run. Continue it with "
            "--resume, choose another run.dir, or pass --fresh to start over here (the old "
            "checkpoints are moved into a previous-<time>/ folder, not deleted)")
    folder = ckpt.archive_checkpoints(run_dir, [p for _, p in existing], "previous")
    return ResumePlan(None, [f"--fresh: moved {len(existing)} earlier checkpoint(s) to {folder}"])


def _resume_run(run_dir: str, resume: bool | str) -> ResumePlan:
    notes: list[str] = []
    if resume is True:
        path, skipped = ckpt.latest_valid_checkpoint(run_dir)
        if skipped:
            folder = ckpt.archive_checkpoints(run_dir, [e.path for e in skipped], "corrupt")
            notes += [f"skipped {e.path}: {e.reason} (moved to {folder})" for e in skipped]
        if path is None:
            raise ConfigError(f"--resume: no usable checkpoint in {run_dir}")
    else:
        path = _requested_checkpoint(str(resume))
    step = ckpt.load_step(path)
    newer = [p for s, p in ckpt.list_checkpoints(run_dir)
             if s > step and os.path.abspath(p) != os.path.abspath(path)]
    if newer:
        folder = ckpt.archive_checkpoints(run_dir, newer, "abandoned")
        notes.append(f"rolled back to step {step}: {len(newer)} newer checkpoint(s) of the "
                     f"abandoned timeline moved to {folder}")
    return ResumePlan(path, notes)


def plan_resume(run_dir: str, resume: bool | str, fresh: bool, info: D.DistInfo) -> ResumePlan:
    """Decided on the main rank (which alone touches files), then shared with all ranks."""
    if resume and fresh:
        raise ConfigError("--fresh starts a new run; it cannot be combined with --resume")
    plan: ResumePlan | Exception | None = None
    if info.is_main:
        removed = ckpt.remove_orphaned_temporaries(run_dir)
        try:
            plan = _resume_run(run_dir, resume) if resume else _new_run(run_dir, fresh)
        except (ConfigError, ckpt.CorruptCheckpointError) as exc:
            plan = exc
        if removed and isinstance(plan, ResumePlan):
            plan.notes.append(f"removed {len(removed)} temporary file(s) of an interrupted "
                              f"save: {', '.join(removed)}")
    plan = D.broadcast_object(plan, info)
    if isinstance(plan, Exception):
        raise plan
    return plan


def _flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict) and key != "overrides":
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(saved: dict[str, Any], current: dict[str, Any], allow: bool) -> list[str]:
    """Notes listing what changed since the checkpoint; ConfigError when a change breaks
    exactness and `allow` is False."""
    old, new = _flatten(saved), _flatten(current)
    changed = sorted(k for k in old.keys() | new.keys()
                     if _normal(old.get(k)) != _normal(new.get(k)))
    breaking = [k for k in changed if (k.startswith(EXACTNESS_KEYS) or k in EXACTNESS_KEYS)
                and k not in NOT_EXACTNESS_KEYS]
    if breaking and not allow:
        diffs = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in breaking)
        raise ConfigError(f"the config differs from the checkpoint's in ways that change what "
                          f"the resumed run computes ({diffs}). Resume with the saved config "
                          "(--config RUN_DIR/config.json), or pass --allow-config-change")
    return [f"config changed since the checkpoint: {k}: {old.get(k)!r} -> {new.get(k)!r}"
            for k in changed]


def _normal(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
