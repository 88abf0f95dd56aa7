"""Continuing from a checkpoint: `restore` (this run's own, at any world size) and `branch` (another run's,
into a new run folder). Both read the CropBank's parts through `rank_state` (written independent of the
world size).

What a change of world size keeps: the student, teacher, optimizer and loss scaler, the step, the
evaluation history, Pseudo Recall, the merged Labeled bank, and the data: every step takes the same global
positions of the same streams (`ShardedStreamSampler`: step s takes positions [s B, (s + 1) B) of a global
batch B), only dealt to other ranks. What it changes: the Pseudo rings are re-split or merged
(`rank_state.pseudo_sources`), and each rank's draws (the global RNGs of the RPN/RoI samplers, ACRST's
generators) are derived from the seed, the step and the new rank, so the run is not bit-identical to one
that kept its world size. At the same world size a resume is bit-identical.
"""
from __future__ import annotations

from pathlib import Path

from acrst_fast import dist
from acrst_fast.engine import checkpoint as ckpt
from acrst_fast.engine import rank_state
from acrst_fast.engine.trainer import Trainer
from acrst_fast.models.weights import in_burn_in
from acrst_fast.streams import Stream, sample_seed


def saved_world(state: dict) -> int:
    """The number of processes that wrote checkpoint `state`."""
    return int(state.get("world", len(state.get("rng", [None]))))


def read_rank_state(run_dir: Path, step: int, rank: int, world: int, old_world: int,
                    collective: bool = True) -> dict | None:
    """This rank's in-memory rank state (`MeanTeacher.rank_state_dict`) from checkpoint `step` of `run_dir`,
    written by `old_world` processes; None when the checkpoint has no CropBank. `collective`: every rank
    calls it (the shared part is read once and sent to ranks that do not see it: a node-local run folder);
    else one process reads the files it sees."""
    shared_file = rank_state.shared_path(run_dir, step)
    has_shared = dist.all_gather_object(shared_file.is_file())[0] if collective else shared_file.is_file()
    if not has_shared:  # rank 0's folder decides
        legacy = ckpt.rank_state_path(run_dir, step, rank)  # a checkpoint written before the split
        if not legacy.is_file():
            return None
        if old_world != world:
            raise ckpt.CheckpointError(f"{legacy}: a checkpoint of an older acrst_fast, written by {old_world} "
                                       f"processes, resumes only with {old_world} (this run has {world})")
        return ckpt.load(legacy)
    shared = ckpt.read_everywhere(shared_file) if collective else ckpt.load(shared_file)

    def load_own(r: int) -> dict:
        part = ckpt.rank_state_path(run_dir, step, r)
        if not part.is_file():
            where = "" if old_world == world else (f"; resuming {old_world} processes' checkpoint with {world} "
                                                   "needs every rank's part in one run folder")
            raise ckpt.CheckpointError(f"{run_dir}: rank {r}'s part {part.name} of checkpoint {step} is "
                                       f"missing{where}")
        return ckpt.load(part)

    return rank_state.read(shared, load_own, old_world, world, rank, step)


def restore(trainer: Trainer, path: Path, state: dict, rank: int, config: dict) -> int:
    """Load checkpoint `state` (read from `path`) into the trainer (and this rank's CropBank, beside it);
    returns its step. Collective. At another world size than the one that wrote it, each rank's global
    RNGs are derived from run.seed, the step and the rank (module docstring).

    A checkpoint of another model (a changed model setting or class list) is a CheckpointError
    naming the config keys that differ, in one line."""
    if "runner" not in state:
        raise ckpt.CheckpointError(f"{path}: a checkpoint of an older acrst_fast (no 'runner' state); start a new "
                                   "run.output_dir")
    try:
        trainer.load_state_dict(state)
    except RuntimeError as exc:
        raise ckpt.CheckpointError(f"{path}: {_model_mismatch(state.get('config', {}), config, exc)}") from None
    world, old_world = dist.world_size(), saved_world(state)
    if old_world == world:
        ckpt.set_rng_state(state["rng"][rank])
    else:
        seed = int(config.get("run", {}).get("seed", 0))
        ckpt.seed_all(sample_seed(seed, Stream.RESUME_GLOBAL, trainer.step * world + rank))
    if trainer.runner.has_rank_state:
        part = read_rank_state(path.parent, trainer.step, rank, world, old_world)
        if part is None:
            raise ckpt.CheckpointError(f"{path}: this rank's CropBank ({ckpt.rank_state_path(path.parent, trainer.step, rank).name}) "
                                       "is missing (was the run started without acrst.fbr?)")
        trainer.load_rank_state_dict(part)
    return trainer.step

