# SPDX-License-Identifier: MIT
"""Board profiles: load and validate boards/<name>.toml into frozen BoardProfile objects.

A board profile says what a device offers a model: RAM and the share edgellm may use, peak
memory bandwidth and the sustained fraction of it, cores and required ISA features, the
quant types it may run, its backend and thermal limit. The build, selection and bench code
read profiles through this module only. docs/boards.md describes every field.

Usage:

    from edgellm.boards import load_board, list_boards, host_isa_features
    rpi5 = load_board("rpi5")                  # boards/rpi5.toml, validated
    rpi5.ram_budget_bytes                      # ram_mb * 2**20 * ram_share
    rpi5.required_isa_missing(host_isa_features())
    host = load_board("x86-host", bandwidth_gbs=calibrate_bandwidth())   # this machine
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
import platform
import re
import sys
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .errors import EdgeLLMError, InvalidArgumentError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.9/3.10: tomli is the same parser, before it joined the stdlib
    import tomli as tomllib

__all__ = [
    "ARCHES", "BACKENDS", "ISA_FEATURES", "QUANT_TYPES", "SCHEMA_VERSION", "BoardProfile",
    "BoardProfileError", "UnknownBoardError", "boards_dir", "calibrate_bandwidth",
    "calibration_toml", "default_calibration_mib", "field_sources", "format_profile",
    "format_table", "host_arch", "host_cpu_name", "host_isa_features", "list_boards", "load_all",
    "load_board", "parse_board", "translate_cpu_features", "usable_cpus", "with_bandwidth",
]

SCHEMA_VERSION = 1
"""The `schema` value this loader reads; a profile with another one is refused."""

ISA_FEATURES = ("neon", "dotprod", "fp16", "i8mm", "sve",
                "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni")
"""The ISA feature vocabulary of `isa_features` (Arm names first, then x86)."""

_ARM_FEATURES = frozenset({"neon", "dotprod", "fp16", "i8mm", "sve"})
_AARCH64_ONLY = frozenset({"dotprod", "i8mm", "sve"})  # Armv8.2+ extensions: no armv7 has them

ARCHES = ("aarch64", "armv7", "armv6", "x86_64", "riscv64")
"""Values of `arch`, as `uname -m` spells them (armv7l and armv6l without the l)."""

BACKENDS = ("native", "tflite")
"""native: edgellm's C core on the CPU; tflite: a TensorFlow Lite model with a delegate."""

QUANT_TYPES = ("f32", "f16", "q8_0", "q4_0", "q4_0_mixed")
"""Quant recipes a board may allow (edgellm/hub/quantize.py names)."""

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")

# Optional TOML keys and the dataclass fields every profile file must give.
_OPTIONAL = frozenset({"tflite_delegate", "measured"})


class BoardProfileError(EdgeLLMError, ValueError):
    """A board profile is missing, malformed or inconsistent.

    The message names the file, the field and the fix; ``path`` and ``field`` carry them
    for programs (``field`` is None for a whole-file problem).

    .. versionadded:: 0.1
    """

    def __init__(self, message: str, *, path: Path | None = None, field: str | None = None):
        super().__init__(message)
        self.path = path
        self.field = field


class UnknownBoardError(BoardProfileError, LookupError):
    """No profile has the board name asked for; the message lists the valid names.

    .. versionadded:: 0.1
    """


def _shown(path: Path | None) -> str:
    """The path as a user wants to read it: relative to the working directory when inside."""
    if path is None or str(path) in ("", "."):
        return "<board profile>"
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except (ValueError, OSError):
        return str(path)


def _err(path: Path | None, fld: str | None, problem: str, fix: str) -> BoardProfileError:
    where = f"field '{fld}' " if fld else ""
    return BoardProfileError(f"{_shown(path)}: {where}{problem}; {fix}", path=path, field=fld)


