"""One exception type for everything a user can fix.

The CLI prints these without a traceback; anything else is a bug and keeps its traceback.
"""


class PeftFtError(Exception):
    """A problem the user can fix: bad recipe, missing file, bad row. The message says what and how."""


class RecipeError(PeftFtError):
    """Every problem found in one recipe, reported together."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        # a `--set key=value` problem is the command line's, not the file's
        lines = [p if p.startswith("--set ") else f"{source}: {p}" for p in problems]
        noun = "problem" if len(problems) == 1 else "problems"
        super().__init__(f"{len(problems)} {noun} in the recipe:\n  " + "\n  ".join(lines))


class DataError(PeftFtError):
    """A data file is missing, unreadable, or has a bad row."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a batch scheduler's, `kill`'s) while a run loads, evaluates or saves: it unwinds as Ctrl-C does, so
    the run ends through its handlers (logged, its tracker runs marked KILLED, a folder with nothing in it removed)
    instead of vanishing; the CLI then exits 143, as a process ended by SIGTERM does. In the training loop itself
    SIGTERM asks for a checkpoint first (peft_ft.engine.train)."""


class PeerLost(KeyboardInterrupt):
    """Another process of a data-parallel run is gone (a signal that reached it first, a kill, a crash) and this
    one's collective failed for it: the run unwinds as an interrupted one does (logged with its `--resume` line,
    its tracker runs marked KILLED) rather than with gloo's or NCCL's traceback. The CLI exits 1."""
