"""The one base class for errors caused by the user's input or environment.

Their messages say what is wrong and how to fix it; the CLI prints them without a traceback
(``-v`` shows it). Programming errors are not wrapped and keep their traceback.
"""


class LatentpipeError(Exception):
    """Bad input, config, artifact or environment; the message names the fix."""


REQUEUE_EXIT_CODE = 75
"""Exit code of a stage that stopped early but cleanly (checkpoint saved): requeue and rerun it."""


class StageInterrupted(Exception):
    """A stage stopped early on purpose (signal, time budget) after saving its state; rerunning
    the same command resumes it. ``exit_code``: what the CLI exits with (75: requeue; 130 after Ctrl-C)."""

    def __init__(self, message: str, exit_code: int = REQUEUE_EXIT_CODE):
        super().__init__(message)
        self.exit_code = exit_code
