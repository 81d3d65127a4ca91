"""Load model and update files without running code from them.

A model file is a ``torch.export`` archive (``.pt2``): a zip file whose members are

* ``models/model.json``, the program: its graph, signature and symbolic shapes as JSON;
* ``data/weights/weight_<i>`` and ``data/constants/tensor_<i>``, the raw bytes of plain
  tensors, described by ``data/weights/model_weights_config.json`` and
  ``data/constants/model_constants_config.json`` (dtype, sizes, strides);
* ``data/sample_inputs/model.pt``, the example inputs, as a ``torch.save`` pickle;
* small text members (``archive_format``, ``archive_version``, ``byteorder``, ...).

``torch.export.load`` unpickles the example inputs (retrying with ``weights_only=False``),
weights and constants saved as pickles (tensor subclasses), and custom or opaque objects;
it runs compiled AOTInductor code when the archive has some; it evaluates the program's
symbolic-shape strings with ``sympy.sympify`` (``eval``), imports modules named in its
input and output specs, and ``ExportedProgram.module()`` executes the program's guard
strings and compiles Python source made from the names in the graph. Any of these runs
code chosen by whoever made the file.

:func:`load_model` reads the archive itself instead. It refuses every member that is not
part of a plain archive (pickles, compiled code), reads weights and constants from their
raw bytes (no unpickler at all), never reads the example inputs (it only scans their pickle
opcodes, without running them, and refuses them when they name anything but tensors), and
checks the program's JSON before torch sees it: every operator must be one of the ATen
operators of feed-forward layers (an allow-list: ATen also has operators that touch files,
change process-wide state or skip bounds checks) or symbolic-size arithmetic, every tensor
strided, every name an identifier, every symbolic expression plain arithmetic over size
symbols (no powers, no numbers beyond 20 digits), every input and output spec a tuple,
list or dict of names. What a file can make the loader allocate is bounded (declared
member sizes, empty members, the example shape).
Guard strings and debugging metadata are dropped (they do not change what the program
computes). ``trust=True`` uses ``torch.export.load`` instead, for files from a trusted
source only.

:func:`load_update` reads a safetensors file (a JSON header and raw bytes; never
unpickled).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import logging
import math
import os
import pickletools
import re
import sys
import warnings
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
from safetensors.torch import load_file
from torch import fx

from spear.errors import InputError, NotAttackableError

__all__ = ["check_output_folder", "free_batch", "load_model", "load_update", "read_program"]

#: The name ``torch.export.save`` gives the one program of an archive.
_MODEL = "model"

#: Members of a plain archive, relative to its root folder.
_PLAIN_MEMBERS = frozenset(
    {
        "archive_format",
        "archive_version",
        "byteorder",
        ".data/version",
        ".data/serialization_id",
        f"models/{_MODEL}.json",
        f"data/weights/{_MODEL}_weights_config.json",
        f"data/constants/{_MODEL}_constants_config.json",
    }
)
_SAMPLE_INPUTS = f"data/sample_inputs/{_MODEL}.pt"
_WEIGHTS_CONFIG = f"data/weights/{_MODEL}_weights_config.json"
_CONSTANTS_CONFIG = f"data/constants/{_MODEL}_constants_config.json"
_RAW_MEMBER = re.compile(r"data/(weights/weight|constants/tensor)_\d+")

#: Members that ``torch.export.load`` would unpickle or run, and why they are refused.
_REFUSED_MEMBERS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"data/aotinductor/.*"), "compiled native code (AOTInductor)"),
    (re.compile(r"data/constants/custom_obj_\d+"), "a TorchScript object, stored as a pickle"),
    (re.compile(r"data/constants/opaque_obj_\d+"), "a Python object, stored as a pickle"),
    (re.compile(r"data/(weights|constants)/[^/]+\.pt"), "tensors stored as a pickle"),
    (re.compile(r"serialized_.*\.pt"), "tensors stored as a pickle (older archive format)"),
    (re.compile(r".*\.pkl"), "a pickle"),
)

#: Non-ATen call targets a program may use: symbolic-size arithmetic.
_SYM_TARGETS = frozenset(
    {
        *(f"_operator.{op}" for op in ("eq", "ne", "le", "ge", "lt", "gt", "neg", "pos")),
        *(f"_operator.{op}" for op in ("mul", "add", "sub", "floordiv", "mod")),
        *(f"_operator.{op}" for op in ("truediv", "and_", "or_")),
        "math.trunc",
        *(f"torch.sym_{op}" for op in ("not", "int", "float", "ite", "max", "min", "sqrt")),
    }
)
_ATEN_TARGET = re.compile(r"torch\.ops\.aten\.([A-Za-z0-9_]+)\.([A-Za-z0-9_]+)")
#: ATen operators a program may call. Not "any ATen operator": ATen has operators that
#: read or write files (``from_file``), change process-wide state (``set_grad_enabled``,
#: ``manual_seed``) or skip bounds checks (``_sparse_coo_tensor_with_dims_and_tensors`` then
#: ``_to_dense`` writes out of bounds). These are the layers of the feed-forward networks spear
#: attacks, in torch.export's (training) IR.
_ALLOWED_ATEN = frozenset(
    {
        *("linear.default", "addmm.default", "mm.default", "matmul.default", "t.default"),
        *("conv1d.default", "conv2d.default", "conv3d.default", "convolution.default"),
        *("relu.default", "relu_.default", "leaky_relu.default", "hardtanh.default"),
        *("sigmoid.default", "tanh.default", "gelu.default", "silu.default"),
        *("softmax.int", "log_softmax.int", "_softmax.default", "_log_softmax.default"),
        *("flatten.using_ints", "view.default", "reshape.default", "_unsafe_view.default"),
        *("clone.default", "contiguous.default", "expand.default", "permute.default"),
        *("transpose.int", "squeeze.dim", "unsqueeze.default", "cat.default"),
        *("sym_size.int", "sym_numel.default", "dropout.default", "alias.default"),
        *("batch_norm.default", "_native_batch_norm_legit_no_training.default"),
        *("native_batch_norm.default", "_native_batch_norm_legit_functional.default"),
        *("layer_norm.default", "max_pool2d.default", "max_pool2d_with_indices.default"),
        *("avg_pool2d.default", "adaptive_avg_pool2d.default", "mean.dim", "sum.dim_IntList"),
        *("add.Tensor", "sub.Tensor", "mul.Tensor", "div.Tensor", "add.Scalar", "mul.Scalar"),
        *("getitem",),
    }
)
#: torch.strided in the program's ``layout`` fields (schema.Layout).
_STRIDED = 7
#: Bounds on integer literals and on what a file may make the loader allocate.
_MAX_LITERAL_DIGITS = 20
_MAX_INFLATION = 8  # declared uncompressed bytes per byte of file (torch writes members stored)
_MAX_EXAMPLE_NUMEL = 1 << 28

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_FQN = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")
_SYMBOL = re.compile(r"[a-z]+[0-9]+")

#: Tokens of a symbolic expression: numbers, names, quoted symbol names, operators.
_EXPR_TOKEN = re.compile(
    r"\s+|[0-9]+(\.[0-9]+)?(?![A-Za-z0-9_.])|'[a-z]+[0-9]+'|[A-Za-z_][A-Za-z0-9_]*|//|[<>=!]="
    r"|[-+*/%(),<>=]"
)
#: Names a symbolic expression may use besides size symbols (``s0``, ``u1``): sympy
#: constructors and the functions torch's deserializer puts in scope.
_EXPR_NAMES = frozenset(
    {
        *("Symbol", "Integer", "Rational", "True", "False", "oo"),
        *("positive", "integer", "nonnegative", "real", "finite"),
        *("Eq", "Ne", "Lt", "Le", "Gt", "Ge", "And", "Or", "Not"),
        *("Max", "Min", "Abs", "Add", "Mul"),
        *("FloorDiv", "ModularIndexing", "Where", "PythonMod", "Mod", "CleanDiv"),
        *("CeilToInt", "FloorToInt", "CeilDiv"),
        *("FloatTrueDiv", "IntTrueDiv", "IsNonOverlappingAndDenseIndicator"),
        *("TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat", "Identity"),
    }
)

#: Container types an input or output spec may use (``None`` is a leaf).
_TREESPEC_TYPES = frozenset({None, "builtins.tuple", "builtins.list", "builtins.dict"})

#: Globals a ``torch.save`` of tensors names (checked without unpickling): tensor and
#: storage rebuilders, and the containers of a tensor's attributes.
_TENSOR_PICKLE_GLOBALS = frozenset(
    {
        "torch._utils _rebuild_tensor_v2",
        "torch._utils _rebuild_parameter",
        "torch._utils _rebuild_parameter_with_state",
        "torch._tensor _rebuild_from_type_v2",
        "torch Tensor",
        "torch._tensor Tensor",
        "torch.nn.parameter Parameter",
        "collections OrderedDict",
        "__builtin__ set",
        "__builtin__ frozenset",
        "builtins set",
        "builtins frozenset",
    }
)
_STORAGE_GLOBAL = re.compile(r"torch [A-Za-z0-9]*Storage")
_PICKLE_CALLS = frozenset({"STACK_GLOBAL", "INST", "OBJ", "EXT1", "EXT2", "EXT4"})

_EXPORT_RECIPE = (
    "torch.export.save(torch.export.export(model, (example_input,)), 'model.pt2') from a "
    "plain nn.Module whose weights are plain tensors"
)


def _refusal(path: Path, member: str, reason: str) -> InputError:
    return InputError(
        f"{path}: member {member!r} is {reason}; refused because loading it could run code "
        f"from the file. Expected a plain torch.export archive: make one with {_EXPORT_RECIPE}, "
        "or load the file with trust=True (spear attack --trust-model) if you trust whoever "
        "made it."
    )


def _check_file(path: Path, what: str, suffix: str) -> None:
    """A missing file, a folder or a special file (a device, a FIFO, a socket):
    ``FileNotFoundError`` or ``InputError`` naming it."""
    if path.is_dir():
        raise InputError(
            f"{what} {path} is a directory, expected a {suffix} file; pass the file itself."
        )
    if path.exists() and not path.is_file():
        raise InputError(
            f"{what} {path} is not a regular file (a device, a FIFO or a socket), expected a "
            f"{suffix} file; pass a file saved on disk."
        )
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} does not exist.")


def check_output_folder(path: Path) -> None:
    """Make sure the output folder can be written before any work, without creating it
    (a run stopped by a later error leaves nothing behind).

    Raises
    ------
    InputError
        When ``path`` exists as something else than a folder, or cannot be created: the
        nearest existing folder above it is a file, or not writable.
    """
    if path.exists() and not path.is_dir():
        raise InputError(
            f"output folder {path} exists and is not a folder; expected a folder (it is "
            "created when missing). Pass another --out or move the file away."
        )
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    why = ""
    if existing is not None and not existing.is_dir():
        why = f"{existing} is a file, not a folder"
    elif existing is not None and existing != path and not os.access(existing, os.W_OK | os.X_OK):
        why = f"{existing} is not writable"
    if why:
        raise InputError(
            f"output folder {path} cannot be created ({why}); expected a place where a "
            "folder can be made. Pass another --out, e.g. a folder under the current one."
        )


# ---------------------------------------------------------------------------------------
# the archive


@dataclass
class _Archive:
    """The members of a zip file read into memory, by name relative to the root folder."""

    path: Path
    root: str
    members: dict[str, bytes]

    def name(self, member: str) -> str:
        """The member's full name in the zip file."""
        return f"{self.root}/{member}"

    def text(self, member: str) -> str:
        try:
            return self.members[member].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(
                f"{self.path}: member {self.name(member)!r} is not UTF-8 text ({exc})."
            ) from exc

    def json(self, member: str) -> Any:
        """The member parsed as JSON; ``InputError`` naming it when it cannot be."""
        text = self.text(member)
        try:
            return json.loads(text)
        except RecursionError as exc:
            raise self.corrupt(member, "JSON nested too deeply to read") from exc
        except json.JSONDecodeError as exc:
            raise self.corrupt(member, f"not valid JSON ({exc})") from exc
        except ValueError as exc:  # Python refuses to read integers of over 4300 digits
            raise self.corrupt(member, "JSON with a number too long to read") from exc

    def corrupt(self, member: str, reason: str) -> InputError:
        """The error for a member that cannot be read as torch.export.save writes it."""
        return InputError(
            f"{self.path}: member {self.name(member)!r} is {reason}; expected a "
            f"torch.export.save archive. Make one with {_EXPORT_RECIPE}."
        )


