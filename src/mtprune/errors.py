"""Errors that the command line reports as one line and a non-zero exit code, never a traceback."""


class MtpruneError(Exception):
    """A user-facing error: bad input, a missing file, an inconsistent checkpoint.

    ``exit_code`` is what the CLI exits with: 2 for a wrong argument value (as argparse does),
    1 for everything else (bad data, bad checkpoint, failed run).
    """

    exit_code = 1

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(MtpruneError):
    """A wrong argument value (unknown model or method, ratio out of range): exit code 2."""

    exit_code = 2


class CheckpointError(MtpruneError):
    """A checkpoint directory that is missing, truncated, or does not fit its architecture."""


class DataError(MtpruneError):
    """A dataset that is missing, has the wrong layout, or holds a bad sample."""


class WriteError(MtpruneError):
    """A file that could not be written (a full disk, a file-size limit, a read-only place); the file it
    would have replaced is intact."""
