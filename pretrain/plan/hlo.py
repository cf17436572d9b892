"""Collective traffic and matmul FLOPs of a compiled, SPMD-partitioned XLA program, read from its
optimized HLO text.

`collective_bytes(jax.jit(f).lower(...).compile().as_text(), device_slices)` counts, per device and
per execution of the entry computation, the collectives of each kind and the bytes of data they
carry, split by whether a collective's device group stays within one TPU slice (ICI) or crosses
slices (DCN, the data-centre network). Loops multiply by their trip counts. The bytes are the size of
the collective's data (its result; the un-scattered input of a reduce-scatter), not the wire traffic
of any particular algorithm. XLA:TPU implements many FSDP all-gathers and reduce-scatters as
"windowed einsums": loops that pass shards around a ring with collective-permutes while each step's
matmul runs; those permutes count as the all-gather or reduce-scatter they implement.

`matmul_flops(text)` counts the FLOPs of the program's dots and convolutions (XLA:TPU writes most
matmuls as convolutions), per device per execution, loops multiplied by their trip counts. Work
inside custom calls (Pallas kernels such as splash attention) is invisible to it.

`op_costs(text)` gives, for each operation the device runs (fusions, custom calls, copies...), the
matmul FLOPs it does and the bytes it moves to and from HBM and host memory per execution of the
entry: the inputs of a per-op roofline (pretrain/plan/forecast.py).
"""

import functools
import math
import re
from collections import Counter
from typing import NamedTuple, Sequence

import numpy as np

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")

_ELEMENT_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4,
    "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16,
}
# These -start ops return (operand, result, ...) tuples; their data is the result, element 1.
_OPERAND_RESULT_STARTS = ("all-gather-start", "collective-permute-start")
_MIRROR = {"LT": "GT", "GT": "LT", "LE": "GE", "GE": "LE"}  # a CMP b == b MIRROR[CMP] a
_PASS_THROUGH = ("copy", "convert", "bitcast", "reshape")

_HEADER = re.compile(r"(ENTRY\s+)?%?([\w.\-]+)\s*\(.*->.*\{$")
_INSTR = re.compile(r"(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_COMMENT = re.compile(r"/\*.*?\*/")
_METADATA = re.compile(r',\s*metadata=\{(?:[^{}"]|"[^"]*")*\}')  # may hold any text: drop it
_ARRAY = re.compile(r"([a-z]\w*)\[([^\]]*)\]")
_LAID_OUT = re.compile(r"([a-z]\w*)\[([^\]]*)\](\{[^}]*\})?")  # an array with its layout
_GROUPS = re.compile(
    r"(?:replica_groups|source_target_pairs)=(\[[\d,]+\]<=\[[\d,]+\](?:T\([\d,]+\))?|\{[{}\d,\s]*\})")
_IOTA = re.compile(r"\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?")
_TRIP_COUNT = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"')


class Instr(NamedTuple):
    name: str
    shape: str
    opcode: str
    operands: list[str]  # names, without '%'
    attrs: str  # the text after the operands, metadata removed


class Computation(NamedTuple):
    name: str
    instrs: dict[str, Instr]
    root: str


def collective_bytes(hlo_text: str, device_slices: Sequence[int]) -> dict:
    """{"ici": {kind: bytes}, "dcn": {kind: bytes}, "counts": {"ici": {kind: n}, "dcn": {kind: n}},
    "sync": {"ici": {kind: bytes}, "dcn": ...}} per device per step. "sync" holds the collectives
    that the device waits for (not split into -start/-done, outside async computations and windowed
    einsums): those that XLA did not schedule to overlap other work. device_slices[i] is the slice
    index of the device with logical id i (partition id i, i.e. mesh.devices.flat[i] of the jitted
    program's mesh)."""
    comps, entry = _parse(hlo_text)
    slices, in_async = list(device_slices), _called_by(comps, "async-start")

    def visit(comp: Computation, ins: Instr, windowed: str | None) -> Counter:
        if found := _megascale(ins):
            kind, nbytes = found
            link, sync = "dcn", False
        elif found := _collective(comp, ins):
            kind, nbytes = found
            link = "dcn" if _crosses(_groups(ins.attrs, len(slices)), slices) else "ici"
            if kind == "collective-permute":
                kind = windowed or _around_windowed_loop(comps, comp, ins) or kind
            sync = not ins.opcode.endswith("-start") and windowed is None and comp.name not in in_async
        if not found:
            return Counter()
        return Counter({("bytes", link, kind): nbytes, ("counts", link, kind): 1, ("sync", link, kind): sync * nbytes})

    acc = _per_execution(comps, entry, visit)

    def by_link(field: str) -> dict:
        return {link: {kind: acc[field, link, kind] for kind in KINDS} for link in ("ici", "dcn")}

    return {**by_link("bytes"), "counts": by_link("counts"), "sync": by_link("sync")}


def matmul_flops(hlo_text: str) -> int:
    """FLOPs of the dots and convolutions per device per execution of the entry computation."""
    comps, entry = _parse(hlo_text)
    return _per_execution(comps, entry, lambda comp, ins, _: Counter(flops=_matmul_flops(comp, ins)))["flops"]


class OpCost(NamedTuple):
    """One operation's work per execution of the entry (its executions summed)."""
    flops: int  # matmul FLOPs (dots and convolutions, also those fused into it)
    hbm_bytes: int  # read from and written to HBM (not on-chip memories)
    host_bytes: int  # moved between the device and host memory (offloaded activations)


# Ops that move no data of their own, and collectives (collective_bytes counts those).
_NO_TRAFFIC = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "while", "call", "conditional",
               "after-all", "partition-id", "replica-id", "opt-barrier", "async-start", "async-update", "send", "recv",
               "iota"}
