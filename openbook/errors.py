"""One exception type for user-facing problems: its message is a single line naming what is wrong."""

from __future__ import annotations


class OpenbookError(Exception):
    """A problem with the user's input (data, config, files): printed as one line by the CLI."""


class ConfigError(OpenbookError):
    """A config file or override is malformed or inconsistent."""


class CorpusError(OpenbookError):
    """A corpus file is missing, empty or has malformed rows."""


class FinishedRun(OpenbookError):
    """A resume of a run that already reached ``train.max_steps``: there is nothing to train."""


class SnapshotError(OpenbookError):
    """An index snapshot is missing, truncated, corrupt or incompatible."""


PREEMPTED_EXIT = 75  # EX_TEMPFAIL ("try again"): a preempted run; launch/slurm.sbatch requeues the job on it