def _zip_ends_the_file(data: bytes) -> bool:
    """Whether the zip file's end record closes ``data`` (a truncated archive ends
    elsewhere, and zipfile would then find the end record of a zip stored inside it)."""
    end = data.rfind(b"PK\x05\x06", max(0, len(data) - 22 - 0xFFFF))
    if end < 0 or end + 22 > len(data):
        return False
    return end + 22 + int.from_bytes(data[end + 20 : end + 22], "little") == len(data)


def _looks_pickled(head: bytes) -> bool:
    """Whether ``head`` starts like a pickle: ``PROTO`` 2 to 5, or protocol 0/1 opcodes."""
    if head[:1] == b"\x80":
        return len(head) > 1 and 2 <= head[1] <= 5
    return head[:1] in (b"(", b"}", b"]")


def _check_zip(path: Path, data: bytes) -> None:
    """Refuse a file that is not a whole zip file, saying what it is instead."""
    if _looks_pickled(data[:2]):
        raise InputError(
            f"{path} is a pickle file, not a torch.export archive; refused because "
            f"unpickling runs code from the file. Make the model file with {_EXPORT_RECIPE}."
        )
    if not zipfile.is_zipfile(io.BytesIO(data)) and data[:2] != b"PK":
        raise InputError(
            f"{path} is not a torch.export archive (not a zip file). Make one with "
            f"{_EXPORT_RECIPE}."
        )
    if not _zip_ends_the_file(data):
        raise InputError(
            f"{path} is a truncated or corrupt zip file (its end record is not at the end "
            f"of the file); copy the archive again, or make it again with {_EXPORT_RECIPE}."
        )