_HBM, _HOST = "0", "5"  # memory spaces: S(1) and up are on-chip memories, except pinned host memory S(5)


def op_costs(hlo_text: str) -> dict[str, OpCost]:
    """OpCost of each operation that one execution of the entry runs, by instruction name: the ops
    of the entry and of the loops, calls and async computations it runs (a fusion is one op)."""
    comps, entry = _parse(hlo_text)
    fused, flops = _called_by(comps, "fusion"), functools.cache(lambda name: _fused_flops(comps, name))

    def visit(comp: Computation, ins: Instr, _) -> Counter:
        base = ins.opcode.removesuffix("-start").removesuffix("-done")
        if comp.name in fused or ins.opcode in _NO_TRAFFIC or base in KINDS or ins.opcode.endswith("-done") \
                or ins.opcode == "custom-call" and '"AllocateBuffer"' in ins.attrs:
            return Counter()
        if ins.opcode.endswith("-start"):  # `op-start` returns ((operands...), result, context): it is `op`
            ins = ins._replace(opcode=base, shape=_split_top(ins.shape[1:-1])[1])
        moved = _traffic(comps, comp, ins)
        work = flops(_attr(ins, "calls")) if ins.opcode == "fusion" else _matmul_flops(comp, ins)
        return Counter({(ins.name, "flops"): work, (ins.name, _HBM): moved.get(_HBM, 0),
                        (ins.name, _HOST): moved.get(_HOST, 0)})

    acc = _per_execution(comps, entry, visit)
    names = {name for name, _ in acc}
    return {n: OpCost(acc[n, "flops"], acc[n, _HBM], acc[n, _HOST]) for n in sorted(names)}


def _called_by(comps: dict, opcode: str) -> set[str]:
    """The computations that instructions with `opcode` call (`calls=`)."""
    return {_attr(i, "calls") for c in comps.values() for i in c.instrs.values() if i.opcode == opcode}


def _fused_flops(comps: dict, name: str) -> int:
    comp = comps[name]
    return sum(_fused_flops(comps, _attr(i, "calls")) if i.opcode == "fusion" else _matmul_flops(comp, i)
               for i in comp.instrs.values())


def _spaces(shape: str) -> Counter:
    """Bytes of an (array or tuple) shape by memory space ("0" HBM, "5" host, ...)."""
    out = Counter()
    for dtype, dims, layout in _LAID_OUT.findall(shape):
        space = re.search(r"S\((\d+)\)", layout or "")
        out[space[1] if space else _HBM] += _shape_bytes(f"{dtype}[{dims}]")
    return out


