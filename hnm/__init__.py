"""hnm: hard and diverse negative mining for image–text datasets."""

__version__ = "0.1.0"
