"""``autoprune dashboard``: optuna-dashboard on a study's storage, on localhost.

It serves the whole storage, so the search study and its three-objective copy
``NAME-front`` (rebuilt first, as ``pareto --optuna-study`` does) both show:
the copy's Pareto-front plot is the trade-off over accuracy, FLOPs and params.
"""

from __future__ import annotations

import socketserver
from typing import Callable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from autoprune.report.pareto import save_front_study
from autoprune.study.runs import Run, quiet_storage


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    """One thread per request: the dashboard's page asks for several things at once."""

    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the stdlib's name)
        pass  # one line per request would bury the URL the user needs


def serve(run: Run, host: str = "127.0.0.1", port: int = 8080,
          ready: Callable[[str], None] = print) -> None:
    """Serve optuna-dashboard for ``run``'s storage until interrupted (Ctrl-C).

    ``port=0`` takes a free port; ``ready`` gets the URL of the study's page once
    the server listens.

    Example:
        >>> serve(open_run("resnet18-digits-flops0.05..0.5"), port=8080)  # doctest: +SKIP
        optuna-dashboard: http://127.0.0.1:8080/dashboard/studies/1 (Ctrl-C stops it)
    """
    from optuna_dashboard import wsgi  # imported here: only this command needs it

    front = save_front_study(run)
    app = wsgi(quiet_storage(run.storage))
    with make_server(host, port, app, server_class=_Server, handler_class=_QuietHandler) as server:
        where = f"http://{host}:{server.server_port}"
        ready(f"optuna-dashboard on {run.storage}: {where}/dashboard/studies/{run.study._study_id} "
              f"(search) and {where}/dashboard/studies/{front._study_id} (front copy); Ctrl-C stops it")
        server.serve_forever()
