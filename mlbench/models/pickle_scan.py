"""Scanning a pickle without unpickling it: what it would import, how deep and how large it is.

:func:`scan_pickle` runs the pickle machine on stand-ins: every opcode moves small records on a
stack and a memo as the real unpickler would move objects, so the globals it names are found in
every form (``GLOBAL``, ``INST``, ``STACK_GLOBAL`` with unicode or byte-string names, direct or
from the memo, ``EXT*`` codes), and the nesting depth and the size of what it would build
(shared references expanded, as a ``repr`` or ``hash`` walks them) are known before anything is
built. It loops, never recurses, and stops at the first budget it meets: opcodes, depth,
expanded objects, memo and stack entries, tensors, declared tensor bytes, seconds.
"""

from __future__ import annotations

import io
import pickletools
from dataclasses import dataclass

from mlbench.budgets import Budgets, Deadline, budget_error
from mlbench.errors import WeightsError

__all__ = ["PickleScan", "scan_pickle", "COMPUTED"]

COMPUTED = "<a global whose name is computed while unpickling>"
"""How :func:`scan_pickle` lists a ``STACK_GLOBAL`` whose names are not literal strings."""
_TENSOR_CALLS = ("torch._utils._rebuild_tensor", "torch._utils._rebuild_meta", "torch._utils._rebuild_device",
                 "torch._utils._rebuild_qtensor", "torch._utils._rebuild_sparse", "torch._utils._rebuild_nested",
                 "torch._utils._rebuild_wrapper", "torch._tensor._rebuild")
_ELEMENT_BYTES = {"Double": 8, "Float": 4, "Half": 2, "BFloat16": 2, "Long": 8, "Int": 4, "Short": 2, "Char": 1,
                  "Byte": 1, "Bool": 1, "ComplexFloat": 8, "ComplexDouble": 16, "QInt32": 4, "QInt8": 1,
                  "QUInt8": 1, "QUInt4x2": 1, "QUInt2x4": 1, "Untyped": 1}


@dataclass(frozen=True)
class PickleScan:
    """What one pickle would do: the globals it names (sorted, each once), the tensors it builds,
    the bytes of tensor storage it declares, and its opcodes, depth and expanded object count."""

    globals: tuple[str, ...]
    tensors: int
    storage_bytes: int
    ops: int
    depth: int
    objects: int


class _Node:
    """A stand-in for one unpickled object: its depth, its expanded size, and for small literals
    (strings, ints, short tuples) the value needed to read names and storage records."""

    __slots__ = ("kind", "depth", "size", "placed", "value")

    def __init__(self, kind: str, depth: int = 0, size: int = 1, value=None) -> None:
        self.kind, self.depth, self.size, self.placed, self.value = kind, depth, size, False, value


_LEAF = _Node("leaf")


def _malformed(message: str) -> WeightsError:
    exc = WeightsError(f"the pickle is malformed ({message}); nothing was unpickled. The file is damaged or was "
                       "written by hand: restore a good copy or re-save it with torch.save(model.state_dict())")
    exc.code = "unreadable_pickle"
    return exc


