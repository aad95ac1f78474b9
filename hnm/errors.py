"""User-facing errors: one line, naming the file, record or flag at fault."""


class HnmError(Exception):
    """Bad input or configuration; the CLI prints it on one line and exits 2."""