def _read_members(path: Path, archive: zipfile.ZipFile, names: list[str]) -> dict[str, bytes]:
    """The members ``names`` by name relative to the root folder (``extra/`` ones are not
    decompressed: they are accepted but never used); ``InputError`` naming a member that
    cannot be read (bad CRC, corrupt compressed data)."""
    members: dict[str, bytes] = {}
    for name in names:
        relative = name.split("/", 1)[1]
        try:
            members[relative] = b"" if relative.startswith("extra/") else archive.read(name)
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError) as exc:
            raise InputError(
                f"{path}: member {name!r} cannot be read ({exc}); the archive is corrupt. "
                f"Copy it again, or make it again with {_EXPORT_RECIPE}."
            ) from exc
    return members


def _open_archive(path: Path, data: bytes) -> _Archive:
    """Read and sort the members of a ``.pt2`` archive; refuse anything not plain."""
    _check_zip(path, data)
    try:
        opened = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise InputError(
            f"{path} is a corrupt zip file ({exc}); copy the archive again, or make it again "
            f"with {_EXPORT_RECIPE}."
        ) from exc
    with opened as archive:
        _check_inflation(path, archive, len(data), "")
        names = [info.filename for info in archive.infolist() if not info.is_dir()]
        roots = {name.split("/", 1)[0] for name in names}
        for name in names:
            if name.endswith(".pkl"):
                raise _refusal(path, name, "a pickle (a torch.save file is not an archive)")
        if len(roots) != 1 or any("/" not in name for name in names):
            raise InputError(
                f"{path} is not a torch.export archive: its members {sorted(names)[:5]} do "
                f"not share one root folder. Make one with {_EXPORT_RECIPE}."
            )
        root = roots.pop()
        members = _read_members(path, archive, names)
    result = _Archive(path, root, members)
    if members.get("archive_format", b"").strip() != b"pt2":
        raise InputError(
            f"{path} is not a torch.export archive (no member {root + '/archive_format'!r} "
            f"saying 'pt2'). Make one with {_EXPORT_RECIPE}."
        )
    for member in members:
        if member in _PLAIN_MEMBERS or member == _SAMPLE_INPUTS:
            continue
        if _RAW_MEMBER.fullmatch(member) or member.startswith("extra/"):
            continue
        for pattern, reason in _REFUSED_MEMBERS:
            if pattern.fullmatch(member):
                raise _refusal(path, result.name(member), reason)
        raise _refusal(path, result.name(member), "not part of a plain torch.export archive")
    for member in (f"models/{_MODEL}.json", _WEIGHTS_CONFIG, _CONSTANTS_CONFIG):
        if member not in members:
            raise InputError(
                f"{path}: the archive has no member {result.name(member)!r}; expected an "
                f"archive written by torch.export.save. Make one with {_EXPORT_RECIPE}."
            )
    version = result.text("archive_version").strip() if "archive_version" in members else ""
    if version != "0":
        raise InputError(
            f"{path}: archive version {version!r}, expected '0' (torch.export.save of torch "
            "2.7 or later); save the program again with this torch."
        )
    order = result.text("byteorder").strip() if "byteorder" in members else sys.byteorder
    if order != sys.byteorder:
        raise InputError(
            f"{path}: the weights are stored {order}-endian but this machine is "
            f"{sys.byteorder}-endian; save the program on a {sys.byteorder}-endian machine."
        )
    if _SAMPLE_INPUTS in members:
        _check_tensor_pickle(result, _SAMPLE_INPUTS)
    return result