class _Machine:
    """The pickle machine on stand-ins; :meth:`run` is the loop."""

    def __init__(self, limits: Budgets, deadline: Deadline) -> None:
        self.limits, self.deadline = limits, deadline
        self.stack: list[_Node] = []
        self.marks: list[int] = []
        self.memo: dict[int | str, _Node] = {}
        self.globals: set[str] = set()
        self.storages: dict[str, int] = {}
        self.storage_bytes = 0
        self.tensor_calls = self.depth = self.objects = 0
        self.cap = limits.max_pickle_objects + 1

    def pop(self, n: int = 1) -> list[_Node]:
        floor = self.marks[-1] if self.marks else 0
        if len(self.stack) - n < floor:
            raise _malformed("stack underflow")
        items = self.stack[len(self.stack) - n:]
        del self.stack[len(self.stack) - n:]
        return items

    def pop_mark(self) -> list[_Node]:
        if not self.marks:
            raise _malformed("no MARK before an opcode that needs one")
        start = self.marks.pop()
        items = self.stack[start:]
        del self.stack[start:]
        return items

    def push(self, node: _Node) -> None:
        self.stack.append(node)
        if len(self.stack) + len(self.marks) > self.limits.max_pickle_memo:
            raise budget_error(WeightsError, "max_pickle_memo", self.limits.max_pickle_memo,
                               "the unpickler's stack", len(self.stack) + len(self.marks), " entries")

    def build(self, children: list[_Node], kind: str = "obj", keep: bool = False) -> _Node:
        """A new container or object holding ``children``; ``keep`` keeps them (short tuples)."""
        node = _Node(kind, 1, 1, list(children) if keep and len(children) <= 6 else None)
        self.fill(node, children, new=True)
        return node

    def fill(self, node: _Node, children: list[_Node], new: bool = False) -> None:
        if node.kind in ("leaf", "str", "int"):
            raise _malformed(f"items added to a {node.kind}")
        if node.placed and not new:
            raise _malformed("a container is filled after it was placed inside another, so its depth and size "
                             "cannot be bounded before loading (a shape only hand-made pickles have)")
        for child in children:
            child.placed = True
            node.depth = max(node.depth, child.depth + 1)
            node.size = min(node.size + child.size, self.cap)
        self.measure(node)

    def measure(self, node: _Node) -> None:
        limits = self.limits
        if node.depth > limits.max_pickle_depth:
            raise budget_error(WeightsError, "max_pickle_depth", limits.max_pickle_depth,
                               "the nesting depth of the pickle (a container inside a container ...)", node.depth)
        if node.size > limits.max_pickle_objects:
            raise budget_error(WeightsError, "max_pickle_objects", limits.max_pickle_objects, "the objects the pickle "
                               "builds once its shared references are expanded (what a repr or hash walks)",
                               node.size)
        self.depth, self.objects = max(self.depth, node.depth), max(self.objects, node.size)

    def call(self, callable_: _Node, args: list[_Node]) -> None:
        """Push the object a call (REDUCE, NEWOBJ, OBJ, INST) builds; count tensor rebuilds."""
        if callable_.kind == "global" and str(callable_.value).startswith(_TENSOR_CALLS):
            self.tensor_calls += 1
            self.count_tensors(self.tensor_calls)
        self.push(self.build(args))

    def count_tensors(self, count: int) -> None:
        if count > self.limits.max_tensors:
            raise budget_error(WeightsError, "max_tensors", self.limits.max_tensors, "the tensors in the pickle", count)

    def name_global(self, name: str) -> None:
        self.globals.add(name)
        self.push(_Node("global", value=name))

    def persistent(self, pid: _Node) -> None:
        """A storage record ``('storage', type, key, location, numel, ...)``: count it and its bytes."""
        items = pid.value if isinstance(pid.value, list) else []
        values = [item.value for item in items]
        if len(values) >= 5 and values[0] == "storage" and isinstance(values[4], int):
            kind = str(values[1]).rpartition(".")[2].removesuffix("Storage")
            key, size = str(values[2]), max(0, values[4]) * _ELEMENT_BYTES.get(kind, 8)
            self.storage_bytes += size - self.storages.get(key, 0)  # a running total: summing each time is quadratic
            self.storages[key] = size
            self.count_tensors(len(self.storages))
            if self.storage_bytes > self.limits.max_decompressed_bytes:
                raise budget_error(WeightsError, "max_decompressed_bytes", self.limits.max_decompressed_bytes,
                                   "the tensor storage the pickle declares", self.storage_bytes, " bytes")
        self.push(_Node("obj", 1, 1))


def _literal(kind: str):
    def handler(m: _Machine, arg) -> None:
        if kind == "int":
            m.push(_Node("int", value=int(arg)))
        elif isinstance(arg, (str, bytes, bytearray)) and len(arg) <= 256:  # names are short
            m.push(_Node("str", value=arg if isinstance(arg, str) else bytes(arg).decode("latin-1")))
        else:
            m.push(_LEAF)
    return handler


def _stack_global(m: _Machine, arg) -> None:
    module, name = m.pop(2)
    literal = module.kind == "str" and name.kind == "str" and module.value is not None and name.value is not None
    m.name_global(f"{module.value}.{name.value}" if literal else COMPUTED)


def _memo_get(m: _Machine, arg) -> None:
    if arg not in m.memo:
        raise _malformed(f"memo entry {arg!r} read before it was written")
    m.push(m.memo[arg])


def _memo_put(m: _Machine, arg) -> None:
    if not m.stack:
        raise _malformed("memo write with an empty stack")
    m.memo[len(m.memo) if arg is None else arg] = m.stack[-1]
    if len(m.memo) > m.limits.max_pickle_memo:
        raise budget_error(WeightsError, "max_pickle_memo", m.limits.max_pickle_memo, "the unpickler's memo",
                           len(m.memo), " entries")


def _mark(m: _Machine, arg) -> None:
    m.marks.append(len(m.stack))
    if len(m.stack) + len(m.marks) > m.limits.max_pickle_memo:
        raise budget_error(WeightsError, "max_pickle_memo", m.limits.max_pickle_memo, "the unpickler's stack",
                           len(m.stack) + len(m.marks), " entries")


def _fill_top(count: int | None):
    """APPEND/SETITEM (``count`` items) or APPENDS/SETITEMS/ADDITEMS (to the mark), BUILD (1 state)."""
    def handler(m: _Machine, arg) -> None:
        items = m.pop_mark() if count is None else m.pop(count)
        target = m.pop(1)[0]
        m.fill(target, items)
        m.push(target)
    return handler


def _reduce(m: _Machine, arg) -> None:
    callable_, args = m.pop(2)
    m.call(callable_, [args])