def _traffic(comps: dict, comp: Computation, ins: Instr) -> Counter:
    """Bytes that `ins` reads and writes, by memory space. A slice reads only what it returns, an
    in-place update writes only the update; inside a fusion likewise for each fused parameter. A
    transfer between host and device memory (offloading) counts its bytes once in each."""
    operands = [comp.instrs[o].shape for o in ins.operands]
    if ins.opcode == "fusion":
        return _fusion_traffic(comps, comps[_attr(ins, "calls")], operands, ins.shape)
    read = [_spaces(s) for s in operands]
    written = _spaces(ins.shape)
    if ins.opcode in ("dynamic-slice", "slice", "gather"):
        read[0] = _as_read(read[0], written)
    elif ins.opcode in ("dynamic-update-slice", "scatter"):
        update = read[1] if ins.opcode == "dynamic-update-slice" else read[2]
        read[0], written = Counter(), _as_read(written, update)
    return sum(read, Counter()) + written


def _as_read(source: Counter, result: Counter) -> Counter:
    """The bytes of `result` counted in the memory space of `source` (where a slice reads them from)."""
    space = max(source, key=source.get) if source else _HBM
    return Counter({space: sum(result.values())})


def _fusion_traffic(comps: dict, callee: Computation, operands: list[str], result: str) -> Counter:
    """A fusion's traffic: each operand whole, unless the fused computation only slices it (the
    slices' bytes) or updates it in place (nothing); the result whole, or only the in-place updates."""
    roots = [callee.instrs[callee.root]]
    if roots[0].opcode == "tuple":
        roots = [callee.instrs[o] for o in roots[0].operands]
    in_place = {r.operands[0] for r in roots if r.opcode == "dynamic-update-slice"}
    params = {int(i.operands[0]): i.name for i in callee.instrs.values() if i.opcode == "parameter"}
    total = Counter()
    for index, shape in enumerate(operands):
        if params.get(index) in in_place:
            continue
        sliced = _sliced(comps, callee, params.get(index))
        total += _spaces(shape) if sliced is None else _as_read(_spaces(shape), sliced)
    outputs = _split_top(result[1:-1]) if result.startswith("(") else [result]
    for root, shape in zip(roots, outputs):
        if root.opcode == "dynamic-update-slice":
            total += _as_read(_spaces(shape), _spaces(callee.instrs[root.operands[1]].shape))
        else:
            total += _spaces(shape)
    return total


def _sliced(comps: dict, comp: Computation, param: str | None) -> Counter | None:
    """The bytes that slices of the fused parameter `param` read, if slicing is all that `comp` does
    with it (also through fusions nested in it, as a layer's slice of stacked weights or saved
    inputs often is); None if something reads it whole."""
    if param is None:
        return None
    uses = [(i, k) for i in comp.instrs.values() for k, o in enumerate(i.operands) if o == param]
    if not uses:
        return None
    read = Counter()
    for user, k in uses:
        if user.opcode in ("dynamic-slice", "slice", "gather") and k == 0:
            read += _spaces(user.shape)
            continue
        nested = comps[_attr(user, "calls")] if user.opcode == "fusion" else None
        inner = nested and next((i.name for i in nested.instrs.values()
                                 if i.opcode == "parameter" and int(i.operands[0]) == k), None)
        part = _sliced(comps, nested, inner) if inner else None
        if part is None:
            return None
        read += part
    return read


def _per_execution(comps: dict, entry: str, visit) -> Counter:
    """The sum of visit(computation, instruction, windowed) over the instructions that one execution
    of the entry runs, each weighted by how often its computation runs (loops by their trip counts).
    `windowed` is the collective that the windowed-einsum loop around the instruction implements
    ("all-gather" or "reduce-scatter"), None outside such loops."""

    @functools.cache
    def totals(name: str, windowed: str | None) -> Counter:
        comp, acc = comps[name], Counter()
        for ins in comp.instrs.values():
            acc.update(visit(comp, ins, windowed))
            for callee, times in _callees(comps, comp, ins):
                for key, value in totals(callee, _windowed_kind(callee) or windowed).items():
                    acc[key] += times * value
        return acc

    return totals(entry, None)


