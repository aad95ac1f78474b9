"""hnm: hard and diverse negative mining for image–text datasets."""

from hnm.api import Run, load_run, mine
from hnm.errors import HnmError
from hnm.version import __version__ as __version__

__all__ = ["HnmError", "Run", "load_run", "mine"]