def _newobj(m: _Machine, arg) -> None:
    cls, args = m.pop(2)
    m.call(cls, [args])


def _newobj_ex(m: _Machine, arg) -> None:
    cls, args, kwargs = m.pop(3)
    m.call(cls, [args, kwargs])


def _obj(m: _Machine, arg) -> None:
    items = m.pop_mark()
    if not items:
        raise _malformed("OBJ without a class")
    m.call(items[0], items[1:])


def _inst(m: _Machine, arg) -> None:
    items = m.pop_mark()
    name = str(arg).replace(" ", ".")
    m.globals.add(name)
    m.call(_Node("global", value=name), items)


def _dup(m: _Machine, arg) -> None:
    m.push(m.pop(1)[0])
    m.push(m.stack[-1])


_HANDLERS = {
    **dict.fromkeys(("INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4"), _literal("int")),
    **dict.fromkeys(("STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE",
                     "BINUNICODE8", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8"), _literal("str")),
    **dict.fromkeys(("NONE", "NEWTRUE", "NEWFALSE", "FLOAT", "BINFLOAT", "NEXT_BUFFER"), lambda m, a: m.push(_LEAF)),
    **dict.fromkeys(("EMPTY_LIST", "EMPTY_DICT", "EMPTY_SET", "EMPTY_TUPLE"), lambda m, a: m.push(m.build([]))),
    **dict.fromkeys(("LIST", "DICT", "FROZENSET"), lambda m, a: m.push(m.build(m.pop_mark()))),
    "TUPLE": lambda m, a: m.push(m.build(m.pop_mark(), keep=True)),
    "TUPLE1": lambda m, a: m.push(m.build(m.pop(1), keep=True)),
    "TUPLE2": lambda m, a: m.push(m.build(m.pop(2), keep=True)),
    "TUPLE3": lambda m, a: m.push(m.build(m.pop(3), keep=True)),
    "APPEND": _fill_top(1), "SETITEM": _fill_top(2), "BUILD": _fill_top(1),
    **dict.fromkeys(("APPENDS", "SETITEMS", "ADDITEMS"), _fill_top(None)),
    **dict.fromkeys(("GET", "BINGET", "LONG_BINGET"), _memo_get),
    **dict.fromkeys(("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"), _memo_put),
    "MARK": _mark, "POP_MARK": lambda m, a: m.pop_mark(), "POP": lambda m, a: m.pop(1), "DUP": _dup,
    "GLOBAL": lambda m, a: m.name_global(str(a).replace(" ", ".")), "STACK_GLOBAL": _stack_global,
    **dict.fromkeys(("EXT1", "EXT2", "EXT4"), lambda m, a: m.name_global(f"<extension code {a}>")),
    "INST": _inst, "OBJ": _obj, "REDUCE": _reduce, "NEWOBJ": _newobj,
    "NEWOBJ_EX": _newobj_ex, "READONLY_BUFFER": lambda m, a: None,
    "PERSID": lambda m, a: m.persistent(_LEAF), "BINPERSID": lambda m, a: m.persistent(m.pop(1)[0]),
    **dict.fromkeys(("PROTO", "FRAME"), lambda m, a: None),
}


def scan_pickle(stream: io.BufferedIOBase, limits: Budgets, deadline: Deadline) -> PickleScan:
    """Scan one pickle from ``stream`` (left just after its STOP) without building anything.

    Parameters
    ----------
    stream : binary file object
        Positioned at the start of a pickle.
    limits : Budgets
        ``max_pickle_ops``, ``max_pickle_depth``, ``max_pickle_objects``, ``max_pickle_memo``,
        ``max_tensors`` and ``max_decompressed_bytes`` (the tensor storage it declares).
    deadline : Deadline
        The ``max_seconds`` clock of the whole file, checked every 4,096 opcodes.

    Returns
    -------
    PickleScan

    Raises
    ------
    WeightsError
        Past a budget (``budget`` attribute: its name), or for a malformed pickle (``code``
        attribute ``unreadable_pickle``); nothing was unpickled either way.
    """
    machine, ops = _Machine(limits, deadline), 0
    try:
        for opcode, arg, _ in pickletools.genops(stream):
            ops += 1
            if ops > limits.max_pickle_ops:
                raise budget_error(WeightsError, "max_pickle_ops", limits.max_pickle_ops, "the opcodes of the pickle",
                                   ops)
            if not ops & 0xFFF:
                deadline.check("scanning the pickle")
            if opcode.name == "STOP":
                break
            _HANDLERS[opcode.name](machine, arg)
    except WeightsError:
        raise
    except Exception as exc:  # genops: unknown opcode, truncated argument, bad protocol
        raise _malformed(f"{type(exc).__name__}: {exc}") from None
    tensors = max(machine.tensor_calls, len(machine.storages))
    return PickleScan(tuple(sorted(machine.globals)), tensors, machine.storage_bytes, ops, machine.depth,
                      machine.objects)