# --- parsing ---

def _parse(text: str) -> tuple[dict[str, Computation], str]:
    """The module's computations by name, and the entry's name."""
    comps, entry, instrs, name, root = {}, None, None, None, None
    for line in text.splitlines():
        line = _COMMENT.sub("", line).strip()
        if instrs is None:
            if m := _HEADER.match(line):
                instrs, name, root = {}, m[2], None
                entry = name if m[1] else entry
        elif line == "}" or line.startswith("},"):  # `}, execution_thread="sparsecore"` ends one too
            comps[name], instrs = Computation(name, _with_element_refs(instrs), root), None
        elif m := _INSTR.match(line):
            instrs[m[2]] = _instr(m[2], m[3])
            root = m[2] if m[1] else root
    return comps, entry


def _with_element_refs(instrs: dict[str, Instr]) -> dict[str, Instr]:
    """Operands may name a tuple's element as `%t#1`: each such name becomes the get-tuple-element
    it stands for, so that every operand is an instruction of the computation."""
    refs = {o for ins in instrs.values() for o in ins.operands if "#" in o and o not in instrs}
    for ref in sorted(refs):
        tuple_name, index = ref.rsplit("#", 1)
        shape = _split_top(instrs[tuple_name].shape[1:-1])[int(index)].strip()
        instrs[ref] = Instr(ref, shape, "get-tuple-element", [tuple_name], f", index={index}")
    return instrs


def _instr(name: str, text: str) -> Instr:
    """`SHAPE opcode(operands), attrs`; a tuple SHAPE is parenthesised and may hold spaces."""
    end = _closing(text, 0) + 1 if text.startswith("(") else text.index(" ")
    shape, rest = text[:end], text[end:].lstrip()
    open_ = rest.index("(")
    close = _closing(rest, open_)
    # An operand may be printed with its shape: `f32[8]{0} %x`; the name is the last word.
    operands = [o.split()[-1].lstrip("%") for o in _split_top(rest[open_ + 1:close]) if o.strip()]
    return Instr(name, shape, rest[:open_], operands, _METADATA.sub("", rest[close + 1:]))


def _closing(text: str, start: int) -> int:
    """Index of the bracket that closes the one at text[start]."""
    depth = 0
    for i in range(start, len(text)):
        depth += (text[i] in "([{") - (text[i] in ")]}")
        if depth == 0:
            return i
    raise ValueError(f"unbalanced HLO text: {text[start:start + 80]!r}")


def _split_top(text: str) -> list[str]:
    """Split at the commas outside any brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += (ch in "([{") - (ch in ")]}")
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return parts + [text[start:]]


def _attr(ins: Instr, key: str) -> str | None:
    m = re.search(rf"\b{key}=%?([\w.\-]+)", ins.attrs)
    return m[1] if m else None


# --- collectives ---

def _shape_bytes(shape: str) -> int:
    """Bytes of an array or (nested) tuple shape: the sum of its arrays."""
    total = 0
    for dtype, dims in _ARRAY.findall(shape):
        size = 1 if dtype.startswith("f8") else _ELEMENT_BYTES.get(dtype)
        if size is None:
            raise ValueError(f"unknown HLO element type {dtype!r} in {shape!r}")
        total += size * math.prod(int(d.strip().lstrip("<=")) for d in dims.split(",") if d.strip())
    return total


def _collective(comp: Computation, ins: Instr) -> tuple[str, int] | None:
    """(kind, bytes) of the collective that starts at `ins`, None if none does. A generic
    async-start's collective is counted inside the computation it calls."""
    kind = ins.opcode.removesuffix("-start")
    if kind not in KINDS:
        return None
    if kind == "reduce-scatter":
        return kind, sum(_shape_bytes(comp.instrs[o].shape) for o in ins.operands)
    shape = ins.shape
    if ins.opcode in _OPERAND_RESULT_STARTS and shape.startswith("("):
        shape = _split_top(shape[1:-1])[1]
    return kind, _shape_bytes(shape)


