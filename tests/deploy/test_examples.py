"""The deployment examples run against a real server: the numpy and the PyTorch client."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.deploy.harness import (
    PY,
    federation,
    read_log,
    start_server,
    wait,
    wait_listening,
)

ROOT = Path(__file__).resolve().parents[2]


def _run_example(tmp_path: Path, script: str) -> np.ndarray:
    import subprocess

    with federation(tmp_path, clients=2, rounds=3) as fed:
        server = start_server(fed)
        wait_listening(fed, server)
        procs = [
            subprocess.Popen(
                [
                    PY,
                    str(ROOT / "examples" / script),
                    "--key",
                    str(fed.key(i)),
                    "--clients",
                    "2",
                    "--server",
                    fed.address,
                    "--ca",
                    str(fed.dir / "certs" / "ca.pem"),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            for i in range(2)
        ]
        fed.procs += procs
        assert wait(server, 120) == 0, read_log(fed)
        for p in procs:
            out = p.communicate(timeout=30)[0].decode()
            assert p.returncode == 0 and "3 updates sent" in out, out
        final = fed.final()
        assert final.version == 3
        return np.asarray(final.params)


def test_numpy_example_trains_a_model(tmp_path: Path) -> None:
    params = _run_example(tmp_path, "deploy_numpy.py")
    assert np.isfinite(params).all() and np.abs(params).max() > 0


def test_torch_example_trains_a_model(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    params = _run_example(tmp_path, "deploy_torch.py")
    assert np.isfinite(params).all() and np.abs(params).max() > 0
