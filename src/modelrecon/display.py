"""Rich display of results in notebooks: Jupyter calls `_repr_html_`, which renders the object through the viewer's
own front end (`modelrecon.web.notebook.show`: one self-contained page, its data embedded, works offline).

The web package sits above every library package, so it is imported here only when an object is displayed."""

from __future__ import annotations


class RichDisplay:
    """A result that displays itself in a notebook as the viewer's page of it (graphs, traced graphs, patching sweeps,
    attribution-vs-patching reports, experiments, logit lenses)."""

    def _repr_html_(self) -> str:
        from modelrecon.web.notebook import show  # web sits above the library packages: imported when displayed

        return show(self)._repr_html_()