def _check_inflation(path: Path, archive: zipfile.ZipFile, size: int, where: str) -> None:
    """Refuse a zip file that would decompress to much more than its own size (a zip bomb).

    ``ZipExtFile`` never returns more than a member's declared ``file_size``, so bounding the
    declared sizes bounds what reading the members allocates.
    """
    infos = archive.infolist()
    methods = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED}
    if any(info.compress_type not in methods for info in infos):
        raise InputError(f"{path}{where}: a member is compressed with other than deflate.")
    total = sum(info.file_size for info in infos)
    if len(infos) > 100_000 or total > _MAX_INFLATION * size + (1 << 20):
        raise InputError(
            f"{path}{where}: its {len(infos)} members declare {total} bytes for a {size}-byte "
            "zip file; refused (torch.export.save stores members uncompressed)."
        )


def _check_tensor_pickle(archive: _Archive, member: str) -> None:
    """Refuse a ``torch.save`` member whose pickle names anything but tensors.

    The pickle is never unpickled: its opcodes are listed with ``pickletools.genops``, which
    only parses them.
    """
    data = archive.members[member]
    where = archive.name(member)
    try:
        inner = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise _refusal(archive.path, where, "a pickle that is not a torch.save file") from None
    with inner:
        _check_inflation(archive.path, inner, len(data), f" (member {where!r})")
        pickles = [name for name in inner.namelist() if name.endswith(".pkl")]
        if not pickles:
            raise _refusal(archive.path, where, "not a torch.save file (no data.pkl)")
        for name in pickles:
            try:
                # streamed, not listed: a list holds ~100 bytes of Python objects per opcode
                for opcode, arg, _ in pickletools.genops(inner.read(name)):
                    _check_pickle_op(archive, where, opcode, arg)
            except InputError:
                raise
            except Exception as exc:
                raise _refusal(archive.path, where, f"a malformed pickle ({exc})") from exc


def _check_pickle_op(archive: _Archive, where: str, opcode: Any, arg: Any) -> None:
    """Refuse an opcode that builds an object or names a global other than a tensor's."""
    if opcode.name in _PICKLE_CALLS:
        raise _refusal(archive.path, where, f"a pickle that builds objects ({opcode.name})")
    if opcode.name == "GLOBAL":
        text = str(arg)
        if text not in _TENSOR_PICKLE_GLOBALS and not _STORAGE_GLOBAL.fullmatch(text):
            raise _refusal(archive.path, where, f"a pickle that calls {text.replace(' ', '.')}")


# ---------------------------------------------------------------------------------------
# weights and constants


def _serde() -> Any:
    try:
        return importlib.import_module("torch._export.serde.serialize")
    except ImportError as exc:  # pragma: no cover - torch too old
        raise InputError(
            f"this torch ({torch.__version__}) cannot read torch.export archives; install "
            "torch 2.7 or later."
        ) from exc


