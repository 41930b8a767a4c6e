"""Kill a training process at every step of a checkpoint save in turn; report what survives (for
tests/test_checkpointing.py::test_sigkill_at_every_step_of_a_save_leaves_a_checkpoint_that_resumes).

    python -m tests.save_killer WORK_DIR [--quick]     # prints one JSON object

The steps of a save are the file-system calls it makes: torch.save of the shard, os.fsync, os.replace,
os.rename. A forked child process trains with these functions wrapped (nothing else of the save path is
touched) and sends itself SIGKILL right after the k-th of them returns, for every step k of the save in
turn (--quick: after the shard write, after its fsync, between the renames, after the tracker write).
After each kill another forked child resumes from the checkpoint directory and trains one iteration; its
loss must equal the uninterrupted run's loss of that iteration, bitwise.

Two situations are covered: a save of a new iteration (iteration 2 over a checkpoint of 1), and a re-save of
an iteration whose directory is already complete but not yet tracked (the state a kill between the
directory rename and the tracker write leaves), which takes the extra rename of the old directory aside.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path

import torch

import pretrain_gpt
from megatron import training

TINY = (
    "--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 32 --max-position-embeddings 32 "
    "--micro-batch-size 2 --global-batch-size 4 --lr 1e-3 --lr-warmup-iters 0 --log-interval 1 "
    "--eval-iters 0 --seed 7 --mock-data --tokenizer-type NullTokenizer --vocab-size 200"
).split()
RUN = ["--train-iters", 3]  # every run has the same schedule; --exit-interval stops it early
WRAPPED = {
    "torch.save": (torch, "save"),
    "fsync": (os, "fsync"),
    "replace": (os, "replace"),
    "rename": (os, "rename"),
}


def _describe(name: str, args: tuple) -> str:
    if name == "fsync":
        return f"fsync {os.path.basename(os.readlink(f'/proc/self/fd/{args[0]}'))}"
    if name == "torch.save":
        return f"torch.save {os.path.basename(getattr(args[1], 'name', '?'))}"
    return f"{name} {os.path.basename(str(args[0]))} -> {os.path.basename(str(args[1]))}"


def _arm(kill_after: int, log: Path) -> None:
    """Wrap the file-system calls of save_checkpoint; SIGKILL this process after the kill_after-th one."""
    state = {"active": False, "count": 0}

    def wrap(name: str, real):
        def call(*args, **kwargs):
            result = real(*args, **kwargs)
            if state["active"]:
                state["count"] += 1
                with open(log, "a") as f:
                    f.write(_describe(name, args) + "\n")
                if state["count"] == kill_after:
                    os.kill(os.getpid(), signal.SIGKILL)
            return result

        return call

    for name, (module, attr) in WRAPPED.items():
        setattr(module, attr, wrap(name, getattr(module, attr)))
    real_save_checkpoint = training.save_checkpoint

    def save_checkpoint(*args, **kwargs):
        state["active"] = True
        try:
            return real_save_checkpoint(*args, **kwargs)
        finally:
            state["active"] = False

    training.save_checkpoint = save_checkpoint


def _in_child(body) -> int:
    """Run body() in a forked process; return its wait status decoded (exit code, or -signal)."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            body()
        except BaseException as e:  # noqa: BLE001 - reported through the exit code and stderr
            print(f"child failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def _train(argv: list, out: Path | None = None) -> None:
    with open(os.devnull, "w") as devnull:
        sys.stdout = devnull
        summary = pretrain_gpt.main([str(a) for a in [*TINY, *argv]])
    if out is not None:
        out.write_text(json.dumps([step["lm loss"] for step in summary["losses"]]))


def _tracker(ckpt: Path) -> int:
    return int((ckpt / "latest_checkpointed_iteration.txt").read_text())


def _killed_save(base: Path, work: Path, k: int, log: Path) -> int:
    """Copy `base` to `work`, save its next iteration with a SIGKILL after step k (0: none); the status."""
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(base, work)
    log.unlink(missing_ok=True)
    start = _tracker(work)

    def body() -> None:
        _arm(k, log)
        _train([*RUN, "--exit-interval", start + 1, "--load", work, "--save", work])

    return _in_child(body)


def _resume(work: Path, out: Path) -> int:
    """Train one iteration from the checkpoint in `work` (no save); its loss goes to `out`."""
    out.unlink(missing_ok=True)
    tracked = _tracker(work)
    return _in_child(lambda: _train([*RUN, "--exit-interval", tracked + 1, "--load", work], out))


def _kill_at_steps(base: Path, work: Path, straight: list[float], steps: list[int]) -> list[dict]:
    """For each k of `steps`: save the iteration after `base`'s with a kill after step k, then resume."""
    results, log, losses = [], work.parent / "steps.log", work.parent / "resumed.json"
    for k in steps:
        status = _killed_save(base, work, k, log)
        if status != -signal.SIGKILL:
            raise RuntimeError(f"the saving child ended with status {status}, not killed after step {k}")
        tracked, resumed = _tracker(work), _resume(work, losses)
        results.append({
            "k": k, "killed_after": log.read_text().splitlines()[-1], "tracked": tracked,
            "listing": sorted(os.listdir(work)), "resume_status": resumed,
            "resumed_loss": json.loads(losses.read_text())[-1] if losses.exists() else None,
            "expected_loss": straight[tracked],
        })  # fmt: skip
    return results


def _steps_of_save(base: Path, work: Path) -> list[str]:
    """The steps of saving the iteration after `base`'s, from a save that is not killed."""
    log = work.parent / "steps.log"
    if _killed_save(base, work, 0, log) != 0:
        raise RuntimeError("the save without a kill failed")
    return log.read_text().splitlines()


def _chosen(steps: list[str], quick: bool, prefixes: tuple[str, ...]) -> list[int]:
    """Every step (1-based), or with `quick` the first step starting with each of `prefixes`."""
    if not quick:
        return list(range(1, len(steps) + 1))
    return [next(i for i, step in enumerate(steps, 1) if step.startswith(p)) for p in prefixes]


def main(work_dir: str, quick: bool) -> None:
    torch.set_num_threads(1)  # forked children must not inherit a started thread pool
    root, work = Path(work_dir), Path(work_dir) / "work"
    straight_losses = root / "straight.json"
    assert _in_child(lambda: _train(RUN, straight_losses)) == 0
    straight = json.loads(straight_losses.read_text())
    base = root / "base"
    assert _in_child(lambda: _train([*RUN, "--exit-interval", 1, "--save", base])) == 0

    steps = _steps_of_save(base, work)
    # after the shard write, after its fsync, after the tracker write
    fresh_steps = _chosen(steps, quick, ("torch.save", "fsync", "replace latest_checkpointed_iteration.txt"))
    fresh = _kill_at_steps(base, work, straight, fresh_steps)
    # The state a kill between the directory rename and the tracker write leaves: iter_0000002 complete,
    # the tracker still at 1. Its re-save first renames the complete directory aside (to .old-).
    resave_base = root / "resave_base"
    rename = next(i for i, step in enumerate(steps, 1) if step.startswith("rename iter_0000002.tmp-"))
    assert _killed_save(base, resave_base, rename, root / "steps.log") == -signal.SIGKILL
    resave_steps = _steps_of_save(resave_base, work)
    # between the renames (the old directory aside, the new one not yet in place)
    chosen = _chosen(resave_steps, quick, ("rename iter_0000002 ->",))
    resave = _kill_at_steps(resave_base, work, straight, chosen)
    print(json.dumps({"steps": steps, "resave_steps": resave_steps, "fresh": fresh, "resave": resave}))


if __name__ == "__main__":
    main(sys.argv[1], quick="--quick" in sys.argv[2:])
