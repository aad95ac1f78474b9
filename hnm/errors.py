"""User-facing errors: one line, naming the file, record or flag at fault."""


class HnmError(Exception):
    """Bad input or configuration; the CLI prints it on one line and exits 2."""

    exit_status = 2


class InternalError(HnmError):
    """A bug met behind the Python API, raised as an HnmError (the API raises nothing else);
    the original exception is its __cause__. The CLI reports it as an internal error."""

    exit_status = 1


class Terminated(BaseException):
    """SIGTERM arrived: stop like Ctrl-C (exit 143). A BaseException, like KeyboardInterrupt,
    so that no `except Exception` on the way (image decoding, NVML polling) can swallow it."""