# Over several slices, XLA:TPU compiles one slice's program: its replica groups stay within the
# slice, and what crosses slices becomes a pair of host-transfer send/recv ops for the Megascale
# runtime, tagged with the collective they carry out.
_MEGASCALE = re.compile(r'_xla_megascale_transfer_type="?(\w+)')
_MEGASCALE_KINDS = {"ALL_GATHER": "all-gather", "REDUCE_SCATTER": "reduce-scatter", "ALL_REDUCE": "all-reduce",
                    "ALL_TO_ALL": "all-to-all", "ONE_TO_ONE": "collective-permute"}


def _megascale(ins: Instr) -> tuple[str, int] | None:
    """(kind, bytes) of a collective between slices, counted once: at its recv (whose buffer is the
    result), or for a reduce-scatter at its send (the un-scattered input)."""
    m = _MEGASCALE.search(ins.attrs) if ins.opcode in ("send", "recv") else None
    if m is None:
        return None
    if m[1] not in _MEGASCALE_KINDS:
        raise ValueError(f"unknown Megascale transfer type {m[1]!r} in {ins.name}")
    kind = _MEGASCALE_KINDS[m[1]]
    if (ins.opcode == "send") != (kind == "reduce-scatter"):
        return None
    return kind, _shape_bytes(_split_top(ins.shape[1:-1])[0])  # (data, context, token)


def _groups(attrs: str, num_devices: int) -> list[list[int]]:
    """Device groups of `replica_groups` (explicit or iota form) or the pairs of a permute."""
    m = _GROUPS.search(attrs)
    text = m[1] if m else "{}"
    if iota := _IOTA.fullmatch(text):
        shape, dims, perm = ([int(x) for x in g.split(",")] if g else None for g in iota.groups())
        ids = np.arange(math.prod(dims)).reshape(dims)
        ids = ids.transpose(perm) if perm else ids
        return ids.reshape(shape[0], -1).tolist()
    groups = [[int(x) for x in g.split(",") if x.strip()] for g in re.findall(r"\{([\d,\s]*)\}", text)]
    return [g for g in groups if g] or [list(range(num_devices))]  # {}: all devices


def _crosses(groups: list[list[int]], slices: list[int]) -> bool:
    return any(len({slices[d] for d in group}) > 1 for group in groups)


# --- windowed einsums ---

_WINDOWED_BODY = re.compile(r"windowed_dot_general_body_(ag|rs)")


def _windowed_kind(computation: str) -> str | None:
    """The collective that a windowed-einsum loop body implements, from the name XLA gives it."""
    m = _WINDOWED_BODY.search(computation)
    return {"ag": "all-gather", "rs": "reduce-scatter"}[m[1]] if m else None


def _around_windowed_loop(comps: dict, comp: Computation, ins: Instr) -> str | None:
    """The collective of the windowed-einsum loop that the permute `ins` belongs to from outside: XLA
    may send the first shard before the loop starts (the permute feeds the loop's initial state), and
    a bidirectional reduce-scatter sends its last partial sum after it (the permute takes the loop's
    result). None if neither."""
    for loop in comp.instrs.values():
        kind = loop.opcode == "while" and _windowed_kind(_attr(loop, "body"))
        if kind and ins.name in _inputs(comp, loop.operands[0]):
            return kind
    source = comp.instrs[ins.operands[0]]
    while source.opcode == "get-tuple-element" or _moves(source):
        source = comp.instrs[source.operands[0]]
    return _windowed_kind(_attr(source, "body")) if source.opcode == "while" else None


def _inputs(comp: Computation, name: str) -> set[str]:
    """`name` and the instructions whose results it is made of, through tuples and moves."""
    ins = comp.instrs[name]
    if ins.opcode == "tuple":
        return {name}.union(*(_inputs(comp, o) for o in ins.operands))
    if _moves(ins):
        return {name} | _inputs(comp, ins.operands[0])
    return {name}


def _moves(ins: Instr) -> bool:
    """Whether `ins` hands on its first operand's data: copies, also async ones between memory spaces
    (copy-start, copy-done), reshapes, and the -done half of an async pair."""
    return ins.opcode in _PASS_THROUGH or ins.opcode == "copy-start" or ins.opcode.endswith("-done")


