"""Safetensors files, written tensor by tensor and read lazily: the weights of every outside format.

The safetensors library wants every tensor in memory at once to write a file; here a tensor is
pulled to host memory only when its bytes are written, so an export never holds the model twice.
Above a size the weights go into numbered files with an index, as Hugging Face lays them out.
"""

import contextlib
import json
import tempfile

import ml_dtypes
import numpy as np
from etils import epath
from safetensors import safe_open

from pretrain.config import ConfigError

WEIGHTS, INDEX = "model.safetensors", "model.safetensors.index.json"
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


def write_weights(out: epath.Path, tensors, dtype: str, max_shard_bytes: int) -> int:
    """Safetensors files of at most max_shard_bytes each (a larger tensor gets a file of its own),
    with an index when there is more than one. tensors: [(name, shape, thunk)]. Returns the total
    bytes of tensor data."""
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
        _write_safetensors(out / WEIGHTS, shards[0], dtype)
        return total
    weight_map = {}
    for i, entries in enumerate(shards):
        filename = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_safetensors(out / filename, entries, dtype)
        weight_map.update({name: filename for name, _, _ in entries})
    (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return total


@contextlib.contextmanager
def open_weights(directory: epath.Path):
    """Yields read(name) -> one tensor as a NumPy array, from a directory's safetensors files
    (memory-mapped, each opened when first needed). safetensors reads local files only, so a
    gs:// file is first downloaded into a temporary directory."""
    if (directory / INDEX).exists():
        files = json.loads((directory / INDEX).read_text())["weight_map"]
    elif (directory / WEIGHTS).exists():
        files = None  # one file holds every tensor
    else:
        raise ConfigError(f"{directory} has neither {WEIGHTS} nor {INDEX}; export it again")
    with tempfile.TemporaryDirectory(prefix="pretrain-hf-") as tmp, contextlib.ExitStack() as stack:
        opened = {}

        def read(name: str) -> np.ndarray:
            filename = WEIGHTS if files is None else files.get(name)
            if filename is None:
                raise ConfigError(f"{directory} lacks the tensor {name}; is it a complete export?")
            if filename not in opened:
                local = directory / filename
                if str(local).startswith("gs://"):
                    local = epath.Path(tmp) / filename
                    (directory / filename).copy(local)
                opened[filename] = stack.enter_context(safe_open(str(local), framework="numpy"))
            if name not in opened[filename].keys():
                raise ConfigError(f"{directory} lacks the tensor {name}; is it a complete export?")
            return opened[filename].get_tensor(name)

        yield read