def _suggest(word: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


# --------------------------------------------------------------------------------------
# Field checks: one table drives the loader, __post_init__ and the docs' field list


@dataclass(frozen=True)
class _Spec:
    kind: str  # "str", "int", "float", "list", "table"
    example: str  # the right-hand side of the "write ..." fix
    unit: str  # shown by `edgellm boards show`
    low: float | None = None  # inclusive unless low_open
    high: float | None = None  # inclusive
    low_open: bool = False
    choices: tuple[str, ...] = ()


_SPECS: dict[str, _Spec] = {
    "name": _Spec("str", '"rpi5"  (lowercase letters, digits, dashes; the file stem)', ""),
    "description": _Spec("str", '"Raspberry Pi 5, 4 GB"', ""),
    "soc": _Spec("str", '"Broadcom BCM2712"', ""),
    "cpu": _Spec("str", '"4x Cortex-A76 @ 2.4 GHz"', ""),
    "arch": _Spec("str", '"aarch64"', "", choices=ARCHES),
    "cores": _Spec("int", "4", "cores", low=1, high=1024),
    "isa_features": _Spec("list", '["neon", "dotprod"]', "", choices=ISA_FEATURES),
    "ram_mb": _Spec("int", "4096", "MiB", low=16, high=1 << 24),
    # At least 1%: a smaller share rounds a small board's budget down to nothing.
    "ram_share": _Spec("float", "0.75  (a fraction of RAM, 0.01 <= x <= 1)", "of RAM",
                       low=0.01, high=1.0),
    "storage_gb": _Spec("float", "32", "GB", low=0.0, high=1e6, low_open=True),
    "mem_bandwidth_gbs": _Spec("float", "17.1  (peak DRAM GB/s)", "GB/s",
                               low=0.0, high=1e5, low_open=True),
    "sustained_factor": _Spec("float", "0.5  (a fraction of peak, 0 < x <= 1)", "of peak",
                              low=0.0, high=1.0, low_open=True),
    "accelerator": _Spec("str", '"none"', ""),
    "backend": _Spec("str", '"native"', "", choices=BACKENDS),
    "quant_types": _Spec("list", '["q8_0", "q4_0"]', "", choices=QUANT_TYPES),
    "default_type": _Spec("str", '"q4_0"  (one of quant_types)', "", choices=QUANT_TYPES),
    "thermal_limit_c": _Spec("float", "85", "°C", low=0.0, high=150.0, low_open=True),
    "tflite_delegate": _Spec("str", '"libedgetpu.so.1"  (only with backend = "tflite")', ""),
    "measured": _Spec("table", '{ "decode_tok_s.<sha256>" = 12.5 }  (numbers, >= 0)', ""),
}


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_str(path: Path | None, name: str, v: object, spec: _Spec) -> str:
    if not isinstance(v, str) or not v.strip():
        raise _err(path, name, f"must be a non-empty string (got {v!r})",
                   f"write {name} = {spec.example}")
    if spec.choices and v not in spec.choices:
        raise _err(path, name, f"must be one of {', '.join(spec.choices)} (got {v!r})",
                   f"write {name} = \"{spec.choices[0]}\"" + _suggest(v, spec.choices))
    return v


def _check_number(path: Path | None, name: str, v: object, spec: _Spec) -> float:
    fix = f"write {name} = {spec.example}"
    if spec.kind == "int" and (not isinstance(v, int) or isinstance(v, bool)):
        raise _err(path, name, f"must be an integer (got {v!r})", fix)
    if spec.kind == "float" and not _is_number(v):
        raise _err(path, name, f"must be a number (got {v!r})", fix)
    x = float(v)  # type: ignore[arg-type]  # checked to be int or float just above
    if not math.isfinite(x):
        raise _err(path, name, f"must be finite (got {v!r})", fix)
    lo_ok = spec.low is None or (x > spec.low if spec.low_open else x >= spec.low)
    hi_ok = spec.high is None or x <= spec.high
    if not (lo_ok and hi_ok):
        rng = f"{spec.low:g} {'<' if spec.low_open else '<='} {name} <= {spec.high:g}"
        raise _err(path, name, f"is out of range (got {v!r}; allowed {rng})", fix)
    return x


def _check_list(path: Path | None, name: str, v: object, spec: _Spec,
                allow_empty: bool) -> tuple[str, ...]:
    fix = f"write {name} = {spec.example}"
    if not isinstance(v, (list, tuple)) or not all(isinstance(x, str) for x in v):
        raise _err(path, name, f"must be a list of strings (got {v!r})", fix)
    if not v and not allow_empty:
        raise _err(path, name, "must not be empty", fix)
    for x in v:
        if x not in spec.choices:
            raise _err(path, name, f"has an unknown value {x!r}" + _suggest(x, spec.choices),
                       f"use only: {', '.join(spec.choices)}")
    dup = sorted({x for x in v if list(v).count(x) > 1})
    if dup:
        raise _err(path, name, f"lists {', '.join(map(repr, dup))} more than once",
                   "list each value once")
    return tuple(v)


def _check_measured(path: Path | None, v: object) -> Mapping[str, float]:
    spec = _SPECS["measured"]
    if not isinstance(v, Mapping):
        raise _err(path, "measured", f"must be a table (got {v!r})",
                   f"write [measured] with lines like \"decode_tok_s.<sha256>\" = 12.5, "
                   f"or measured = {spec.example}")
    out: dict[str, float] = {}
    for k, x in v.items():
        key = f"measured.{k}"
        if not isinstance(k, str) or not k.strip():
            raise _err(path, "measured", f"has an empty or non-string key {k!r}",
                       "name each measurement, e.g. \"decode_tok_s.<sha256>\" = 12.5")
        if not _is_number(x) or not math.isfinite(float(x)) or float(x) < 0:
            raise _err(path, key, f"must be a finite number >= 0 (got {x!r})",
                       f"write \"{k}\" = 12.5 under [measured]")
        out[k] = float(x)
    return MappingProxyType(out)


def _flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested TOML tables as dotted keys: [measured] kernel_gbs.q4_0 = 3 -> 'kernel_gbs.q4_0'."""
    out: dict[str, Any] = {}
    for k, v in table.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# --------------------------------------------------------------------------------------
# The profile


@dataclass(frozen=True)
class BoardProfile:
    """What a device offers a model, read from boards/<name>.toml.

    - ``load_board("rpi5")`` reads and validates a profile; construction from code runs
      the same checks (``dataclasses.replace`` too), so every instance is valid.
    - ``ram_budget_bytes`` is what weights + KV cache + runtime may take.
    - ``sustained_bandwidth_bytes_per_s`` feeds decode-speed estimates.
    - ``required_isa_missing(features)`` / ``host_can_run()`` compare with a CPU.

    Instances are immutable and safe to share between threads.

    .. versionadded:: 0.1
    """

    name: str  # the file stem and the --board name
    description: str
    soc: str
    cpu: str  # core model and clock, e.g. "4x Cortex-A76 @ 2.4 GHz"
    arch: str  # one of ARCHES
    cores: int
    isa_features: tuple[str, ...]  # required ISA features (ISA_FEATURES vocabulary)
    ram_mb: int  # installed RAM, MiB
    ram_share: float  # fraction of RAM edgellm may use, 0.01 <= x <= 1
    storage_gb: float  # storage for models, GB
    mem_bandwidth_gbs: float  # peak DRAM bandwidth, GB/s (1e9 bytes/s)
    sustained_factor: float  # sustained (throttled) fraction of peak bandwidth, 0 < x <= 1
    accelerator: str  # "none" or what the board has
    backend: str  # one of BACKENDS
    quant_types: tuple[str, ...]  # allowed quant recipes (QUANT_TYPES)
    default_type: str  # one of quant_types
    thermal_limit_c: float  # temperature at which the board throttles hard, °C
    tflite_delegate: str | None = None  # the delegate library, backend "tflite" only
    measured: Mapping[str, float] = field(  # key -> value measured on this board
        default_factory=lambda: MappingProxyType({}), hash=False)
    path: Path = Path()  # the TOML file it was read from; Path() when made in code

    def __post_init__(self) -> None:
        p = self.path if isinstance(self.path, Path) else None

        def fix(k: str, v: Any) -> None:  # store the normalised value (frozen: no setattr)
            object.__setattr__(self, k, v)

        for name, spec in _SPECS.items():
            v = getattr(self, name)
            if name == "measured":
                fix(name, _check_measured(p, v))
            elif spec.kind == "list":
                fix(name, _check_list(p, name, v, spec, allow_empty=(name == "isa_features")))
            elif spec.kind in ("int", "float"):
                x = _check_number(p, name, v, spec)
                fix(name, x if spec.kind == "float" else v)
            elif v is not None or name != "tflite_delegate":
                _check_str(p, name, v, spec)
        if not isinstance(self.path, Path):
            raise _err(None, "path", f"must be a pathlib.Path (got {self.path!r})",
                       "pass path=Path(...)")
        if not _NAME_RE.match(self.name):
            raise _err(p, "name", f"must be lowercase letters, digits and dashes (got {self.name!r})",
                       f"write name = {_SPECS['name'].example}")
        if self.path.suffix == ".toml" and self.path.stem != self.name:
            raise _err(p, "name", f"must equal the file stem '{self.path.stem}' (got {self.name!r})",
                       f"write name = \"{self.path.stem}\" or rename the file to {self.name}.toml")
        if self.default_type not in self.quant_types:
            raise _err(p, "default_type", f"must be one of quant_types "
                       f"({', '.join(self.quant_types)}) (got {self.default_type!r})",
                       f"write default_type = \"{self.quant_types[0]}\" or add it to quant_types")
        if self.backend == "tflite" and self.tflite_delegate is None:
            raise _err(p, "tflite_delegate", "is required with backend = \"tflite\"",
                       'write tflite_delegate = "libedgetpu.so.1" (the delegate library)')
        if self.backend != "tflite" and self.tflite_delegate is not None:
            raise _err(p, "tflite_delegate", f"is only valid with backend = \"tflite\" "
                       f"(backend is {self.backend!r})", "remove the tflite_delegate line")
        arm = self.arch in ("aarch64", "armv7", "armv6")
        for f in self.isa_features:
            if (f in _ARM_FEATURES) != arm or (f in _AARCH64_ONLY and self.arch != "aarch64"):
                raise _err(p, "isa_features", f"{f!r} is not a feature of arch {self.arch!r}",
                           "list only features of that architecture, or fix arch")

    @property
    def ram_budget_bytes(self) -> int:
        """Bytes edgellm may use on this board: ram_mb * 2**20 * ram_share, rounded down."""
        return int(self.ram_mb * (1 << 20) * self.ram_share)

    @property
    def sustained_bandwidth_bytes_per_s(self) -> float:
        """Sustained DRAM bandwidth for estimates: mem_bandwidth_gbs * 1e9 * sustained_factor."""
        return self.mem_bandwidth_gbs * 1e9 * self.sustained_factor

    def required_isa_missing(self, have: Iterable[str]) -> list[str]:
        """The board's required ISA features that `have` lacks, in profile order.

        Args:
            have: feature names (ISA_FEATURES vocabulary) of a CPU or a build, e.g.
                ``host_isa_features()`` or a GGUF's ``edgellm.isa_features``.

        Returns:
            The missing features; empty when `have` covers the board.
        """
        got = set(have)
        return [f for f in self.isa_features if f not in got]

    def host_problems(self) -> list[str]:
        """Why this machine cannot run this board's builds; empty when it can.

        Returns:
            Reasons: a different CPU architecture, missing ISA features, or (backend
            "tflite") a delegate library that is not installed.
        """
        arch = host_arch()
        if arch != self.arch:
            return [f"arch {self.arch} (this host is {arch})"]
        out = []
        missing = self.required_isa_missing(host_isa_features())
        if missing:
            out.append(f"missing {' '.join(missing)}")
        if self.backend == "tflite" and not _library_found(self.tflite_delegate or ""):
            out.append(f"no {self.tflite_delegate}")
        return out

    def host_can_run(self) -> bool:
        """Whether this machine can run this board's builds: ``host_problems()`` is empty."""
        return not self.host_problems()

    def to_dict(self) -> dict[str, Any]:
        """The profile as JSON-ready data: every field plus the derived budget and bandwidth."""
        d: dict[str, Any] = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d.update(isa_features=list(self.isa_features), quant_types=list(self.quant_types),
                 measured=dict(self.measured), path=str(self.path),
                 ram_budget_bytes=self.ram_budget_bytes,
                 sustained_bandwidth_bytes_per_s=self.sustained_bandwidth_bytes_per_s)
        return d


def with_bandwidth(profile: BoardProfile, gbs: float, sustained_factor: float = 1.0) -> BoardProfile:
    """A copy of a profile with a measured bandwidth (for example `calibrate_bandwidth()`).

    Args:
        profile: the profile to copy (it is unchanged).
        gbs: bandwidth in GB/s (1e9 bytes/s).
        sustained_factor: the fraction of `gbs` estimates use; 1.0, since a measured
            streaming rate is already sustained.

    Raises:
        BoardProfileError: gbs or sustained_factor out of range.
    """
    return dataclasses.replace(profile, mem_bandwidth_gbs=gbs, sustained_factor=sustained_factor)


# --------------------------------------------------------------------------------------
# Files


def boards_dir() -> Path:
    """The folder of shipped profiles.

    ``$EDGELLM_BOARDS_DIR`` when set; else the checkout's ``boards/`` when running from a
    source tree; else ``edgellm/boards_data/``, the copy an installed wheel carries.
    """
    env = os.environ.get("EDGELLM_BOARDS_DIR")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent
    checkout = here.parent / "boards"
    if checkout.is_dir() and (here.parent / "pyproject.toml").is_file():
        return checkout
    return here / "boards_data"


def list_boards(dir: str | os.PathLike[str] | None = None) -> list[str]:
    """The board names (file stems) in a folder (default ``boards_dir()``), sorted.

    Raises:
        BoardProfileError: the folder does not exist.
    """
    d = Path(dir) if dir is not None else boards_dir()
    if not d.is_dir():
        raise BoardProfileError(
            f"{_shown(d)}: board profile folder not found; set EDGELLM_BOARDS_DIR or pass "
            "dir= (an installed edgellm carries edgellm/boards_data/)", path=d)
    return sorted(p.stem for p in d.glob("*.toml") if p.is_file())


_TOML_POS_RE = re.compile(r"\(at line (\d+), column (\d+)\)")
_KEY_RE = re.compile(r"^\s*([A-Za-z0-9_\-\"'.]+)\s*=")


def parse_board(text: str | bytes, path: str | os.PathLike[str]) -> BoardProfile:
    """Validate profile text (bytes are decoded as UTF-8) as if read from `path`.

    `path` names the file in messages, and its stem must equal the `name` field.

    Raises:
        BoardProfileError: anything wrong, with the file, the field and the fix.
    """
    p = Path(path)
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _err(p, None, f"is not UTF-8 text ({exc.reason} at byte {exc.start})",
                       "save the file as UTF-8") from None
    try:
        raw = tomllib.loads(text)
    except RecursionError:  # arrays nested thousands deep
        raise _err(p, None, "nests arrays or tables too deeply", "flatten it") from None
    except tomllib.TOMLDecodeError as exc:
        msg = str(exc)
        fld = None
        m = _TOML_POS_RE.search(msg)
        if m:
            lines = text.splitlines()
            n = int(m.group(1))
            km = _KEY_RE.match(lines[n - 1]) if 0 < n <= len(lines) else None
            fld = km.group(1).strip("\"'") if km else None
        raise _err(p, fld, f"is not valid TOML: {msg}",
                   'fix the syntax there (strings in quotes: soc = "BCM2712"; numbers bare: '
                   "cores = 4; see docs/boards.md)") from None
    schema = raw.get("schema")
    if schema is None:
        raise _err(p, "schema", "is missing", f"add schema = {SCHEMA_VERSION} as the first line")
    if not isinstance(schema, int) or isinstance(schema, bool) or schema != SCHEMA_VERSION:
        raise _err(p, "schema", f"must be {SCHEMA_VERSION} (got {schema!r})",
                   f"write schema = {SCHEMA_VERSION} (this edgellm reads schema "
                   f"{SCHEMA_VERSION}; a newer profile needs a newer edgellm)")
    known = set(_SPECS)
    for k in raw:
        if k != "schema" and k not in known:
            raise _err(p, k, "is not a board profile field" + _suggest(k, known),
                       f"remove or rename it (fields: {', '.join(_SPECS)})")
    for k in _SPECS:
        if k not in raw and k not in _OPTIONAL:
            raise _err(p, k, "is missing",
                       f"add {k} = {_SPECS[k].example.split('  (')[0]}  # and its source")
    values = {k: v for k, v in raw.items() if k != "schema"}
    if isinstance(values.get("measured"), Mapping):
        values["measured"] = _flatten(values["measured"])
    return BoardProfile(**values, path=p)


def load_board(name_or_path: str | os.PathLike[str], dir: str | os.PathLike[str] | None = None,
               *, bandwidth_gbs: float | None = None) -> BoardProfile:
    """Load and validate a board profile.

    Args:
        name_or_path: a board name ("rpi5": ``<dir>/rpi5.toml``) or a path to a .toml file.
        dir: the folder names are looked up in; default ``boards_dir()``.
        bandwidth_gbs: a measured bandwidth to use instead (see `with_bandwidth`), for
            example ``calibrate_bandwidth()`` for x86-host.

    Raises:
        UnknownBoardError: no profile of that name (the message lists the valid names).
        BoardProfileError: the file is unreadable or invalid (file, field and fix named).
    """
    s = os.fspath(name_or_path)
    if isinstance(name_or_path, Path) or s.endswith(".toml") or os.sep in s or "/" in s:
        path = Path(s)
        if not path.is_file():
            raise BoardProfileError(f"{_shown(path)}: board profile file not found; "
                                    "check the path, or give a board name", path=path)
    else:
        d = Path(dir) if dir is not None else boards_dir()
        names = list_boards(d)
        if s not in names:
            raise UnknownBoardError(
                f"unknown board {s!r}{_suggest(s, names)}; valid boards: {', '.join(names)} "
                f"(profiles in {_shown(d)}/; docs/boards.md says how to add one)", path=d)
        path = d / f"{s}.toml"
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BoardProfileError(f"{_shown(path)}: cannot read the profile: {exc.strerror}",
                                path=path) from None
    prof = parse_board(data, path)
    return prof if bandwidth_gbs is None else with_bandwidth(prof, bandwidth_gbs)


def load_all(dir: str | os.PathLike[str] | None = None) -> dict[str, BoardProfile]:
    """Every profile in a folder, by name (sorted).

    Raises:
        BoardProfileError: the first invalid profile.
    """
    d = Path(dir) if dir is not None else boards_dir()
    return {n: load_board(n, d) for n in list_boards(d)}


# --------------------------------------------------------------------------------------
# Source comments (what `edgellm boards show` prints beside each value)


# A line's code: bare text, "basic strings" with escapes and 'literal strings'; then '#'.
_COMMENT_RE = re.compile(r"""^((?:[^#"']|"(?:\\.|[^"\\])*"|'[^']*')*)#(.*)$""")


def _split_comment(line: str) -> tuple[str, str]:
    """(code, comment) of a TOML line; a '#' inside a string does not start a comment."""
    m = _COMMENT_RE.match(line)
    return (m.group(1), m.group(2).strip()) if m else (line, "")


def field_sources(profile_or_path: BoardProfile | str | os.PathLike[str]) -> dict[str, str]:
    """The comment on each key's line of a profile file: the source of each value.

    Args:
        profile_or_path: a loaded profile (its ``path`` is read) or a .toml path.

    Returns:
        key -> comment text; keys under [measured] are "measured.<key>". Keys without
        a comment are absent; a profile made in code gives {}.

    Raises:
        BoardProfileError: the file cannot be read.
    """
    path = profile_or_path.path if isinstance(profile_or_path, BoardProfile) else Path(profile_or_path)
    if not path.suffix:
        return {}
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BoardProfileError(f"{_shown(path)}: cannot read the profile: {exc}", path=path) from None
    out: dict[str, str] = {}
    prefix = ""
    for line in text.splitlines():
        code, comment = _split_comment(line)
        code = code.strip()
        if code.startswith("[") and code.endswith("]"):
            prefix = code.strip("[]").strip() + "."
            continue
        if not comment or "=" not in code:
            continue
        try:
            one = _flatten(tomllib.loads(code))
        except tomllib.TOMLDecodeError:
            continue  # a multi-line value's first line
        for k in one:
            out[prefix + k] = comment
    return out


# --------------------------------------------------------------------------------------
# This host


def host_arch() -> str:
    """This machine's CPU architecture in the ARCHES vocabulary (e.g. "x86_64", "aarch64")."""
    m = platform.machine().lower()
    return {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64", "armv7l": "armv7",
            "armv6l": "armv6"}.get(m, m)


# The C core's feature names (csrc/kernels/cpu_features.c) -> the profile vocabulary. x86
# features count only when the OS saves the registers: os_ymm for AVX2/FMA/F16C, os_zmm for
# AVX-512 (the C core reports cpuid bits and the OS bits separately).
_C_NAMES = {"asimd": "neon", "asimddp": "dotprod", "avx512vnni": "avx512_vnni",
            **{f: f for f in ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl")}}
_NEEDS_OS = {"avx2": "os_ymm", "fma": "os_ymm", "f16c": "os_ymm", "avx512f": "os_zmm",
             "avx512bw": "os_zmm", "avx512vl": "os_zmm", "avx512_vnni": "os_zmm"}
# Linux /proc/cpuinfo flag names -> the vocabulary (flags the kernel shows are OS-enabled).
_CPUINFO_NAMES = {"asimd": "neon", "neon": "neon", "asimddp": "dotprod", "asimdhp": "fp16",
                  **{f: f for f in ISA_FEATURES if f not in ("neon", "dotprod", "fp16")}}


def translate_cpu_features(c_features: Iterable[str] | None,
                           cpuinfo_flags: Iterable[str] = ()) -> set[str]:
    """Map CPU feature names to the ISA_FEATURES vocabulary.

    Args:
        c_features: ``edgellm._native.build_info()["cpu_features"]`` (C core names such as
            "asimddp", "avx512vnni", "os_ymm"), or None when the core is not available.
        cpuinfo_flags: /proc/cpuinfo flags; they add what the C core does not detect
            (fp16, i8mm, sve on Arm) and stand in for it entirely when c_features is None.

    Returns:
        The features, in the profile vocabulary.
    """
    flags = set(cpuinfo_flags)
    from_info = {_CPUINFO_NAMES[f] for f in flags if f in _CPUINFO_NAMES}
    if c_features is None:
        return from_info
    c = set(c_features)
    out = {_C_NAMES[f] for f in c if f in _C_NAMES}
    out = {f for f in out if f not in _NEEDS_OS or _NEEDS_OS[f] in c}
    return out | (from_info & {"fp16", "i8mm", "sve"} if "neon" in out else set())


def _cpuinfo_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, val = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            return set(val.split())
    return set()


@functools.lru_cache(maxsize=1)
def _host_isa_features() -> frozenset[str]:
    c: list[str] | None
    try:
        from . import _native

        c = list(_native.build_info()["cpu_features"])
    except EdgeLLMError:  # no compiled core in this install: /proc/cpuinfo alone
        c = None
    return frozenset(translate_cpu_features(c, _cpuinfo_flags()))


def host_isa_features() -> set[str]:
    """This CPU's ISA features in the profile vocabulary (e.g. {"avx2", "fma", "f16c"}).

    From the C core's run-time detection (``edgellm info``), which also checks that the OS
    enables the registers; on Arm, /proc/cpuinfo adds fp16, i8mm and sve, which the core
    does not detect. Without a compiled core, /proc/cpuinfo alone.
    """
    return set(_host_isa_features())


def find_library(name: str) -> str | None:
    """What the dynamic loader would load for a library name (a path is checked as a file).

    Used for TFLite delegates (``tflite_delegate``): None when it is not installed.
    """
    if os.sep in name:
        return name if os.path.isfile(name) else None
    import ctypes.util

    stem = re.sub(r"^lib|\.so.*$", "", name)
    return ctypes.util.find_library(stem) if stem else None


def _library_found(name: str) -> bool:
    return find_library(name) is not None


# --------------------------------------------------------------------------------------
# Bandwidth calibration


def default_calibration_mib() -> int:
    """The array size calibrate_bandwidth() uses by default: 256 MiB, or RAM/8 when smaller."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 256
    return max(8, min(256, total // (8 << 20)))


def calibrate_bandwidth(mib: int | None = None, repeats: int = 5,
                        n_threads: int | None = None) -> float:
    """Measure this machine's sustained DRAM read bandwidth in GB/s (1e9 bytes/s).

    Method: a float64 array of `mib` MiB (far larger than any last-level cache) is filled
    once, then summed `repeats` times, each time split into `n_threads` equal slices summed
    in parallel threads (NumPy releases the GIL inside the reduction). Each pass reads
    every byte once; the result is the array size over the fastest pass (best of N, which
    discards passes slowed by other processes). This is the streaming read that decoding
    does over the weights, so the number is used as-is (sustained_factor 1.0).

    Args:
        mib: array size in MiB, >= 8 (default 256, or RAM/8 on small machines).
        repeats: timed passes, >= 1 (one untimed warm-up pass comes first).
        n_threads: parallel readers (default: the CPUs this process may use).

    Returns:
        Bandwidth in GB/s.

    Raises:
        InvalidArgumentError: mib, repeats or n_threads out of range.
    """
    import numpy as np

    size = default_calibration_mib() if mib is None else mib
    if isinstance(size, bool) or not isinstance(size, int) or not 8 <= size <= 1 << 20:
        raise InvalidArgumentError(f"calibrate_bandwidth: mib must be an integer >= 8 (got {mib!r})")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise InvalidArgumentError(f"calibrate_bandwidth: repeats must be >= 1 (got {repeats!r})")
    if n_threads is None:
        n_threads = usable_cpus()
    if isinstance(n_threads, bool) or not isinstance(n_threads, int) or not 1 <= n_threads <= 1024:
        raise InvalidArgumentError(f"calibrate_bandwidth: n_threads must be in 1..1024 (got {n_threads!r})")
    a = np.ones(size * (1 << 20) // 8, dtype=np.float64)  # filled: every page is really mapped
    parts = np.array_split(a, n_threads)
    best = math.inf
    with ThreadPoolExecutor(max_workers=n_threads) as pool:
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            total = sum(pool.map(np.sum, parts))
            dt = time.perf_counter() - t0
            if total != a.size:  # every element is 1.0: a wrong sum means a wrong read
                raise EdgeLLMError(f"calibrate_bandwidth: read back {total}, expected {a.size}")
            if i > 0:  # pass 0 warms the caches, TLB and the thread pool
                best = min(best, dt)
    return a.nbytes / best / 1e9


def usable_cpus() -> int:
    """CPUs this process may run on (the affinity mask where the OS has one)."""
    sched = getattr(os, "sched_getaffinity", None)
    return len(sched(0)) if sched else (os.cpu_count() or 1)


def host_cpu_name() -> str:
    """This machine's CPU or board model, for "measured on ..." comments."""
    text = ""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        pass
    for want in ("model name", "model"):  # x86 names the CPU; a Raspberry Pi names the board
        for line in text.splitlines():
            key, _, val = line.partition(":")
            if key.strip().lower() == want and val.strip():
                return val.strip()
    return platform.processor() or host_arch()


def calibration_toml(profile: BoardProfile, gbs: float, how: str) -> list[str]:
    """The profile lines that record a calibrated bandwidth, with their source comments.

    The generic x86-host takes the measured rate as its bandwidth (factor 1.0); a board
    with a datasheet peak keeps it and records measured/peak as its sustained_factor.

    Args:
        profile: the board the measurement was made on.
        gbs: the measured bandwidth, GB/s.
        how: what was measured on, and how (goes into the comments).

    Returns:
        TOML lines to put into boards/<name>.toml.
    """
    if profile.name == "x86-host" or gbs > profile.mem_bandwidth_gbs:
        return [f"mem_bandwidth_gbs = {gbs:.1f}  # measured on {how}",
                "sustained_factor = 1.0  # the calibrated rate is already sustained"]
    return [f"sustained_factor = {gbs / profile.mem_bandwidth_gbs:.2f}  # measured on {how}: "
            f"{gbs:.1f} GB/s of the {profile.mem_bandwidth_gbs:g} GB/s peak"]


# --------------------------------------------------------------------------------------
# Text output for `edgellm boards`


def _host_cell(p: BoardProfile) -> str:
    problems = p.host_problems()
    return "yes" if not problems else "no: " + "; ".join(problems)


def format_table(profiles: Iterable[BoardProfile]) -> str:
    """The `edgellm boards` table: one row per board, columns sized to fit."""
    head = ("name", "SoC", "cores", "RAM", "budget", "bandwidth", "sustained", "backend",
            "ISA features", "this host")
    rows = [head] + [(
        p.name, p.soc, str(p.cores), f"{p.ram_mb} MiB", f"{p.ram_budget_bytes >> 20} MiB",
        f"{p.mem_bandwidth_gbs:g} GB/s", f"{p.sustained_bandwidth_bytes_per_s / 1e9:.1f} GB/s",
        p.backend, " ".join(p.isa_features) or "-", _host_cell(p)) for p in profiles]
    right = {2, 3, 4, 5, 6}
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = []
    for r in rows:
        cells = [c.rjust(w) if i in right else c.ljust(w)
                 for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def format_profile(p: BoardProfile) -> str:
    """`edgellm boards show NAME`: every field with its unit, and the source of each value."""
    src = field_sources(p)
    lines = [f"{p.name}: {p.description}", f"  {'file:':<21}{_shown(p.path)}",
             f"  {'schema:':<21}{SCHEMA_VERSION}"]
    if "schema" in src:
        lines.append(f"  {'':<21}source: {src['schema']}")
    for name, spec in _SPECS.items():
        if name in ("name", "description", "measured"):
            continue
        v = getattr(p, name)
        if v is None:
            continue
        if isinstance(v, tuple):
            text = ", ".join(v) or "-"
        elif isinstance(v, float):
            text = f"{v:g}"
        else:
            text = str(v)
        if name == "ram_share":
            text += f" of RAM = {p.ram_budget_bytes >> 20} MiB budget ({p.ram_budget_bytes:,} bytes)"
        elif name == "sustained_factor":
            text += f" of peak = {p.sustained_bandwidth_bytes_per_s / 1e9:.2f} GB/s sustained"
        elif spec.unit:
            text += f" {spec.unit}"
        lines.append(f"  {name + ':':<21}{text}")
        if name in src:
            lines.append(f"  {'':<21}source: {src[name]}")
    lines.append(f"  {'this host:':<21}{_host_cell(p)}")
    if not p.measured:
        lines.append(f"  {'measured:':<21}none yet (`edgellm bench --board {p.name}` prints "
                     "lines to add)")
    else:
        lines.append(f"  {'measured:':<21}")
        for k, v in p.measured.items():
            lines.append(f"    {k} = {v:g}" + (f"  ({src['measured.' + k]})"
                                                 if "measured." + k in src else ""))
    return "\n".join(lines)
