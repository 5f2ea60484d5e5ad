"""``make screenshots``: a PNG of each dashboard page for the docs (docs/img/dashboard-*.png).

Real processes, as in the browser tests: three small simulations into a temporary run
database, a small deployment for the live page (captured while it runs), ``fedagg
dashboard`` on a free port, headless Chromium.

    python -m tests.dashboard.screenshots docs/img
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from fedagg.deploy import read_status
from tests.dashboard.browser import browser_paths, dashboard, make_driver, rendered, simulate
from tests.deploy import harness


def main(out: Path) -> int:
    paths = browser_paths()
    if isinstance(paths, str):
        print(f"screenshots: {paths}", file=sys.stderr)
        return 1
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fedagg-shots-") as tmp:
        root = Path(tmp)
        db = root / "runs.db"
        procs = [
            simulate(root, db, "digits-iid", seed=0, rounds=30),
            simulate(
                root, db, "digits-dirichlet", seed=1, rounds=30, per_round=6, partition="dirichlet"
            ),
            simulate(
                root,
                db,
                "digits-dirichlet-8",
                seed=2,
                rounds=30,
                per_round=8,
                partition="dirichlet",
            ),
        ]
        for p in procs:
            text, _ = p.communicate(timeout=600)
            if p.returncode != 0:
                print(text, file=sys.stderr)
                return 1
        driver = make_driver(1280, 1000)
        try:
            with (
                harness.federation(root / "fed", clients=4, rounds=40, tls=False) as fed,
                dashboard(db, fed.state) as url,
            ):
                for name, page in [
                    ("runs", "/"),
                    ("run", "/runs/2"),
                    ("compare", "/compare?ids=1,2,3"),
                ]:
                    driver.get(url + page)
                    rendered(driver)
                    driver.save_screenshot(str(out / f"dashboard-{name}.png"))
                    print(f"screenshots: {out / f'dashboard-{name}.png'}")
                server = harness.start_server(fed)
                harness.wait_listening(fed, server)
                clients = [harness.start_client(fed, i) for i in range(4)]
                driver.get(url + "/live")
                rendered(driver)
                deadline = time.monotonic() + 120
                while read_status(fed.state)["rounds_closed"] < 12:
                    if time.monotonic() > deadline:
                        print(harness.read_log(fed), file=sys.stderr)
                        return 1
                    time.sleep(0.2)
                time.sleep(1.5)  # a poll or two
                driver.save_screenshot(str(out / "dashboard-live.png"))
                print(f"screenshots: {out / 'dashboard-live.png'}")
                for p in [server, *clients]:
                    harness.kill(p)
        finally:
            driver.quit()
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/img")))
