"""The one exception type library code raises for problems a user can fix.

    raise SkytuneError("recipe.yaml: line 4: adapter.r: must be > 0 (got 0); set adapter.r: 16")

The CLI turns it into one line on stderr and exit code 2 (`cli.abort`); library code never
prints or exits. Messages name the file, line or field and say what to do.
"""


class SkytuneError(Exception):
    """A user-fixable error. `str(err)` is the whole one-line message."""

    exit_code = 2


class TrainingFailed(SkytuneError):
    """Training ran but cannot go on (no gradient, store never reachable...). Exit 1."""

    exit_code = 1


class Preempted(TrainingFailed):
    """Stopped on SIGTERM (a spot preemption notice) after saving a checkpoint. Exit 143
    (128 + SIGTERM, as if the signal had ended the process): the task failed, and SkyPilot's
    managed-job recovery restarts it, resuming from that checkpoint."""

    exit_code = 143
