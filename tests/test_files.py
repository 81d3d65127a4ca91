"""spear.files: model archives read without running code from them; any batch size.

Every hostile file below carries a payload that creates a marker file when it runs. Each
test checks that spear refuses the file (naming the member) and that the marker is absent;
where it is cheap, a control checks that torch's own loader does run the payload, so the
file really is hostile.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pathlib
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import spear
from spear.errors import InputError
from spear.files import load_model, load_update, read_program

_X = torch.linspace(0, 1, 4 * 784, dtype=torch.float64).reshape(4, 1, 28, 28)


class _Touch:
    """Unpickling this creates the file ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (pathlib.Path.touch, (self.marker,))


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10)).double()


class _Cnn(nn.Module):
    """A convolution, then ``view(size(0), -1)``: a fixed-batch export pins the batch."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(2 * 26 * 26, 16)
        self.out = nn.Linear(16, 10)
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        h = h.view(h.size(0), -1)
        return self.out(torch.relu(self.fc(h)))


def _export(model: nn.Module, path: Path, *, dynamic: bool = False) -> Path:
    shapes = ({0: torch.export.Dim("batch")},) if dynamic else None
    torch.export.save(torch.export.export(model, (_X,), dynamic_shapes=shapes), str(path))
    return path


def _pickled(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _rewrite(
    source: Path,
    target: Path,
    members: dict[str, bytes] | None = None,
    program: Callable[[dict[str, Any]], None] | None = None,
) -> Path:
    """Copy an archive, replacing or adding members (relative to its root folder)."""
    members = dict(members or {})
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        root = old.namelist()[0].split("/", 1)[0]
        for name in old.namelist():
            relative = name.split("/", 1)[1]
            data = members.pop(relative) if relative in members else old.read(name)
            if relative == "models/model.json" and program is not None:
                doc = json.loads(data)
                program(doc)
                data = json.dumps(doc).encode()
            new.writestr(name, data)
        for relative, data in members.items():
            new.writestr(f"{root}/{relative}", data)
    return target


def _refused(path: Path, member: str, marker: Path) -> str:
    with pytest.raises(InputError) as info:
        load_model(path)
    assert member in str(info.value)
    assert not marker.exists()
    return str(info.value)


def _torch_runs(marker: Path, load: Callable[[], object]) -> None:
    """Control: torch's loader runs the payload (then remove the marker)."""
    with contextlib.suppress(Exception):
        load()
    assert marker.exists()
    marker.unlink()


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export(_mlp(), tmp_path_factory.mktemp("plain") / "model.pt2")


@pytest.fixture(scope="module")
def dynamic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export(_mlp(), tmp_path_factory.mktemp("dynamic") / "model.pt2", dynamic=True)


# --- plain archives load without any unpickler ---------------------------------------------


