"""Activation cubes: capture a model's internals to a documented Zarr store; open, slice, summarise, export, view."""

from modelrecon.cube.capture import capture
from modelrecon.cube.reader import Cube, Example, open_cube

__all__ = ["Cube", "Example", "capture", "open_cube"]
