#!/usr/bin/env python3
"""Load a torch.save zip-pickle state dict the way torch.load does, without torch.

Usage: check_torch_pickle.py FILE [--json] [--allow-unaligned]

Mirrors torch.serialization's zip loader: the archive folder is the prefix of the
first zip entry, `<archive>/data.pkl` is unpickled with a `persistent_load` that maps
`('storage', StorageClass, key, location, numel)` to the raw record `<archive>/data/<key>`,
and `find_class` only allows what a plain state dict needs (like weights_only=True):
torch._utils._rebuild_tensor_v2, torch.{Float,Half,BFloat16}Storage, collections.OrderedDict.

Also checks: a `version` record exists, `byteorder` (if present) is little/big, records
are STORED, every data/N record's data starts at a 64-byte aligned file offset (as
torch's writer pads them; --allow-unaligned turns that into a warning), record sizes
match the storages' numel, and tensor views fit in their storages.

Prints per tensor: name, dtype, shape, and the sum of its values decoded to float32
(F32 via struct 'f', F16 via struct 'e', BF16 by shifting the 16 bits into a float32),
accumulated exactly with math.fsum (order-independent). --json prints one object
{name: {"dtype": ..., "shape": [...], "sum": ...}}. Exits 1 with a message on any problem.
"""

import collections
import io
import json
import math
import pickle
import struct
import sys
import zipfile

ALIGNMENT = 64


class CheckError(Exception):
    pass


class StorageType:
    def __init__(self, name, dtype, size, fmt):
        self.name, self.dtype, self.elem_size, self.fmt = name, dtype, size, fmt

    def __repr__(self):
        return f"torch.{self.name}"


STORAGE_TYPES = {
    "FloatStorage": StorageType("FloatStorage", "float32", 4, "f"),
    "HalfStorage": StorageType("HalfStorage", "float16", 2, "e"),
    "BFloat16Storage": StorageType("BFloat16Storage", "bfloat16", 2, "bf16"),
}


class Storage:
    def __init__(self, storage_type, key, data, numel):
        self.type, self.key, self.data, self.numel = storage_type, key, data, numel


class Tensor:
    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    @property
    def dtype(self):
        return self.storage.type.dtype

    def values(self, endian):
        """All elements of the (possibly strided) view, as Python floats of float32 values."""
        st = self.storage.type
        numel = math.prod(self.size)
        if numel == 0:
            return []
        if st.fmt == "bf16":
            raw = struct.unpack(f"{endian}{self.storage.numel}H", self.storage.data)
            words = struct.pack(f"<{len(raw)}I", *(h << 16 for h in raw))
            allv = struct.unpack(f"<{len(raw)}f", words)
        else:
            allv = struct.unpack(f"{endian}{self.storage.numel}{st.fmt}", self.storage.data)
        if is_contiguous(self.size, self.stride):
            return allv[self.offset : self.offset + numel]
        out = []
        index = [0] * len(self.size)
        for _ in range(numel):
            out.append(allv[self.offset + sum(i * s for i, s in zip(index, self.stride))])
            for d in reversed(range(len(index))):
                index[d] += 1
                if index[d] < self.size[d]:
                    break
                index[d] = 0
        return out


def is_contiguous(size, stride):
    expected = 1
    for d, s in zip(reversed(size), reversed(stride)):
        if d != 1 and s != expected:
            return False
        expected *= d
    return True


def rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
    if not isinstance(storage, Storage):
        raise CheckError(f"_rebuild_tensor_v2: storage is {type(storage).__name__}, not a persistent storage")
    for what, value in (("size", size), ("stride", stride)):
        if not isinstance(value, tuple) or not all(isinstance(v, int) and v >= 0 for v in value):
            raise CheckError(f"_rebuild_tensor_v2: {what} {value!r} is not a tuple of non-negative ints")
    if len(size) != len(stride):
        raise CheckError(f"_rebuild_tensor_v2: size {size} and stride {stride} differ in rank")
    if not isinstance(storage_offset, int) or storage_offset < 0:
        raise CheckError(f"_rebuild_tensor_v2: bad storage_offset {storage_offset!r}")
    if not isinstance(requires_grad, bool):
        raise CheckError(f"_rebuild_tensor_v2: requires_grad {requires_grad!r} is not a bool")
    if not isinstance(backward_hooks, collections.OrderedDict):
        raise CheckError(f"_rebuild_tensor_v2: backward_hooks {backward_hooks!r} is not an OrderedDict")
    if math.prod(size) > 0:
        extent = storage_offset + sum((d - 1) * s for d, s in zip(size, stride)) + 1
        if extent > storage.numel:
            raise CheckError(
                f"tensor of size {size} stride {stride} offset {storage_offset} needs {extent} "
                f"elements but storage data/{storage.key} has {storage.numel}"
            )
    return Tensor(storage, storage_offset, size, stride)