def branch(trainer: Trainer, path: Path, state: dict, info, config: dict, seed: int) -> tuple[int, str]:
    """Start this run from checkpoint `state` of another run (read from `path`): its student, teacher,
    optimizer, loss scaler, step and evaluation history, and this rank's CropBank when the checkpoint has
    one that fits (`runner.load_branch_rank_state`: else the banks start empty and the Labeled bank fills
    from the branch step on). The
    hooks' states (the source folder's divergence bookkeeping) are not carried. A checkpoint at or before
    the end of its run's burn-in holds the untrained teacher made at construction: the teacher becomes
    the student. The global RNGs (the RPN/RoI samplers) are seeded from this run's `seed`, the branch
    step and the rank; data order, views and ACRST's draws follow `seed` too. Returns the step and what
    was taken of the rank state."""
    if "runner" not in state:
        raise ckpt.CheckpointError(f"{path}: a checkpoint of an older acrst_fast (no 'runner' state); cannot branch")
    step = int(state["step"])
    try:
        trainer.runner.load_state_dict(state["runner"])
    except RuntimeError as exc:
        raise ckpt.CheckpointError(f"{path}: {_model_mismatch(state.get('config', {}), config, exc)}") from None
    trainer.step = step
    trainer.storage["eval_history"] = [e for e in state.get("storage", {}).get("eval_history", [])
                                       if e.get("step", 0) <= step]
    if in_burn_in(state):
        trainer.runner.ema.reset(trainer.runner.student)
    ckpt.seed_all(sample_seed(seed, Stream.BRANCH_GLOBAL, step * info.world + info.rank))
    taken = ""
    if trainer.runner.has_rank_state:
        part = read_rank_state(path.parent, step, info.rank, info.world, saved_world(state))
        taken = trainer.runner.load_branch_rank_state(part, step)
    return step, taken


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _model_mismatch(saved: dict, current: dict, exc: Exception) -> str:
    """One line: which model settings differ between the checkpoint and this run."""
    a, b = _flatten(saved), _flatten(current)
    keys = [k for k in sorted(set(a) | set(b)) if k.startswith("model.") and a.get(k) != b.get(k)]
    if keys:
        diffs = ", ".join(f"{k} ({a.get(k)!r} in the checkpoint, {b.get(k)!r} now)" for k in keys[:4])
        return (f"the checkpoint holds another model: {diffs}{' ...' if len(keys) > 4 else ''}; resume with the "
                "checkpoint's settings, or start a new run.output_dir")
    first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)[:200]
    return (f"the checkpoint's weights do not fit this model although the model settings are equal "
            f"(was the dataset's class list changed?): {first}")


def rank_state_of(run_dir: str | Path, step: int, rank: int) -> dict | None:
    """Rank `rank`'s in-memory rank state of checkpoint `step`, as the process that wrote it held it (for
    tools and tests, in one process, not collective); None without a CropBank."""
    run_dir = Path(run_dir)
    world = saved_world(ckpt.load(ckpt.checkpoint_path(run_dir, step)))
    return read_rank_state(run_dir, step, rank, world, world, collective=False)