# --- matmuls ---

def _dims(shape: str) -> list[int]:
    """The dimensions of an array shape such as `bf16[8,128]{1,0}`."""
    dims = _ARRAY.match(shape)[2]
    return [int(d.strip().lstrip("<=")) for d in dims.split(",") if d.strip()]


def _matmul_flops(comp: Computation, ins: Instr) -> int:
    """2 x (products summed into the result): each product is a multiply and an add."""
    if ins.opcode == "dot":
        lhs = _dims(comp.instrs[ins.operands[0]].shape)
        contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.attrs)
        summed = math.prod(lhs[int(d)] for d in contracting[1].split(",") if d) if contracting else 1
        return 2 * math.prod(_dims(ins.shape)) * summed
    if ins.opcode == "convolution":
        return 2 * _conv_products(comp, ins)
    return 0


def _conv_products(comp: Computation, ins: Instr) -> int:
    """Multiply-adds of a convolution: for each output batch and feature element, the kernel's input
    features (one feature group's) times the (output position, window tap) pairs that fall on real
    input. XLA:TPU writes batched matmuls as convolutions whose window slides over zero padding, so
    counting every tap of the window would count the padding too."""
    lhs_labels, rhs_labels, out_labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", ins.attrs).groups()
    lhs, rhs = (_dims(comp.instrs[o].shape) for o in ins.operands[:2])
    out = _dims(ins.shape)
    products = rhs[rhs_labels.index("i")]
    products *= math.prod(size for size, label in zip(out, out_labels) if not label.isdigit())
    for d, window in enumerate(_window(ins.attrs, sum(c.isdigit() for c in out_labels))):
        products *= _taps_on_input(lhs[lhs_labels.index(str(d))], out[out_labels.index(str(d))], **window)
    return products


def _window(attrs: str, rank: int) -> list[dict]:
    """Per spatial dimension: size, stride, padding and dilations of a convolution's `window={...}`."""
    m = re.search(r"window=\{([^}]*)\}", attrs)
    fields = dict(f.split("=") for f in m[1].split()) if m else {}

    def each(key: str, default: str) -> list[str]:
        return fields[key].split("x") if key in fields else [default] * rank

    return [dict(size=int(size), stride=int(stride), low=int(pad.split("_")[0]), lhs_dilate=int(ld), rhs_dilate=int(rd))
            for size, stride, pad, ld, rd in zip(each("size", "1"), each("stride", "1"), each("pad", "0_0"),
                                                each("lhs_dilate", "1"), each("rhs_dilate", "1"))]


