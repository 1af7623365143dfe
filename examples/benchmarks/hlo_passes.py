"""The passes over large arrays in a compiled XLA program, with the bytes each moves.

Reads the optimized HLO text of a compiled function (``jax.jit(f).lower(...).compile()``)
and lists every top-level instruction that reads or writes an array of at least
``min_elements`` elements: fusions, copies, dots, dynamic-update-slices and the
instructions inside ``while`` bodies (scans, counted ``trip_count`` times) and
``conditional`` branches. Each row gives the op, the large arrays it reads and
writes and their bytes, so that a step's passes can be compared with the bytes the
algorithm must move. ``optimizer_overhead.py`` reports it for the mL-BFGS step.
"""

from __future__ import annotations

import dataclasses
import math
import re

_DTYPE_BYTES = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s64": 8,
                "u64": 8, "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2}
_ARRAY = re.compile(r"\b(f64|f32|bf16|f16|s32|u32|s64|u64|pred|s8|u8|s16|u16)\[([0-9,]*)\]")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+([\w\-]+)\((.*)$")
_COMP = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_SKIP = {"parameter", "tuple", "get-tuple-element", "bitcast", "constant", "after-all",
         "partition-id", "replica-id", "opt-barrier"}


def _arrays(type_text: str) -> list[tuple[str, int]]:
    """(dtype, elements) of every array in an HLO type (a tuple type lists several)."""
    out = []
    for dt, dims in _ARRAY.findall(type_text):
        out.append((dt, math.prod(int(d) for d in dims.split(",") if d) if dims else 1))
    return out


@dataclasses.dataclass
class Pass:
    """One instruction that touches large arrays.

    Attributes:
      computation: the HLO computation it is in (``ENTRY`` or a loop body/branch).
      name: the instruction's name.
      op: the opcode, with the fusion kind for fusions.
      times: how often it runs per call (a loop body's trip count, else 1).
      read_bytes: bytes of the large operands it reads.
      write_bytes: bytes of the large arrays it writes.
      detail: the large operand and output types, and the JAX operation it came from.
      scope: the first of the ``scopes`` given to :func:`passes` (``jax.named_scope``
        names) in the instruction's ``op_name``, or ``""``.
    """

    computation: str
    name: str
    op: str
    times: int
    read_bytes: int
    write_bytes: int
    detail: str
    scope: str = ""

    @property
    def total_bytes(self) -> int:
        return self.times * (self.read_bytes + self.write_bytes)


def _computations(hlo: str) -> dict[str, list[str]]:
    comps, current, entry = {}, None, None
    for line in hlo.splitlines():
        m = _COMP.match(line) if not line[:1].isspace() else None
        if m:
            current = m.group(2)
            if m.group(1):
                entry = current
            comps[current] = []
        elif line.strip() == "}":
            current = None
        elif current is not None:
            comps[current].append(line)
    comps["__entry__"] = [entry]
    return comps


def passes(hlo: str, min_elements: int = 1 << 16, scopes: tuple = ()) -> list[Pass]:
    """The passes over arrays of at least ``min_elements`` elements in optimized HLO text.

    ``scopes``: ``jax.named_scope`` names to attribute each pass to (see :class:`Pass`).
    """
    comps = _computations(hlo)
    entry = comps.pop("__entry__")[0]
    out: list[Pass] = []

    def op_path(rest: str) -> str:
        source = re.search(r'op_name="([^"]*)"', rest)
        return source.group(1) if source else ""

    def scope_of(rest: str, inherited: str) -> str:
        path = op_path(rest)
        return next((sc for sc in scopes if f"/{sc}/" in path), inherited)

    def walk(comp: str, times: int, inherited: str = "") -> None:
        shapes: dict[str, str] = {}
        for line in comps.get(comp, []):
            m = _INSTR.match(line)
            if not m:
                continue
            name, type_text, op, rest = m.group(2), m.group(3), m.group(4), m.group(5)
            shapes[name] = type_text
            if op == "while":
                body = re.search(r"body=%?([\w.\-]+)", rest).group(1)
                trip = re.search(r'"known_trip_count":\{"n":"(\d+)"', rest)
                walk(body, times * (int(trip.group(1)) if trip else 1),
                     scope_of(rest, inherited))
                continue
            if op == "conditional":
                branches = re.search(r"branch_computations=\{([^}]*)\}", rest)
                names = (branches.group(1).split(",") if branches else
                         re.findall(r"(?:true|false)_computation=%?([\w.\-]+)", rest))
                for b in names:
                    b = b.strip().lstrip("%")
                    # A branch takes the first scope named inside it (its ops carry the
                    # branch function's name scope), else the conditional's.
                    inner = next((scope_of(line, "") for line in comps.get(b, [])
                                  if scope_of(line, "")), "")
                    walk(b, times, inner or scope_of(rest, inherited))
            if op in _SKIP or op in ("while", "conditional", "call"):
                continue
            args = rest.split("), ")[0]
            operands = re.findall(r"%([\w.\-]+)", args)
            reads = [(o, shapes.get(o, "")) for o in operands]
            big_in = [(o, t) for o, t in reads
                      if any(e >= min_elements for _, e in _arrays(t))]
            big_out = [(dt, e) for dt, e in _arrays(type_text) if e >= min_elements]
            if not big_in and not big_out:
                continue
            path = op_path(rest)
            last = path.split("/")[-1]
            nbytes = lambda t: sum(_DTYPE_BYTES[dt] * e for dt, e in _arrays(t)
                                   if e >= min_elements)
            wb = sum(_DTYPE_BYTES[dt] * e for dt, e in big_out)
            out_type = type_text.split("{")[0].strip()
            if op in ("slice", "dynamic-slice", "gather") or last in (
                    "slice", "dynamic_slice", "gather"):
                rb = wb  # reads only the part it writes
            elif op in ("dynamic-update-slice", "scatter") or last in (
                    "dynamic_update_slice", "scatter"):
                # In place: the operand shaped like the output is not read; the update is
                # read and written.
                upd = [t for _, t in big_in if t.split("{")[0].strip() != out_type]
                rb = wb = sum(nbytes(t) for t in upd)
            else:
                rb = sum(nbytes(t) for _, t in big_in)
            kind = re.search(r"kind=(k\w+)", rest)
            label = f"{op}:{kind.group(1)}" if kind else op
            detail = " ".join(t.split("{")[0] for _, t in big_in) + " -> " + " ".join(
                f"{dt}[{e}]" for dt, e in big_out)
            if path:
                detail += "  (" + last + ")"
            scope = scope_of(rest, inherited)
            out.append(Pass(comp, name, label, times, rb, wb, detail, scope))

    walk(entry, 1)
    return out


def words(rows: list[Pass], word_bytes: float, skip: tuple = ()) -> float:
    """Words per parameter moved by ``rows``, leaving out the passes of the ``skip`` scopes."""
    return sum(p.total_bytes for p in rows if p.scope not in skip) / word_bytes
