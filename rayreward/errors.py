"""Every exception rayreward raises for its users, under two bases, and the helpers that read one.

- `UsageError` (exit 2): the input is wrong (a config value, a flag, a file, a LoRA, a model or
  reward that cannot be loaded as named, a folder in use). Nothing was started; nothing saved was
  touched. The message names the field or path, the value and what is allowed.
- `RunError` (exit 1): the run started and failed (the cluster could not place it, a reward has no
  gradient, every trial of a sweep failed). The message says what failed and what was kept.
- `Interrupted` (exit 128 + signal): SIGINT or SIGTERM stopped a run cleanly; it is a
  BaseException so that no `except Exception` on the way swallows it.

The CLI decides exit codes from these bases alone (`cli.explain`); a new error class picks its
base here and needs nothing else. This module imports nothing of rayreward, so every module may
import it.
"""

from __future__ import annotations

import signal


class UsageError(Exception):
    """The input is wrong; nothing was started (exit 2)."""


class RunError(RuntimeError):
    """The run failed after it started; the message names what failed and what was kept (exit 1)."""


# ---------------------------------------------------------------------------------------------
# Usage errors (exit 2). Each also keeps the builtin base it has always had (ValueError or
# RuntimeError), so `except ValueError` in user code written against older releases still works.


class ConfigError(UsageError, ValueError):
    """Bad user input. `problems` lists every one found; str() shows them all."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("invalid config:\n" + "\n".join(f"  - {p}" for p in self.problems))

    def __reduce__(self):  # pickled across a Ray process boundary: rebuild from the list, not the text
        return (type(self), (self.problems,))


class ModelLoadError(UsageError, RuntimeError):
    """A model could not be loaded; the message names the source and the config key."""


class LoraFileError(UsageError, ValueError):
    """A LoRA file that cannot be used as asked: non-finite, or not fitting the model."""


class RewardLoadError(UsageError, RuntimeError):
    """A reward model could not be loaded; the message names the source and the config key."""


class CheckpointError(UsageError, RuntimeError):
    """A checkpoint that cannot be read back; the message names the file."""


class RunFolderBusy(UsageError, RuntimeError):
    """Another process is running in this output folder."""


# ---------------------------------------------------------------------------------------------
# Run errors (exit 1).


class ClusterError(RunError):
    """The Ray cluster cannot be reached or cannot provide what the run needs."""


class RewardGradientError(RunError):
    """The reward does not depend on the images: training could change nothing."""


class SweepError(RunError):
    """Every trial of a sweep failed."""


class RewardCallError(RunError):
    """A reward's own code failed or returned something that is not a reward: the message names
    the reward, (when known) the step, and the reward's exception."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived; the run stopped (its checkpoints are whole)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    def __reduce__(self):
        return (type(self), (self.signum,))


# ---------------------------------------------------------------------------------------------
# Reading an exception.


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def root_cause(e: BaseException) -> tuple[BaseException, str]:
    """The error a user can act on, and where it happened: a Ray Train worker's own exception
    out of WorkerGroupError / ControllerError, a Ray task's out of RayTaskError."""
    where = ""
    for _ in range(10):
        failures = getattr(e, "worker_failures", None)
        if failures:
            rank, inner = sorted(failures.items())[0]
            where = f"worker {rank}" + (f" (and {len(failures) - 1} more)" if len(failures) > 1 else "")
            e = inner
            continue
        cause = getattr(e, "cause", None) or getattr(e, "__cause__", None)
        if cause is not None and cause is not e and type(e).__module__.startswith("ray"):
            e = cause
            continue
        break
    return e, where