def _ints(values: Any, what: str) -> list[int]:
    """Integers written as ``[{"as_int": i}, ...]``, each in the signed 64-bit range."""
    if not isinstance(values, list) or not all(
        isinstance(v, dict) and isinstance(v.get("as_int"), int) for v in values
    ):
        raise ValueError(f"{what} must be a list of integers")
    numbers = [int(v["as_int"]) for v in values]
    if any(not -(2**63) <= n < 2**63 for n in numbers):
        raise ValueError(f"{what} has an integer beyond 64 bits")
    return numbers


def _raw_tensors(archive: _Archive, config_member: str, folder: str) -> dict[str, torch.Tensor]:
    """Tensors described by a payload config, read from their raw bytes."""
    config = archive.json(config_member)
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        raise InputError(
            f"{archive.path}: member {archive.name(config_member)!r} has no 'config' mapping; "
            "expected a torch.export.save archive."
        )
    dtypes: dict[int, torch.dtype] = _serde()._SERIALIZE_TO_TORCH_DTYPE
    bases: dict[str, torch.Tensor] = {}
    tensors: dict[str, torch.Tensor] = {}
    for fqn, entry in entries.items():
        member = f"{folder}{entry.get('path_name', '')}" if isinstance(entry, dict) else "?"
        if not isinstance(entry, dict) or not _FQN.fullmatch(str(fqn)):
            raise InputError(
                f"{archive.path}: entry {fqn!r} of {archive.name(config_member)!r} is not a "
                "tensor description; expected a torch.export.save archive."
            )
        if entry.get("use_pickle"):
            raise _refusal(
                archive.path,
                archive.name(member),
                f"{fqn!r} stored as a pickle (a tensor subclass, not a plain tensor)",
            )
        if not _RAW_MEMBER.fullmatch(member) or member not in archive.members:
            raise InputError(
                f"{archive.path}: {fqn!r} points to member {archive.name(member)!r}, which "
                "is not a raw tensor member of the archive."
            )
        try:
            meta = entry["tensor_meta"]
            dtype = dtypes[meta["dtype"]]
            sizes = _ints(meta["sizes"], "sizes")
            strides = _ints(meta["strides"], "strides")
            offset = _ints([meta["storage_offset"]], "storage_offset")[0]
            if meta.get("layout") not in (None, 7):  # 7: torch.strided
                raise ValueError(f"layout {meta.get('layout')} is not strided")
            if member not in bases:
                blob = archive.members[member]
                size = torch.empty(0, dtype=dtype).element_size()
                if len(blob) % size:
                    raise ValueError(f"{len(blob)} bytes is not a whole number of {dtype}")
                bases[member] = (
                    torch.frombuffer(bytearray(blob), dtype=dtype)
                    if blob
                    else torch.zeros(0, dtype=dtype)
                )
            base = bases[member]
            if base.numel() == 0:  # torch.export.save writes empty tensors as no bytes
                if any(s < 0 for s in sizes) or math.prod(sizes) != 0:
                    raise ValueError(f"sizes {sizes} declared for a member without bytes")
                tensor = torch.zeros(sizes, dtype=dtype)
            else:
                tensor = torch.as_strided(base, sizes, strides, offset)
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            # torch's messages may carry a C++ backtrace after their first line
            reason = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
            raise InputError(
                f"{archive.path}: {fqn!r} in member {archive.name(member)!r} cannot be read as "
                f"a plain tensor ({reason}); expected a torch.export.save archive."
            ) from exc
        requires_grad = bool(meta.get("requires_grad", False))
        if entry.get("is_param") and not tensor.is_floating_point():
            raise InputError(
                f"{archive.path}: parameter {fqn!r} in member {archive.name(member)!r} is "
                f"declared {dtype}; expected a floating-point parameter (float32 or float64). "
                f"Make the archive with {_EXPORT_RECIPE}."
            )
        if entry.get("is_param"):
            tensors[fqn] = torch.nn.Parameter(tensor, requires_grad=requires_grad)
        else:
            tensors[fqn] = (
                tensor.requires_grad_(requires_grad) if tensor.is_floating_point() else tensor
            )
    return tensors


# ---------------------------------------------------------------------------------------
# the program's JSON


