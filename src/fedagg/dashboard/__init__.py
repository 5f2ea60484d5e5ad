"""``fedagg dashboard``: a read-only web view of the run database and of a running deployment.

    from fedagg.dashboard import Dashboard, make_server
    server = make_server(Dashboard("runs/fedagg.db", state="fed/state"), "127.0.0.1", 8050)
    server.serve_forever()

Pages: the runs (filters by kind, status, name), a run (accuracy and loss against round and
virtual time, participation, staleness, bytes, refusals, its config), compare (the runs'
accuracy overlaid, their config diff) and live (a server's state directory, polled every
second). JSON endpoints under ``/api/``. Served by the standard library; the page is
hand-written JavaScript and CSS shipped in the package (nothing from a CDN: it works offline).

Strictly read-only: the run database and the state directory are opened so that nothing is
written, created or locked beside them (see :mod:`fedagg.dashboard._reader`).
It sits above :mod:`fedagg.runs` and :mod:`fedagg.deploy` and below :mod:`fedagg.cli`.
"""

from fedagg.dashboard._app import MAX_COMPARE, Dashboard, Response
from fedagg.dashboard._http import make_server
from fedagg.dashboard._reader import RunReader

__all__ = ["MAX_COMPARE", "Dashboard", "Response", "RunReader", "make_server"]
