"""The one base class for errors caused by the user's input or environment.

Their messages say what is wrong and how to fix it; the CLI prints them without a traceback
(``-v`` shows it). Programming errors are not wrapped and keep their traceback.
"""


class LatentpipeError(Exception):
    """Bad input, config, artifact or environment; the message names the fix."""
