"""`modelrecon serve`: the offline viewer over a folder of results (local or a URL)."""

from __future__ import annotations

from typing import Annotated

import typer

from modelrecon.cli.common import app, stdout
from modelrecon.errors import BadInputError


@app.command()
def serve(
    folder: Annotated[
        str, typer.Argument(help="the folder of results to view (cubes, graphs, experiments); a path or a URL")
    ],
    port: Annotated[int, typer.Option(min=1, max=65535, help="the port")] = 8765,
    host: Annotated[str, typer.Option(help="the address to bind (127.0.0.1: this machine only)")] = "127.0.0.1",
) -> None:
    """Serve the offline viewer over FOLDER: graphs, feature dashboards, cube heatmaps and attention, experiments."""
    import uvicorn

    from modelrecon import storage
    from modelrecon.web.app import LOOPBACK_HOSTS, MAX_CONNECTIONS, create_app

    if not storage.is_dir(folder):
        raise BadInputError(f"{folder} is not a folder; give the folder of results to view (e.g. demo-output)")
    import socket

    try:  # a clear one-line error for a busy port or an address this machine does not have
        with socket.create_server((host, port)):
            pass
    except OSError as exc:
        raise BadInputError(f"cannot listen on {host}:{port} ({exc.strerror}); pass another --port or --host") from None
    loopback = host in ("127.0.0.1", "localhost", "::1")
    app = create_app(folder, trusted_hosts=LOOPBACK_HOSTS if loopback else None)
    where = "loopback only: other machines cannot connect" if loopback else "reachable from your network"
    stdout.print(f"serving {folder} at http://{'localhost' if loopback else host}:{port}/ (bound to {host}, {where}; "
                 "Ctrl-C stops)", markup=False)  # fmt: skip
    uvicorn.run(app, host=host, port=port, log_level="warning", limit_concurrency=MAX_CONNECTIONS)
