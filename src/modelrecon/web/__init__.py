"""The offline viewer: a local server over a folder of results (`modelrecon serve`), and the same front-end embedded
in notebooks and standalone pages (`show`)."""

from modelrecon.web.notebook import show

__all__ = ["show"]
