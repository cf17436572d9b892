"""Safetensors files, written and read tensor by tensor: the weights of every outside format.

The safetensors library wants every tensor in memory at once to write a file, and reads by
memory-mapping whole files (local ones only); here a tensor is in host memory only while its bytes
are written or read, so an export or import never holds the model, and gs:// files are read in
place. Above a size the weights go into numbered files with an index, as Hugging Face lays them out.
"""

import contextlib
import json

import ml_dtypes
import numpy as np
from etils import epath

from pretrain.config import ConfigError

STEM = "model"  # model.safetensors; diffusers' components use diffusion_pytorch_model
DTYPES = {"float32": (np.float32, "F32"), "bfloat16": (ml_dtypes.bfloat16, "BF16"), "float16": (np.float16, "F16")}


def _write_safetensors(path: epath.Path, entries, dtype: str):
    """One safetensors file written tensor by tensor (the safetensors library wants every tensor in
    memory at once). entries: [(name, shape, thunk)]."""
    np_dtype, code = DTYPES[dtype]
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, _ in entries:
        size = int(np.prod(shape)) * np.dtype(np_dtype).itemsize
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with path.open("wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for _, shape, thunk in entries:
            array = np.ascontiguousarray(thunk(), dtype=np_dtype)
            assert array.shape == tuple(shape), (array.shape, shape)
            f.write(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())


def write_weights(out: epath.Path, tensors, dtype: str, max_shard_bytes: int, stem: str = STEM) -> int:
    """Safetensors files of at most max_shard_bytes each (a larger tensor gets a file of its own),
    with an index when there is more than one, named from `stem`. tensors: [(name, shape, thunk)].
    Returns the total bytes of tensor data."""
    itemsize = np.dtype(DTYPES[dtype][0]).itemsize
    shards, size, total = [[]], 0, 0
    for entry in tensors:
        nbytes = int(np.prod(entry[1])) * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
        total += nbytes
    if len(shards) == 1:
        _write_safetensors(out / f"{stem}.safetensors", shards[0], dtype)
        return total
    weight_map = {}
    for i, entries in enumerate(shards):
        filename = f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_safetensors(out / filename, entries, dtype)
        weight_map.update({name: filename for name, _, _ in entries})
    (out / f"{stem}.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return total


class Weights:
    """weights(name) -> one tensor as a NumPy array, weights.shape(name) -> its shape without reading
    it. Each tensor is read on its own, at its offset, from local or gs:// files alike: no file is
    memory-mapped or downloaded whole, so only the tensor asked for is in host memory."""

    def __init__(self, directory: epath.Path, files: dict | str, stack: contextlib.ExitStack):
        self.directory, self.files, self.stack, self.opened = directory, files, stack, {}

    def __call__(self, name: str) -> np.ndarray:
        f, start, header = self._entry(name)
        begin, end = header["data_offsets"]
        f.seek(start + begin)
        dtype = next((np_dtype for np_dtype, code in DTYPES.values() if code == header["dtype"]), None)
        if dtype is None:
            raise ConfigError(f"{self.directory}: {name} is {header['dtype']}; weights are read as {', '.join(DTYPES)}")
        return np.frombuffer(f.read(end - begin), dtype=np.dtype(dtype).newbyteorder("<")).reshape(header["shape"])

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entry(name)[2]["shape"])

    def _entry(self, name: str):
        """(the open file holding `name`, where its data starts, the tensor's header entry)."""
        filename = self.files if isinstance(self.files, str) else self.files.get(name)
        if filename is not None and filename not in self.opened:
            f = self.stack.enter_context((self.directory / filename).open("rb"))
            length = int.from_bytes(f.read(8), "little")
            self.opened[filename] = (f, 8 + length, json.loads(f.read(length)))
        if filename is None or name not in self.opened[filename][2]:
            raise ConfigError(f"{self.directory} lacks the tensor {name}; is it a complete export?")
        f, start, headers = self.opened[filename]
        return f, start, headers[name]


@contextlib.contextmanager
def open_weights(directory: epath.Path, stem: str = STEM):
    """Yields the Weights of a directory's safetensors files (one, or numbered ones with an index)."""
    single, index = f"{stem}.safetensors", f"{stem}.safetensors.index.json"
    if (directory / index).exists():
        files = json.loads((directory / index).read_text())["weight_map"]
    elif (directory / single).exists():
        files = single  # one file holds every tensor
    else:
        raise ConfigError(f"{directory} has neither {single} nor {index}; export it again")
    with contextlib.ExitStack() as stack:
        yield Weights(directory, files, stack)