class TorchUnpickler(pickle.Unpickler):
    def __init__(self, file, zf, prefix):
        super().__init__(file)
        self.zf, self.prefix, self.loaded = zf, prefix, {}

    def find_class(self, module, name):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return rebuild_tensor_v2
        if module == "torch" and name in STORAGE_TYPES:
            return STORAGE_TYPES[name]
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        raise CheckError(f"unsupported global {module}.{name} in data.pkl")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckError(f"unexpected persistent id {pid!r}")
        _, storage_type, key, location, numel = pid
        if not isinstance(storage_type, StorageType):
            raise CheckError(f"persistent id storage class {storage_type!r} is not a known storage")
        if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
            raise CheckError(f"bad persistent id {pid!r}")
        if location != "cpu":
            raise CheckError(f"storage data/{key} has location {location!r}, expected 'cpu'")
        if key in self.loaded:
            return self.loaded[key]
        record = f"{self.prefix}/data/{key}"
        try:
            data = self.zf.read(record)
        except KeyError:
            raise CheckError(f"missing record {record}") from None
        if len(data) != numel * storage_type.elem_size:
            raise CheckError(
                f"record {record} has {len(data)} bytes, but {storage_type!r} of {numel} elements "
                f"needs {numel * storage_type.elem_size}"
            )
        storage = Storage(storage_type, key, data, numel)
        self.loaded[key] = storage
        return storage


def data_offset(raw, info):
    off = info.header_offset
    if raw[off : off + 4] != b"PK\x03\x04":
        raise CheckError(f"bad local header signature for {info.filename}")
    name_len, extra_len = struct.unpack("<HH", raw[off + 26 : off + 30])
    return off + 30 + name_len + extra_len


def load(path, allow_unaligned=False):
    with open(path, "rb") as f:
        raw = f.read()
    if not raw.startswith(b"PK\x03\x04"):
        raise CheckError("not a zip file (torch.load would fall back to the legacy format)")
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise CheckError(f"bad zip: {e}") from None
    infos = zf.infolist()
    if not infos:
        raise CheckError("archive contains no files")
    prefix = infos[0].filename.split("/", 1)[0]
    if "/" not in infos[0].filename:
        raise CheckError(f"first record {infos[0].filename!r} is not in an archive folder")
    names = {i.filename for i in infos}
    if len(names) != len(infos):
        raise CheckError("duplicate record names")
    for info in infos:
        if not info.filename.startswith(prefix + "/"):
            raise CheckError(f"record {info.filename!r} is outside archive folder {prefix!r}")
        if info.compress_type != zipfile.ZIP_STORED:
            raise CheckError(f"record {info.filename} is compressed (method {info.compress_type}); torch writes STORED")
    if f"{prefix}/version" not in names and f"{prefix}/.data/version" not in names:
        raise CheckError("missing version record")
    version_name = f"{prefix}/version" if f"{prefix}/version" in names else f"{prefix}/.data/version"
    version = zf.read(version_name).decode("ascii", "replace").strip()
    if not version.isdigit():
        raise CheckError(f"version record is {version!r}")
    endian = "<"
    if f"{prefix}/byteorder" in names:
        byteorder = zf.read(f"{prefix}/byteorder")
        if byteorder not in (b"little", b"big"):
            raise CheckError(f"byteorder record is {byteorder!r}")
        endian = "<" if byteorder == b"little" else ">"
    if f"{prefix}/data.pkl" not in names:
        raise CheckError(f"missing {prefix}/data.pkl")

    warnings = []
    for info in infos:
        rest = info.filename[len(prefix) + 1 :]
        if rest.startswith("data/"):
            off = data_offset(raw, info)
            if off % ALIGNMENT:
                msg = f"record {info.filename} data at offset {off} is not {ALIGNMENT}-byte aligned"
                if not allow_unaligned:
                    raise CheckError(msg)
                warnings.append(msg)
            if zf.read(info.filename) != raw[off : off + info.file_size]:
                raise CheckError(f"record {info.filename}: local data differs from what zipfile reads")

    unpickler = TorchUnpickler(io.BytesIO(zf.read(f"{prefix}/data.pkl")), zf, prefix)
    try:
        obj = unpickler.load()
    except CheckError:
        raise
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a malformed file
        raise CheckError(f"data.pkl does not unpickle: {type(e).__name__}: {e}") from None
    if not isinstance(obj, dict):
        raise CheckError(f"data.pkl holds a {type(obj).__name__}, not a dict")
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, Tensor):
            raise CheckError(f"entry {k!r} -> {type(v).__name__} is not str -> tensor")
    referenced = {v.storage.key for v in obj.values()}
    for info in infos:
        rest = info.filename[len(prefix) + 1 :]
        if rest.startswith("data/") and rest[5:] not in referenced:
            warnings.append(f"record {info.filename} is not referenced by data.pkl")
    return prefix, version, obj, endian, warnings


def float_sum(values):
    """Exactly rounded sum of the float32 values; inf/nan propagate as IEEE addition would."""
    if all(math.isfinite(v) for v in values):
        return math.fsum(values)
    return sum(values)


def main(argv):
    args = [a for a in argv[1:] if not a.startswith("--")]
    flags = {a for a in argv[1:] if a.startswith("--")}
    unknown = flags - {"--json", "--allow-unaligned"}
    if len(args) != 1 or unknown:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    path = args[0]
    try:
        prefix, version, obj, endian, warnings = load(path, "--allow-unaligned" in flags)
        summary = {}
        for name, t in obj.items():
            summary[name] = {"dtype": t.dtype, "shape": list(t.size), "sum": float_sum(t.values(endian))}
    except (CheckError, OSError, struct.error) as e:
        print(f"error: {path}: {e}", file=sys.stderr)
        return 1
    for w in warnings:
        print(f"warning: {path}: {w}", file=sys.stderr)
    if "--json" in flags:
        print(json.dumps(summary))
    else:
        print(f"{path}: archive {prefix!r}, version {version}, {len(summary)} tensors")
        for name, s in summary.items():
            print(f"{name}\t{s['dtype']}\t{s['shape']}\t{s['sum']!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