class _ProgramCheck:
    """Checks (and trims) the JSON of a program before torch's deserializer sees it."""

    def __init__(self, archive: _Archive, member: str) -> None:
        self.path = archive.path
        self.member = archive.name(member)

    def refuse(self, what: str) -> InputError:
        return _refusal(self.path, self.member, what)

    def run(self, doc: Any) -> None:
        if not isinstance(doc, dict) or not isinstance(doc.get("graph_module"), dict):
            raise InputError(
                f"{self.path}: member {self.member!r} is not a serialized program (no "
                f"'graph_module'). Make the file with {_EXPORT_RECIPE}."
            )
        # guard strings are executed by ExportedProgram.module(check_guards=True) and only
        # restate input shapes; metadata is for debugging (stack traces, module paths)
        doc["guards_code"] = []
        doc["graph_module"]["metadata"] = {}
        for key in doc.get("range_constraints") or {}:
            self.symbol(key)
        fields = doc["graph_module"].get("treespec_namedtuple_fields")
        if fields:
            self.refuse_value("a program whose inputs or outputs are namedtuples")
        self.batch_norm_in_training(doc["graph_module"])
        try:
            self.walk(doc, "")
        except RecursionError:
            self.refuse_value("a program nested too deeply to check")

    def batch_norm_in_training(self, graph_module: dict[str, Any]) -> None:
        """Refuse a program exported with BatchNorm in training mode, saying so (its graph
        also updates the running statistics in place, which the operator check refuses
        with a message that would not say why)."""
        graph = graph_module.get("graph")
        nodes = graph.get("nodes") if isinstance(graph, dict) else None
        for node in nodes if isinstance(nodes, list) else []:
            target = node.get("target") if isinstance(node, dict) else None
            if not isinstance(target, str) or "batch_norm" not in target:
                continue
            for item in node.get("inputs") or []:
                if (
                    isinstance(item, dict)
                    and item.get("name") == "training"
                    and item.get("arg") == {"as_bool": True}
                ):
                    raise NotAttackableError(
                        f"{self.path}: member {self.member!r} is a program exported with "
                        "BatchNorm in training mode (it normalises each example with the "
                        "statistics of the batch itself, so the update is not a sum of "
                        "per-example terms). If the client computed its update with running "
                        "statistics, export the model in eval mode: "
                        "torch.export.export(model.eval(), (example_input,))."
                    )

    def refuse_value(self, what: str) -> NoReturn:
        raise self.refuse(what)

    def walk(self, value: Any, key: str) -> None:
        if isinstance(value, list):
            for item in value:
                self.walk(item, key)
            return
        if not isinstance(value, dict):
            return
        for name, item in value.items():
            if name == "nodes" and isinstance(item, list):
                for node in item:
                    self.node(node)
            elif name == "expr_str":
                self.expression(item)
            elif name in ("as_operator", "as_custom_obj", "custom_obj"):
                self.refuse_value(f"a program with a custom object or operator argument ({name})")
            elif name == "custom_obj_values" and item:
                self.refuse_value("a program with custom objects (custom_obj_values)")
            elif name in ("name", "as_name", "user_input_name") and item is not None:
                self.identifier(item)
            elif name in ("parameter_name", "buffer_name", "tensor_constant_name", "fqn"):
                if item != "":
                    self.fqn(item)
            elif name == "forward_arg_names" and item is not None:
                for arg in item:
                    self.identifier(arg)
            elif name in ("tensor_values", "sym_int_values", "sym_float_values", "sym_bool_values"):
                for arg in item or {}:
                    self.identifier(arg)
            elif name in ("in_spec", "out_spec") and isinstance(item, str):
                self.treespec(item)
            elif name in ("layout", "as_layout") and item not in (None, _STRIDED):
                self.refuse_value(f"a program with a tensor of layout {item!r} (only strided)")
            elif name == "as_int" and (
                not isinstance(item, int) or len(str(abs(item))) > _MAX_LITERAL_DIGITS
            ):
                self.refuse_value(f"a program with the integer {str(item)[:40]!r}")
            self.walk(item, name)

    def node(self, node: Any) -> None:
        if not isinstance(node, dict):
            self.refuse_value("a program with a malformed node")
        target = node.get("target")
        if not isinstance(target, str):
            self.refuse_value("a program with a node without a target")
        if target in _SYM_TARGETS:
            # size arithmetic runs on Python ints (unbounded): a chain of x = x * x doubles
            # the digits at every node, so a product may have one size operand only
            sizes = [
                i
                for i in node.get("inputs") or []
                if isinstance(i, dict)
                and isinstance(i.get("arg"), dict)
                and any(k.startswith("as_sym") for k in i["arg"])
            ]
            if target == "_operator.mul" and len(sizes) > 1:
                self.refuse_value("a program multiplying two symbolic sizes")
        else:
            match = _ATEN_TARGET.fullmatch(target)
            op = None
            if match is not None and f"{match.group(1)}.{match.group(2)}" in _ALLOWED_ATEN:
                packet = getattr(torch.ops.aten, match.group(1), None)
                op = getattr(packet, match.group(2), None) if packet is not None else None
            if not isinstance(op, torch._ops.OpOverload):
                self.refuse_value(
                    f"a program calling {target!r}, which is not an ATen operator of the "
                    "feed-forward layers spear loads (nor size arithmetic)"
                )
        node["metadata"] = {}

    def identifier(self, value: Any) -> None:
        if not isinstance(value, str) or not _IDENTIFIER.fullmatch(value):
            self.refuse_value(f"a program with the name {value!r}, which is not an identifier")

    def fqn(self, value: Any) -> None:
        if (
            not isinstance(value, str)
            or not _FQN.fullmatch(value)
            or any(part.startswith("__") for part in value.split("."))
        ):
            self.refuse_value(f"a program with the attribute path {value!r}")

    def symbol(self, value: Any) -> None:
        if not isinstance(value, str) or not _SYMBOL.fullmatch(value):
            self.refuse_value(f"a program with the size symbol {value!r}")

    def expression(self, value: Any) -> None:
        """Plain arithmetic over size symbols (evaluated by ``sympy.sympify``)."""
        if not isinstance(value, str) or len(value) > 10_000:
            self.refuse_value("a program with a malformed symbolic expression")
        if "**" in value:  # 9**9**9**9: sympify computes it (torch writes Pow(...), via srepr)
            self.refuse_value(f"a program with a power in the symbolic expression {value[:80]!r}")
        position = 0
        while position < len(value):
            match = _EXPR_TOKEN.match(value, position)
            if match is None:
                self.refuse_value(
                    f"a program with the symbolic expression {value[:80]!r}, which is not "
                    "plain arithmetic over size symbols"
                )
            token = match.group(0)
            if token[0].isdigit() and len(token) > _MAX_LITERAL_DIGITS:
                self.refuse_value(f"a program with the number {token[:40]!r} in an expression")
            named = token[0].isalpha() or token[0] == "_"
            if named and token not in _EXPR_NAMES and not _SYMBOL.fullmatch(token):
                self.refuse_value(
                    f"a program with the symbolic expression {value[:80]!r}, which uses "
                    f"the name {token!r}"
                )
            position = match.end()

    def treespec(self, text: str) -> None:
        """Input and output specs: tuples, lists and dicts keyed by identifiers."""
        try:
            protocol, spec = json.loads(text)
        except (ValueError, TypeError):
            self.refuse_value("a program with a malformed input or output spec")
        if protocol != 1:
            self.refuse_value(f"a program with an input or output spec of protocol {protocol!r}")
        self.treespec_node(spec)

    def treespec_node(self, spec: Any) -> None:
        if not isinstance(spec, dict) or spec.get("type") not in _TREESPEC_TYPES:
            kind = spec.get("type") if isinstance(spec, dict) else spec
            self.refuse_value(f"a program whose inputs or outputs hold {kind!r}")
        context = spec.get("context")
        if context is not None:
            try:
                decoded = json.loads(context) if isinstance(context, str) else context
            except ValueError:
                self.refuse_value("a program with a malformed input or output spec")
            keys = decoded if isinstance(decoded, list) else [decoded]
            for key in keys:
                if key is not None:
                    self.identifier(key)
        for child in spec.get("children_spec") or []:
            self.treespec_node(child)


