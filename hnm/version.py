"""hnm's version: in run signatures, plans' provenance and the package metadata."""

__version__ = "0.1.0"