def _taps_on_input(n: int, outputs: int, size: int, stride: int, low: int, lhs_dilate: int, rhs_dilate: int) -> int:
    """(output position, window tap) pairs of one spatial dimension whose input position holds an
    element of the n-long input (not padding, nor a hole of lhs dilation)."""
    last = (n - 1) * lhs_dilate  # the input's last position once dilated
    if lhs_dilate > 1:  # rare (gradients of strided convolutions): count one by one
        return sum(0 <= p <= last and p % lhs_dilate == 0
                   for o in range(outputs) for k in range(size) for p in [o * stride + k * rhs_dilate - low])
    pairs = 0
    for k in range(size):  # outputs o with 0 <= o * stride + k * rhs_dilate - low <= last
        first_o = max(0, -(-(low - k * rhs_dilate) // stride))
        last_o = min(outputs - 1, (last + low - k * rhs_dilate) // stride)
        pairs += max(0, last_o - first_o + 1)
    return pairs


# --- control flow ---

def _callees(comps: dict, comp: Computation, ins: Instr) -> list[tuple[str, int]]:
    """(computation, executions per execution of `ins`) for each computation `ins` runs. Reducers
    (`to_apply` of collectives and reductions) and async-done's `calls` are not followed."""
    if ins.opcode == "while":
        known = _TRIP_COUNT.search(ins.attrs)
        n = int(known[1]) if known else _derived_trip_count(comps, comp, ins)
        n = 1 if n is None else n
        return [(_attr(ins, "body"), n), (_attr(ins, "condition"), n + 1)]  # the condition runs once more
    if ins.opcode in ("fusion", "async-start"):
        return [(_attr(ins, "calls"), 1)]
    if ins.opcode == "call":
        return [(_attr(ins, "to_apply"), 1)]
    if ins.opcode == "conditional":  # one branch runs; count each once
        m = re.search(r"branch_computations=\{([^}]*)\}", ins.attrs)
        names = m[1].split(",") if m else [_attr(ins, "true_computation"), _attr(ins, "false_computation")]
        return [(name.strip().lstrip("%"), 1) for name in names if name]
    return []


def _derived_trip_count(comps: dict, comp: Computation, loop: Instr) -> int | None:
    """Trip count of `for (i = start; i CMP bound; i += step)` read from the loop's init tuple, its
    condition's compare and its body's root; None if the loop has another form."""
    cond, body = comps[_attr(loop, "condition")], comps[_attr(loop, "body")]
    ccomp, compare, couter = _source(comps, cond, cond.root, None)
    if compare.opcode != "compare":
        return None
    a, b = (_value(comps, ccomp, o, couter) for o in compare.operands)
    direction = re.search(r"direction=(\w+)", compare.attrs)[1]
    if a and a[0] is None:
        a, b, direction = b, a, _MIRROR.get(direction, direction)
    if not (a and b and a[0] is not None and b[0] is None):
        return None
    k, bound = a[0], b[1] - a[1]
    start = _element(comps, comp, loop.operands[0], k, None)
    step = _element(comps, body, body.root, k, None)
    if not (start and step and start[0] is None and step[0] == k):
        return None
    start, step = start[1], step[1]
    if direction in ("GT", "GE"):  # a count-down loop, mirrored into a count-up one
        start, bound, step, direction = -start, -bound, -step, _MIRROR[direction]
    if step <= 0 or direction not in ("LT", "LE"):
        return None
    if direction == "LE":  # i <= bound is i < bound + 1 for integers
        bound += 1
    return max(0, -(-(bound - start) // step))


def _source(comps: dict, comp: Computation, name: str, outer):
    """(computation, instruction, outer) that defines `name`, seen through copies, fusions and
    fusion parameters; `outer` is (computation, fusion operands, its outer) inside a fusion."""
    ins = comp.instrs[name]
    if ins.opcode in _PASS_THROUGH:
        return _source(comps, comp, ins.operands[0], outer)
    if ins.opcode == "parameter" and outer:
        outer_comp, args, outer_outer = outer
        return _source(comps, outer_comp, args[int(ins.operands[0])], outer_outer)
    if ins.opcode == "fusion":
        callee = comps[_attr(ins, "calls")]
        return _source(comps, callee, callee.root, (comp, ins.operands, outer))
    return comp, ins, outer


def _value(comps: dict, comp: Computation, name: str, outer) -> tuple[int | None, int] | None:
    """(k, c) if `name` is loop-state element k plus the constant c (k None: the constant c)."""
    comp, ins, outer = _source(comps, comp, name, outer)
    if ins.opcode == "constant":
        return (None, int(ins.operands[0])) if re.fullmatch(r"-?\d+", ins.operands[0]) else None
    if ins.opcode == "get-tuple-element":
        return _element(comps, comp, ins.operands[0], int(re.search(r"index=(\d+)", ins.attrs)[1]), outer)
    if ins.opcode in ("add", "subtract"):
        x, y = (_value(comps, comp, o, outer) for o in ins.operands)
        if ins.opcode == "add" and x and x[0] is None:
            x, y = y, x
        if x and y and y[0] is None:
            return x[0], (x[1] + y[1] if ins.opcode == "add" else x[1] - y[1])
    return None


def _element(comps: dict, comp: Computation, name: str, k: int, outer):
    """`_value` of element k of the tuple `name`: the loop state's own if `name` is the state."""
    comp, ins, outer = _source(comps, comp, name, outer)
    if ins.opcode == "parameter":
        return k, 0
    if ins.opcode == "tuple":
        return _value(comps, comp, ins.operands[k], outer)
    return None