# ---------------------------------------------------------------------------------------
# loading


def read_program(path: str | Path, *, trust: bool = False) -> torch.export.ExportedProgram:
    """Read a ``torch.export`` archive without unpickling or running anything from it.

    Parameters
    ----------
    path:
        The ``.pt2`` file written by ``torch.export.save``.
    trust:
        Use ``torch.export.load`` instead (it unpickles members of the archive: only for
        files from a trusted source).

    Returns
    -------
    torch.export.ExportedProgram
        The program, without its example inputs (``example_inputs`` is ``None``) and
        without guard strings.

    Raises
    ------
    FileNotFoundError
        When the file is missing.
    InputError
        When it is a folder or a special file, not an archive, truncated or corrupt, or
        has a member that loading could run or that cannot be read (the message names the
        member and why).
    NotAttackableError
        When the program was exported with BatchNorm in training mode.
    """
    path = Path(path)
    _check_file(path, "model", ".pt2")
    data = path.read_bytes()
    if trust:
        try:
            with _quiet():
                return torch.export.load(io.BytesIO(data))
        except Exception as exc:
            raise InputError(
                f"{path} is not a torch.export program ({exc}). Make one with {_EXPORT_RECIPE}."
            ) from exc
    archive = _open_archive(path, data)
    member = f"models/{_MODEL}.json"
    doc = archive.json(member)
    _ProgramCheck(archive, member).run(doc)
    state_dict = _raw_tensors(archive, _WEIGHTS_CONFIG, "data/weights/")
    constants = _raw_tensors(archive, _CONSTANTS_CONFIG, "data/constants/")
    serde = _serde()
    schema = importlib.import_module("torch._export.serde.schema")
    try:
        with _quiet():
            serialized = serde._dict_to_dataclass(schema.ExportedProgram, doc)
            program: torch.export.ExportedProgram = serde.ExportedProgramDeserializer().deserialize(
                serialized, state_dict, constants, None
            )
    except Exception as exc:
        raise InputError(
            f"{path}: member {archive.name(member)!r} is not a program this torch "
            f"({torch.__version__}) can read ({str(exc).splitlines()[0][:300]}). Save it "
            "again with this torch version."
        ) from exc
    return program


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence torch's log records and warnings (failed traces log whole tracebacks)."""
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def _size_ops() -> frozenset[Any]:
    """ATen operators whose second argument is a size list that may repeat the batch size."""
    aten = torch.ops.aten
    return frozenset(
        {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default}
    )


