"""hnm: hard and diverse negative mining for image–text datasets."""

__version__ = "0.1.0"

from hnm.api import Run, load_run, mine  # noqa: E402  (modules import __version__ above)
from hnm.errors import HnmError  # noqa: E402

__all__ = ["HnmError", "Run", "load_run", "mine"]