def test_plain_export_loads_without_any_unpickler(
    plain: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("an unpickler was called")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    monkeypatch.setattr(torch._C, "_pickle_load_obj", forbidden)
    module = load_model(plain)
    model = _mlp()
    assert torch.equal(module(_X), model(_X))
    assert [n for n, _ in module.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert all(p.requires_grad for p in module.parameters())
    program = read_program(plain)
    assert program.example_inputs is None  # never read


def test_example_inputs_with_attributes_are_accepted(tmp_path: Path) -> None:
    example = _X.clone()
    example.tag = "batch 0"  # type: ignore[attr-defined]
    example.seen = {0, 1}  # type: ignore[attr-defined]
    path = tmp_path / "model.pt2"
    torch.export.save(torch.export.export(_mlp(), (example,)), str(path))
    assert torch.equal(load_model(path)(_X), _mlp()(_X))


def test_a_folder_or_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"is a directory, expected a \.pt2 file"):
        load_model(tmp_path)
    with pytest.raises(InputError, match=r"is a directory, expected a \.safetensors file"):
        load_update(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope.pt2")


# --- hostile model files -------------------------------------------------------------------


def test_pickled_sample_inputs_are_refused_without_running(plain: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    hostile = _rewrite(
        plain,
        tmp_path / "m.pt2",
        {"data/sample_inputs/model.pt": _pickled((_Touch(marker),))},
    )
    message = _refused(hostile, "model/data/sample_inputs/model.pt", marker)
    assert "getattr" in message  # the first global it would have called
    _torch_runs(marker, lambda: torch.export.load(str(hostile)))


def test_pickled_weights_are_refused_without_running(plain: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    with zipfile.ZipFile(plain) as archive:
        config = json.loads(archive.read("model/data/weights/model_weights_config.json"))
    config["config"]["1.weight"]["use_pickle"] = True
    hostile = _rewrite(
        plain,
        tmp_path / "m.pt2",
        {
            "data/weights/model_weights_config.json": json.dumps(config).encode(),
            "data/weights/weight_0": _pickled(_Touch(marker)),
        },
    )
    message = _refused(hostile, "model/data/weights/weight_0", marker)
    assert "'1.weight' stored as a pickle" in message
    _torch_runs(marker, lambda: torch.export.load(str(hostile)))


def test_torch_save_file_renamed_pt2_is_refused_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    hostile = tmp_path / "model.pt2"
    torch.save({"model": _Touch(marker)}, hostile)
    _refused(hostile, "model/data.pkl", marker)
    _torch_runs(marker, lambda: torch.load(hostile, weights_only=False))


def test_plain_pickle_renamed_pt2_is_refused_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    hostile = tmp_path / "model.pt2"
    hostile.write_bytes(pickle.dumps(_Touch(marker)))
    with pytest.raises(InputError, match="is a pickle file"):
        load_model(hostile)
    assert not marker.exists()
    _torch_runs(marker, lambda: pickle.loads(hostile.read_bytes()))


def test_code_in_a_graph_name_is_refused_without_running(plain: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    evil = f"input=__import__('pathlib').Path({str(marker)!r}).touch()"

    def rename(value: Any) -> Any:  # the input's name, not the operators' argument names
        if isinstance(value, list):
            return [evil if v == "input" else rename(v) for v in value]
        if isinstance(value, dict):
            keep = "arg" in value
            return {
                (evil if k == "input" else k): (evil if v == "input" and not keep else rename(v))
                for k, v in value.items()
            }
        return value

    def edit(doc: dict[str, Any]) -> None:
        doc.update(rename(doc))

    hostile = _rewrite(plain, tmp_path / "m.pt2", program=edit)
    message = _refused(hostile, "model/models/model.json", marker)
    assert "not an identifier" in message
    _torch_runs(marker, lambda: torch.export.load(str(hostile)))


def test_code_in_a_symbolic_expression_is_refused_without_running(
    dynamic: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    evil = f"Symbol('s77', positive=__import__('pathlib').Path({str(marker)!r}).touch() is None)"

    def replace(value: Any) -> None:
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in list(items):
            if key == "expr_str":
                value[key] = evil
            elif isinstance(item, dict | list):
                replace(item)

    hostile = _rewrite(dynamic, tmp_path / "m.pt2", program=replace)
    message = _refused(hostile, "model/models/model.json", marker)
    assert "'__import__'" in message
    _torch_runs(marker, lambda: torch.export.load(str(hostile)))


def test_guard_strings_are_never_run(plain: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    guard = f"__import__('pathlib').Path({str(marker)!r}).touch() is None"

    def edit(doc: dict[str, Any]) -> None:
        doc["guards_code"] = [guard]

    hostile = _rewrite(plain, tmp_path / "m.pt2", program=edit)
    module = load_model(hostile)  # guards only restate shapes: dropped, not refused
    assert torch.equal(module(_X), _mlp()(_X))
    assert not marker.exists()
    _torch_runs(marker, lambda: torch.export.load(str(hostile)).module()(_X))


def test_a_call_that_is_not_an_aten_operator_is_refused(plain: Path, tmp_path: Path) -> None:
    def edit(doc: dict[str, Any]) -> None:
        for node in doc["graph_module"]["graph"]["nodes"]:
            if node["target"] == "torch.ops.aten.relu.default":
                node["target"] = "torch.os.system"

    hostile = _rewrite(plain, tmp_path / "m.pt2", program=edit)
    with pytest.raises(InputError, match=r"calling 'torch\.os\.system', which is not an ATen"):
        load_model(hostile)


def test_an_import_in_an_input_spec_is_refused(plain: Path, tmp_path: Path) -> None:
    enum = {"__enum__": True, "fqn": "antigravity:Anything", "name": "X"}

    def edit(doc: dict[str, Any]) -> None:
        signature = doc["graph_module"]["module_call_graph"][0]["signature"]
        protocol, spec = json.loads(signature["in_spec"])
        spec["children_spec"][1]["context"] = json.dumps([enum])
        signature["in_spec"] = json.dumps([protocol, spec])

    hostile = _rewrite(plain, tmp_path / "m.pt2", program=edit)
    with pytest.raises(InputError, match="not an identifier"):
        load_model(hostile)


@pytest.mark.parametrize(
    ("member", "reason"),
    [
        ("data/aotinductor/model/model.so", "compiled native code"),
        ("data/constants/opaque_obj_0", "a Python object, stored as a pickle"),
        ("data/constants/custom_obj_0", "a TorchScript object"),
        ("data/weights/model.pt", "tensors stored as a pickle"),
    ],
)
def test_members_that_torch_would_unpickle_or_run_are_refused(
    plain: Path, tmp_path: Path, member: str, reason: str
) -> None:
    hostile = _rewrite(plain, tmp_path / "m.pt2", {member: b"\x80\x02K\x01."})
    with pytest.raises(InputError, match=reason) as info:
        load_model(hostile)
    assert f"model/{member}" in str(info.value)


def test_trust_uses_torch_export_load(plain: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    hostile = _rewrite(
        plain,
        tmp_path / "m.pt2",
        {"data/sample_inputs/model.pt": _pickled((_Touch(marker),))},
    )
    with contextlib.suppress(Exception):
        load_model(hostile, trust=True)
    assert marker.exists()  # trusting a file means running it: the default refuses


# --- hostile update files -----------------------------------------------------------------


def test_pickled_update_is_refused_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    hostile = tmp_path / "update.safetensors"
    torch.save({"1.weight": _Touch(marker)}, hostile)
    with pytest.raises(InputError, match=r"is a pickle \(torch\.save\) file"):
        load_update(hostile)
    assert not marker.exists()
    # (torch.load reads a path ending in .safetensors with safetensors: pass the bytes)
    _torch_runs(marker, lambda: torch.load(io.BytesIO(hostile.read_bytes()), weights_only=False))


# --- any batch size ------------------------------------------------------------------------


@pytest.mark.parametrize("make", [_mlp, _Cnn], ids=["mlp", "cnn-view"])
@pytest.mark.parametrize("dynamic_batch", [False, True], ids=["static", "dynamic"])
def test_every_batch_size_runs_the_same_computation(
    tmp_path: Path, make: Callable[[], nn.Module], dynamic_batch: bool
) -> None:
    model = make()
    path = _export(model, tmp_path / "m.pt2", dynamic=dynamic_batch)
    module = load_model(path)
    assert torch.equal(module(_X), model(_X))  # the exported batch: bit for bit
    for b in (1, 3, 8):
        x = torch.rand(
            b, 1, 28, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(b)
        )
        torch.testing.assert_close(module(x), model(x), rtol=1e-12, atol=1e-12)
    exported = torch.export.export(model, (_X,)).graph
    ops = [n.target for n in exported.nodes if n.op == "call_function"]
    aten_size = torch.ops.aten.sym_size.int
    assert [
        n.target for n in module.graph.nodes if n.op == "call_function" and n.target != aten_size
    ] == [op for op in ops if op != aten_size]


def test_a_graph_that_mixes_examples_is_a_clear_error(tmp_path: Path) -> None:
    class Pairs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2 * 784, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.fc(x.reshape(2, -1)))  # two examples per row

    path = _export(Pairs().double(), tmp_path / "m.pt2")
    with pytest.raises(InputError, match=r"exported for batch size 4 only.*Dim\('batch'\)"):
        load_model(path)


def test_a_partial_reconstruction_can_be_certified(plain: Path) -> None:
    module = load_model(plain)
    x = torch.rand(8, 1, 28, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.arange(8) % 10
    model = _mlp()
    loss = nn.functional.cross_entropy(model(x), y, reduction="sum")
    update = dict(
        zip(
            [n for n, _ in model.named_parameters()],
            torch.autograd.grad(loss, list(model.parameters())),
            strict=True,
        )
    )
    full = spear.certify(module, update, x, y)
    partial = spear.certify(module, update, x[:3], y[:3])  # 3 of 8 examples
    assert full < 1e-12 and 0.01 < partial < float("inf")


# --- operators, numbers and sizes that would corrupt memory, hang or exhaust it ----------------


class _OutOfBounds(nn.Module):
    """A sparse tensor whose index lies outside its size, densified: a heap write."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(784, 10).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        index = torch.full((1, 1), 10**8, dtype=torch.long)
        value = torch.full((1,), 1.0, dtype=torch.float64)
        sparse = torch.ops.aten._sparse_coo_tensor_with_dims_and_tensors.default(
            1, 0, [10], index, value, dtype=torch.float64, layout=torch.sparse_coo
        )
        return self.fc(x.flatten(1)) + torch.ops.aten._to_dense.default(sparse)


def test_an_aten_operator_outside_the_feed_forward_layers_is_refused(tmp_path: Path) -> None:
    # the graph is never run: exporting traces it symbolically
    path = _export(_OutOfBounds(), tmp_path / "model.pt2")
    with pytest.raises(InputError, match="not an ATen operator of the feed-forward layers"):
        load_model(path)


def test_process_wide_state_operators_are_refused(plain: Path, tmp_path: Path) -> None:
    def edit(doc: dict[str, Any]) -> None:
        node = doc["graph_module"]["graph"]["nodes"][0]
        node["target"] = "torch.ops.aten.manual_seed.default"

    path = _rewrite(plain, tmp_path / "model.pt2", program=edit)
    with pytest.raises(InputError, match="manual_seed"):
        load_model(path)


@pytest.mark.parametrize(
    "evil",
    [
        " + 0*9**9**9**9",  # exact integer power: sympify would compute it for ever
        " + 0*Integer(1e999999999)",  # a float literal the tokenizer must not split
        " + 0*" + "9" * 40,  # a number far beyond any size
    ],
)
def test_symbolic_expressions_that_would_hang_are_refused(
    dynamic: Path, tmp_path: Path, evil: str
) -> None:
    symbol = "Symbol('s31', positive=True, integer=True)"

    def edit(doc: dict[str, Any]) -> None:
        sizes = doc["graph_module"]["graph"]["tensor_values"]["input"]["sizes"]
        sizes[0]["as_expr"]["expr_str"] = symbol + evil

    path = _rewrite(dynamic, tmp_path / "model.pt2", program=edit)
    with pytest.raises(InputError):
        load_model(path)


def test_a_zip_bomb_is_refused_before_decompressing(plain: Path, tmp_path: Path) -> None:
    path = _rewrite(plain, tmp_path / "model.pt2")
    with zipfile.ZipFile(path, "a", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        root = archive.namelist()[0].split("/", 1)[0]
        archive.writestr(f"{root}/extra/bomb", b"\0" * (64 << 20))  # 64 MiB -> ~64 KB
    assert path.stat().st_size < 1 << 20
    with pytest.raises(InputError, match="declare"):
        load_model(path)


def test_an_empty_weight_member_cannot_declare_a_size(plain: Path, tmp_path: Path) -> None:
    with zipfile.ZipFile(plain) as archive:
        root = archive.namelist()[0].split("/", 1)[0]
        config = json.loads(archive.read(f"{root}/data/weights/model_weights_config.json"))
        name, entry = next(iter(config["config"].items()))
        member = entry["path_name"]
    entry["tensor_meta"]["sizes"] = [{"as_int": 1 << 30}]
    path = _rewrite(
        plain,
        tmp_path / "model.pt2",
        {
            "data/weights/model_weights_config.json": json.dumps(config).encode(),
            f"data/weights/{member}": b"",
        },
    )
    with pytest.raises(InputError):
        load_model(path)
    assert name  # the member named in the config was the one emptied


class _FlowerCnn(nn.Module):
    """The CNN of Flower's PyTorch tutorial (pooling, flatten, three linear layers)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        x = x.view(-1, 16 * 5 * 5)
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


@pytest.mark.parametrize("dynamic", [False, True])
def test_common_architectures_load_and_compute_the_same(tmp_path: Path, dynamic: bool) -> None:
    x = torch.rand(4, 3, 32, 32)
    bn = nn.Sequential(
        nn.Flatten(),
        nn.Linear(3 * 32 * 32, 64),
        nn.BatchNorm1d(64),
        nn.ReLU(),
        nn.Dropout(0.1),
        nn.Linear(64, 10),
    ).eval()
    for model in (_FlowerCnn().eval(), bn):
        shapes = ({0: torch.export.Dim("batch")},) if dynamic else None
        path = tmp_path / "model.pt2"
        torch.export.save(torch.export.export(model, (x,), dynamic_shapes=shapes), str(path))
        loaded = load_model(path)
        for batch in (x, x[:3]):
            assert torch.allclose(loaded(batch), model(batch))


# --- corrupt archives and misread files ------------------------------------------------------


def _weights_config(plain: Path) -> tuple[dict[str, Any], str, str]:
    """The weights config of ``plain``, the name of its first bias and its root folder."""
    with zipfile.ZipFile(plain) as archive:
        root = archive.namelist()[0].split("/", 1)[0]
        config = json.loads(archive.read(f"{root}/data/weights/model_weights_config.json"))
    bias = next(name for name in config["config"] if name.endswith("bias"))
    return config, bias, root


def _with_config(plain: Path, target: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    config, _, _ = _weights_config(plain)
    edit(config["config"])
    member = {"data/weights/model_weights_config.json": json.dumps(config).encode()}
    return _rewrite(plain, target, member)


def _int64_code() -> int:
    from torch._export.serde.serialize import _SERIALIZE_TO_TORCH_DTYPE

    return next(code for code, dtype in _SERIALIZE_TO_TORCH_DTYPE.items() if dtype == torch.int64)


def _bad_crc(plain: Path, target: Path) -> Path:
    data = bytearray(plain.read_bytes())
    with zipfile.ZipFile(plain) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("weights/weight_0"))
    local = info.header_offset  # the local header's own name and extra-field lengths
    names, extra = (int.from_bytes(data[local + i : local + i + 2], "little") for i in (26, 28))
    data[local + 30 + names + extra + 5] ^= 0xFF
    target.write_bytes(bytes(data))
    return target


_CORRUPT: dict[str, tuple[Callable[[Path, Path], Path], str]] = {
    "bad CRC": (_bad_crc, r"weights/weight_0' cannot be read \(Bad CRC-32"),
    "deep JSON": (
        lambda p, t: _rewrite(p, t, {"models/model.json": b"[" * 200_000 + b"]" * 200_000}),
        r"models/model.json' is JSON nested too deeply",
    ),
    "long number": (
        lambda p, t: _rewrite(p, t, {"models/model.json": b"1" * 5000}),
        r"models/model.json' is JSON with a number too long",
    ),
    "int64 weight": (
        lambda p, t: _with_config(
            p, t, lambda c: next(iter(c.values()))["tensor_meta"].update(dtype=_int64_code())
        ),
        r"is declared torch.int64; expected a floating-point parameter",
    ),
    "size beyond 64 bits": (
        lambda p, t: _with_config(
            p, t, lambda c: c["1.bias"]["tensor_meta"].update(sizes=[{"as_int": 10**40}])
        ),
        r"'1.bias' in member .* \(sizes has an integer beyond 64 bits\)",
    ),
    "truncated": (
        lambda p, t: t.write_bytes(p.read_bytes()[:-30]) and t,
        r"is a truncated or corrupt zip file",
    ),
}


@pytest.mark.parametrize("case", sorted(_CORRUPT))
def test_a_corrupt_archive_is_one_error_naming_the_member_and_why(
    plain: Path, tmp_path: Path, case: str
) -> None:
    make, message = _CORRUPT[case]
    path = make(plain, tmp_path / "model.pt2")
    with pytest.raises(InputError, match=message) as info:
        load_model(path)
    assert "Exception raised from" not in str(info.value)  # no C++ backtrace


def test_a_program_exported_with_batch_norm_in_training_mode_says_eval_mode(
    tmp_path: Path,
) -> None:
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(784, 16), nn.ReLU(), nn.BatchNorm1d(16), nn.Linear(16, 10)
    ).double()
    path = _export(model.train(), tmp_path / "model.pt2")
    with pytest.raises(spear.NotAttackableError, match="BatchNorm in training mode") as info:
        load_model(path)
    assert "model.eval()" in str(info.value) and "could run code" not in str(info.value)


def test_update_files_that_are_something_else_are_named(plain: Path, tmp_path: Path) -> None:
    header_80 = tmp_path / "hdr.safetensors"  # a header length whose first byte is 0x80
    header_80.write_bytes((90_000_000).to_bytes(8, "little") + b"{" + b" " * 100)
    with pytest.raises(InputError, match="is not a safetensors file"):
        load_update(header_80)
    with pytest.raises(InputError, match=r"is a torch.export archive \(a model file"):
        load_update(plain)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_is_not_a_regular_file(tmp_path: Path) -> None:
    fifo = tmp_path / "update.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(InputError, match="is not a regular file"):
        load_update(fifo)
    with pytest.raises(InputError, match="is not a regular file"):
        load_model(fifo)