def free_batch(program: torch.export.ExportedProgram, path: str | Path = "") -> fx.GraphModule:
    """The program's module, runnable on any batch size with the same computation.

    A program exported with a dynamic batch dimension (``torch.export.Dim``) runs any batch
    as it is; its module is returned without input guards. A program exported with a fixed
    batch ``N`` records ``N`` in its input's shape, in its guards and in size arguments such
    as ``view(h, [N, -1])`` (``h.view(h.size(0), -1)`` traced at batch ``N``): those size
    arguments become ``h.size(0)`` (equal to ``N`` at batch ``N``, so the computation is
    unchanged) and the module is exported again with a dynamic batch dimension, which
    proves to torch that no other part of the graph depends on the batch size.

    Parameters
    ----------
    program:
        The exported program.
    path:
        The file it came from, for messages.

    Returns
    -------
    torch.fx.GraphModule
        Parameters named as in the original model.

    Raises
    ------
    InputError
        When the graph depends on its batch size in a way that cannot be undone.
    """
    try:
        with _quiet():
            module = program.module(check_guards=False)
    except Exception as exc:
        raise InputError(
            f"{path or 'the program'}: torch cannot build a module from the program "
            f"({str(exc).splitlines()[0][:300]}). Export it again with {_EXPORT_RECIPE}."
        ) from exc
    placeholders = list(module.graph.find_nodes(op="placeholder"))
    value = placeholders[0].meta.get("val") if len(placeholders) == 1 else None
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return module  # not one tensor input: torch's input checks stay
    # the input checks refuse batch sizes outside the exported range (which starts at 2
    # for Dim.AUTO); a dynamic graph runs them all
    module.validate_inputs = False  # type: ignore[assignment]
    batch = value.shape[0]
    if not isinstance(batch, int):
        return module
    changed = _unpin_batch(module, batch)
    shape = (2, *(int(d) for d in value.shape[1:]))
    if math.prod(shape) > _MAX_EXAMPLE_NUMEL:
        raise InputError(
            f"{path or 'the program'}: its input shape {tuple(value.shape)} is too large for "
            "spear (an example of two inputs would exceed 2**28 elements)."
        )
    example = torch.zeros(shape, dtype=value.dtype)
    try:
        with _quiet():
            dim = torch.export.Dim("batch", min=1)
            again = torch.export.export(module, (example,), dynamic_shapes=({0: dim},))
            free: fx.GraphModule = again.module(check_guards=False)
    except Exception as exc:
        pinned = f" ({changed} size argument(s) were freed)" if changed else ""
        raise InputError(
            f"{path or 'the program'} was exported for batch size {batch} only and its graph "
            f"depends on that size beyond size arguments{pinned}: "
            f"{str(exc).splitlines()[0][:300]}. Export it with a dynamic batch dimension: "
            "torch.export.export(model, (example_input,), dynamic_shapes=({0: "
            "torch.export.Dim('batch')},))."
        ) from exc
    free.validate_inputs = False  # type: ignore[assignment]
    return free


def _unpin_batch(module: fx.GraphModule, batch: int) -> int:
    """Replace size arguments ``[batch, ...]`` of reshapes by the tensor's own ``size(0)``."""
    ops = _size_ops()
    changed = 0
    for node in list(module.graph.nodes):
        if node.op != "call_function" or node.target not in ops or len(node.args) < 2:
            continue
        source, sizes = node.args[0], node.args[1]
        source_value = source.meta.get("val") if isinstance(source, fx.Node) else None
        if (
            not isinstance(source_value, torch.Tensor)
            or source_value.dim() == 0
            or source_value.shape[0] != batch
            or not isinstance(sizes, (list, tuple))
            or not sizes
            or sizes[0] != batch
        ):
            continue
        with module.graph.inserting_before(node):
            size = module.graph.call_function(torch.ops.aten.sym_size.int, (source, 0))
        node.args = (source, [size, *sizes[1:]], *node.args[2:])
        changed += 1
    if changed:
        module.graph.lint()
        module.recompile()
    return changed


def load_model(path: str | Path, *, trust: bool = False) -> fx.GraphModule:
    """Load a ``torch.export`` program file as a module that runs any batch size.

    Parameters
    ----------
    path:
        The ``.pt2`` file written by ``torch.export.save``.
    trust:
        Load with ``torch.export.load``, which unpickles members of the archive (only for
        files from a trusted source).

    Returns
    -------
    torch.fx.GraphModule
        See :func:`read_program` (what is read and refused) and :func:`free_batch`.

    Raises
    ------
    FileNotFoundError
        When the file is missing.
    InputError
        When it is a folder, not an archive, would run code when loaded (the message names
        the member and why), or cannot run other batch sizes.
    """
    program = read_program(path, trust=trust)
    return free_batch(program, path)


def load_update(path: str | Path) -> dict[str, torch.Tensor]:
    """Load an update from a safetensors file (never unpickled).

    Raises
    ------
    FileNotFoundError
        When the file is missing.
    InputError
        When it is a folder, a special file or not a safetensors file (pickles are
        refused); the message says what it is when that is known.
    """
    path = Path(path)
    _check_file(path, "update", ".safetensors")
    try:
        return dict(load_file(str(path)))
    except Exception as exc:
        found = _update_file_kind(path) or f"not a safetensors file ({str(exc)[:300]})"
        raise InputError(
            f"{path} is {found}. Save the update with "
            "safetensors.torch.save_file(update, 'update.safetensors'); pickled files are "
            "refused because unpickling runs code and client data is untrusted."
        ) from exc


def _update_file_kind(path: Path) -> str:
    """What a file that safetensors cannot read is, when it is something known: a pickle,
    a ``torch.save`` file or a ``torch.export`` archive (read from its zip directory,
    without decompressing anything); ``""`` otherwise."""
    with path.open("rb") as handle:
        head = handle.read(2)
    if _looks_pickled(head):
        return "a pickle (torch.save) file"
    if head != b"PK":
        return ""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return "a corrupt zip file"
    if any(name.endswith("/archive_format") for name in names):
        return "a torch.export archive (a model file, --model), not an update"
    if any(name.endswith(".pkl") for name in names):
        return "a pickle (torch.save) file"
    return "a zip file"
