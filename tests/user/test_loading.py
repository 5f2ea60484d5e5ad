"""Your model from a config: references, initial-parameter files (.npz, .safetensors, torch
state_dict) checked against the model, factories; every error names the key."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedagg import models
from fedagg.config import Named, build_algorithm, build_model, load_object, resolve_config
from fedagg.errors import ConfigError

CODE = """
import numpy as np

NOT_CALLABLE = 3

def arrays(n=3):
    return {"w": np.zeros((n, 2), np.float32), "b": np.zeros(2, np.float32)}

def train(params, data, task):
    raise RuntimeError("not called here")

def broken():
    raise ValueError("boom")

def sized(num_features=1, num_classes=1, hidden=2):
    return {"w1": np.zeros((num_features, hidden), np.float32),
            "w2": np.zeros((hidden, num_classes), np.float32)}

def torch_net(hidden=4):
    import torch
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, hidden), torch.nn.BatchNorm1d(hidden),
                               torch.nn.Linear(hidden, 2))
"""


@pytest.fixture
def code(tmp_path: Path) -> Path:
    mod = f"usercode_{abs(hash(tmp_path)) % 10**8}"
    (tmp_path / f"{mod}.py").write_text(CODE)
    return tmp_path / mod


def cfg(code: Path, **tables: Any) -> dict[str, Any]:
    return resolve_config({"code_path": str(code.parent), **tables})


def ref(code: Path, name: str) -> str:
    return f"{code.name}:{name}"


def write_safetensors(path: Path, arrays: dict[str, np.ndarray], header_extra: Any = None) -> None:
    header: dict[str, Any] = {"__metadata__": {"format": "np"}}
    blobs, off = [], 0
    for name, a in arrays.items():
        raw = np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<")).tobytes()
        kind = {np.float32: "F32", np.float64: "F64", np.int64: "I64"}[a.dtype.type]
        offsets = [off, off + len(raw)]
        header[name] = {"dtype": kind, "shape": list(a.shape), "data_offsets": offsets}
        blobs.append(raw)
        off += len(raw)
    if header_extra:
        header.update(header_extra)
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))


# -- load_object ------------------------------------------------------------------------------
def test_load_object_errors_name_the_key(code: Path) -> None:
    where = str(code.parent)
    assert callable(load_object(ref(code, "arrays"), key="model.factory", code_path=where))
    with pytest.raises(ConfigError, match=r"client.train = 'no_such_mod_xyz:f': cannot import"):
        load_object("no_such_mod_xyz:f", key="client.train", code_path=where)
    with pytest.raises(ConfigError, match=r"client.train = .* has no attribute 'nope'"):
        load_object(ref(code, "nope"), key="client.train", code_path=where)
    with pytest.raises(ConfigError, match=r"client.train must be 'module:name'"):
        load_object("just_a_name", key="client.train", code_path=where)
    with pytest.raises(ConfigError, match=r"client.train = .* is not callable"):
        Named(ref(code, "NOT_CALLABLE"), key="client.train", code_path=where).resolve()
    with pytest.raises(ConfigError, match=r"client.train = .* is not callable"):
        build_algorithm(cfg(code, client={"train": ref(code, "NOT_CALLABLE")}))


def test_named_functions_pickle_as_their_name(code: Path) -> None:
    import pickle

    fn = Named(ref(code, "arrays"), key="model.factory", code_path=str(code.parent))
    assert set(fn(n=2)) == {"w", "b"}  # resolved and cached
    back = pickle.loads(pickle.dumps(fn))
    assert back._fn is None and back.ref == fn.ref and back(n=5)["w"].shape == (5, 2)


# -- init files -------------------------------------------------------------------------------
def test_npz_and_safetensors_init_files_load_and_cast(code: Path, tmp_path: Path) -> None:
    w = np.arange(6, dtype=np.float64).reshape(3, 2)
    b = np.array([1.5, -2.0])
    np.savez(tmp_path / "init.npz", w=w, b=b)
    write_safetensors(tmp_path / "init.safetensors", {"w": w, "b": b, "steps": np.array([7])})
    st = models.read_params(tmp_path / "init.safetensors")
    assert set(st) == {"w", "b"}  # integer entries are skipped
    np.testing.assert_array_equal(st["w"], w)
    for name in ("init.npz", "init.safetensors"):
        c = cfg(code, model={"factory": ref(code, "arrays"), "init": str(tmp_path / name)},
                client={"train": ref(code, "train")})  # fmt: skip
        p = build_model(c, None).init(0)
        assert p["w"].dtype == np.float32 and p["b"].dtype == np.float32
        np.testing.assert_array_equal(p["w"], w.astype(np.float32))


def test_init_alone_with_your_train_is_a_model(code: Path, tmp_path: Path) -> None:
    np.savez(tmp_path / "init.npz", w=np.ones((4, 3), np.float32))
    c = cfg(code, model={"init": "init.npz"}, client={"train": ref(code, "train")})
    c["code_path"] = str(tmp_path)  # relative files are found in code_path
    c["client"]["train"] = "usercode_in_tmp:train"
    (tmp_path / "usercode_in_tmp.py").write_text(CODE)
    m = build_model(c, None)
    assert isinstance(m, models.ArrayModel) and m.init(0)["w"].shape == (4, 3)
    assert np.isnan(m.evaluate(m.init(0), np.zeros((2, 4)), np.zeros(2, np.int64))[0])
    with pytest.raises(ConfigError, match=r"needs your train function"):
        build_model(cfg(code, model={"init": str(tmp_path / "init.npz")}), None)


def test_builtin_model_from_an_init_file(code: Path, tmp_path: Path) -> None:
    from fedagg.config import build_data

    c = resolve_config({"data": {"name": "digits", "num_clients": 2, "partition": "iid"}})
    data = build_data(c, 0)
    good = {"W": np.full((64, 10), 0.5, np.float32), "b": np.zeros(10, np.float32)}
    np.savez(tmp_path / "good.npz", **good)
    c["model"]["init"] = str(tmp_path / "good.npz")
    m = build_model(c, data)
    np.testing.assert_array_equal(m.init(0)["W"], good["W"])
    assert isinstance(m, models.StackedModel)  # still trains many clients at once
    np.savez(tmp_path / "bad.npz", W=np.zeros((10, 64), np.float32), b=np.zeros(10, np.float32))
    c["model"]["init"] = str(tmp_path / "bad.npz")
    with pytest.raises(
        ConfigError,
        match=r"model.init: parameter 'W' has shape \(10, 64\) in the file, the model's is \(64",
    ):
        build_model(c, data)
    np.savez(tmp_path / "names.npz", W=good["W"], bias=good["b"])
    c["model"]["init"] = str(tmp_path / "names.npz")
    with pytest.raises(ConfigError, match=r"missing \['b'\], unexpected \['bias'\]"):
        build_model(c, data)


def test_bad_init_files_are_refused_with_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model.init = .*no such file"):
        models.read_params(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ConfigError, match=r"not a readable .npz"):
        models.read_params(tmp_path / "junk.npz")
    (tmp_path / "short.safetensors").write_bytes(b"\x01")
    with pytest.raises(ConfigError, match=r"not a valid safetensors file: too short"):
        models.read_params(tmp_path / "short.safetensors")
    (tmp_path / "huge.safetensors").write_bytes(struct.pack("<Q", 10**9) + b"{}")
    with pytest.raises(ConfigError, match=r"header length"):
        models.read_params(tmp_path / "huge.safetensors")
    write_safetensors(tmp_path / "off.safetensors", {"w": np.zeros(3, np.float32)},
                      {"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}})  # fmt: skip
    with pytest.raises(ConfigError, match=r"entry 'x' has offsets"):
        models.read_params(tmp_path / "off.safetensors")
    (tmp_path / "junk.pt").write_bytes(b"garbage")
    pytest.importorskip("torch")
    with pytest.raises(ConfigError, match=r"weights_only=True"):
        models.read_params(tmp_path / "junk.pt")


def test_torch_state_dict_init_and_factory(code: Path, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(0.25)
    torch.save(net.state_dict(), tmp_path / "init.pt")
    c = cfg(code, model={"factory": ref(code, "torch_net"), "args": {"hidden": 4},
                         "init": str(tmp_path / "init.pt")})  # fmt: skip
    m = build_model(c, None)
    p = m.init(0)
    assert set(p) == {"0.weight", "0.bias", "1.weight", "1.bias", "2.weight", "2.bias"}
    assert all(np.all(v == 0.25) for v in p.values())
    loss, grads = m.loss_and_grad(p, np.ones((4, 3), np.float32), np.array([0, 1, 0, 1]))
    assert np.isfinite(loss) and set(grads) == set(p)
    c["model"]["args"] = {"hidden": 5}
    with pytest.raises(
        ConfigError,
        match=r"parameter '0.weight' has shape \(4, 3\) in the file, the model's is \(5, 3\)",
    ):
        build_model(c, None)
    # a pickled object in a torch file is refused (weights_only)
    torch.save({"w": object()}, tmp_path / "evil.pt")
    with pytest.raises(ConfigError, match=r"weights_only=True"):
        models.read_params(tmp_path / "evil.pt")


def test_factory_errors(code: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"model.factory = .* failed with model.args = \{\}: ValueError: boom"
    ):
        build_model(cfg(code, model={"factory": ref(code, "broken")}), None)
    with pytest.raises(ConfigError, match=r"model.factory = .*:NOT_CALLABLE' is not callable"):
        build_model(cfg(code, model={"factory": ref(code, "NOT_CALLABLE")}), None)
    with pytest.raises(ConfigError, match=r"failed with model.args = \{'zz': 1\}: TypeError"):
        build_model(cfg(code, model={"factory": ref(code, "arrays"), "args": {"zz": 1}}), None)
    with pytest.raises(ConfigError, match=r"returned a dict of arrays, which has no built-in"):
        build_model(cfg(code, model={"factory": ref(code, "arrays")}), None)
    with pytest.raises(ConfigError, match=r"data.name = 'none': set model.factory or model.init"):
        build_model(cfg(code), None)


def test_from_python() -> None:
    m = models.from_arrays({"w": np.zeros(3)})
    assert m.init(1)["w"].dtype == np.float64
    with pytest.raises(ConfigError, match=r"no built-in training"):
        m.loss_and_grad(m.init(0), np.zeros((1, 3)), np.zeros(1))
    with pytest.raises(ConfigError, match=r"must be a float array"):
        models.from_arrays({"w": np.zeros(3, np.int64)})
    lr = models.with_init(models.LogReg(2, 2), {"W": np.ones((2, 2)), "b": np.zeros(2)})
    assert lr.init(0)["W"].dtype == np.float32 and lr.name == "logreg"


def test_a_factory_that_names_them_gets_the_datasets_sizes(code: Path) -> None:
    """``num_features`` and ``num_classes`` come from the dataset when the factory has such
    parameters; ``[model] args`` win; a factory without them is called with its args only."""
    from types import SimpleNamespace

    data = SimpleNamespace(num_features=64, num_classes=10)
    train = {"train": ref(code, "train")}
    m = build_model(cfg(code, model={"factory": ref(code, "sized")}, client=train), data)
    assert {k: v.shape for k, v in m.init(0).items()} == {"w1": (64, 2), "w2": (2, 10)}
    over = {"factory": ref(code, "sized"), "args": {"num_classes": 3, "hidden": 5}}
    m = build_model(cfg(code, model=over, client=train), data)
    assert {k: v.shape for k, v in m.init(0).items()} == {"w1": (64, 5), "w2": (5, 3)}
    m = build_model(cfg(code, model={"factory": ref(code, "arrays")}, client=train), data)
    assert m.init(0)["w"].shape == (3, 2)  # arrays(n=3) has no such parameters
    m = build_model(cfg(code, model={"factory": ref(code, "sized")}, client=train), None)
    assert m.init(0)["w1"].shape == (1, 2)  # no dataset (data.name = "none"): its defaults
