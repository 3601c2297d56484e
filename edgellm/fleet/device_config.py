# SPDX-License-Identifier: MIT
"""A device's ``device.toml``: who it is to the hub, where the broker is, what the agent does.

``hub add-device`` writes it into the provisioning bundle; ``edgellm agent --config`` reads it.

Public API:

- ``DeviceConfig``: the parsed file (frozen dataclass; paths absolute).
- ``load_device_config(path) -> DeviceConfig``: DeviceConfigError names the file and the
  field (``device.toml: [agent] queue_max_bytes: ...``) for anything missing or wrong.
- ``write_device_config(path, cfg)``: writes the documented format atomically; paths inside
  the file's folder are written relative to it, so a bundle can be copied as a whole.

Relative paths in the file (ca, cert, key, model path, state_dir, models_dir, tuf_root) are
relative to the file's folder, not to the working directory. The format (docs/fleet.md, "The device agent")::

    [device]  id, board
    [broker]  host, port, ca, cert, key
    [model]   path ("" = none), node, version, models_dir (optional: "models")
    [agent]   state_dir, report_interval_s, queue_max_bytes, share_examples
    [update]  optional: tuf_root ("provisioned-root.json"), window ("" or "02:00-04:00"),
              idle_s (900)

Files written before [update] and models_dir existed stay valid: the defaults apply.

.. versionadded:: 0.1
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from ..errors import DeviceConfigError
from .protocol import ProtocolError, check_device_id

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.9/3.10: tomli is the same parser
    import tomli as tomllib

__all__ = ["DeviceConfig", "load_device_config", "write_device_config"]

PathLike = Union[str, "os.PathLike[str]"]
MIN_QUEUE_BYTES = 64 * 1024  # room for at least one report plus SQLite's own pages
MODELS_DIR = "models"  # the SlotStore root (edgellm.fleet.slots), beside device.toml
TUF_ROOT = "provisioned-root.json"  # the TUF trust anchor hub add-device writes
IDLE_S = 900.0
_HHMM = r"(?:[01][0-9]|2[0-3]):[0-5][0-9]"
_WINDOW = re.compile(f"{_HHMM}-{_HHMM}")


@dataclass(frozen=True)
class DeviceConfig:
    """One device's configuration (see the module docstring for the file format)."""

    device_id: str
    board: str
    host: str
    port: int
    ca: Path
    cert: Path
    key: Path
    model_path: Path | None
    node: str
    version: int
    state_dir: Path
    report_interval_s: float
    queue_max_bytes: int
    share_examples: bool
    # updates (issue 6); None: the default beside device.toml (load_device_config fills them)
    models_dir: Path | None = None
    tuf_root: Path | None = None
    window: str = ""  # maintenance window "HH:MM-HH:MM" (device local time), "" for none
    idle_s: float = IDLE_S  # idle seconds that also allow a model swap


class _Reader:
    def __init__(self, path: Path, raw: dict[str, Any]) -> None:
        self.path, self.raw = path, raw

    def fail(self, section: str, key: str, why: str) -> DeviceConfigError:
        return DeviceConfigError(f"{self.path}: [{section}] {key}: {why}")

    def get(self, section: str, key: str, types: tuple[type, ...], what: str) -> Any:
        sec = self.raw.get(section)
        if not isinstance(sec, dict):
            raise DeviceConfigError(f"{self.path}: missing section [{section}]")
        if key not in sec:
            raise self.fail(section, key, f"missing (expected {what})")
        value = sec[key]
        if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
            raise self.fail(section, key, f"{value!r} is not {what}")
        return value

    def text(self, section: str, key: str, *, empty: bool = False) -> str:
        value: str = self.get(section, key, (str,), "a string")
        if not empty and not value.strip():
            raise self.fail(section, key, "is empty")
        return value

    def has(self, section: str, key: str) -> bool:
        sec = self.raw.get(section)
        if sec is not None and not isinstance(sec, dict):
            raise DeviceConfigError(f"{self.path}: [{section}] is not a section")
        return isinstance(sec, dict) and key in sec

    def path_(self, section: str, key: str, *, must_exist: bool,
              default: str | None = None) -> Path:
        value = self.text(section, key) if default is None or self.has(section, key) else default
        p = Path(value).expanduser()
        p = p if p.is_absolute() else self.path.parent / p
        if must_exist and not p.is_file():
            raise self.fail(section, key, f"file {p} does not exist")
        return p


def load_device_config(path: PathLike, *, check_files: bool = True) -> DeviceConfig:
    """Read and check a device.toml.

    Args:
        path: the file.
        check_files: also require the ca, cert and key files to exist (the agent needs them).

    Raises:
        DeviceConfigError: the file is missing or not TOML, or a field is missing, has the
            wrong type or an invalid value; the message names the file and the field.
    """
    p = Path(path).expanduser().absolute()
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DeviceConfigError(f"{p}: no such device config") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DeviceConfigError(f"{p}: cannot read ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise DeviceConfigError(f"{p}: not valid TOML ({exc})") from None
    r = _Reader(p, raw)
    device_id = r.text("device", "id")
    try:
        check_device_id(device_id)
    except ProtocolError as exc:
        raise r.fail("device", "id", str(exc)) from None
    port = r.get("broker", "port", (int,), "an integer")
    if not 1 <= port <= 65535:
        raise r.fail("broker", "port", f"{port} is not a TCP port (1-65535)")
    model = r.text("model", "path", empty=True)
    version = r.get("model", "version", (int,), "an integer")
    if version < 0:
        raise r.fail("model", "version", f"{version} is negative")
    interval = r.get("agent", "report_interval_s", (int, float), "a number of seconds")
    if not 0 < interval <= 7 * 24 * 3600:
        raise r.fail("agent", "report_interval_s", f"{interval} is not in (0, 604800]")
    qmax = r.get("agent", "queue_max_bytes", (int,), "an integer")
    if qmax < MIN_QUEUE_BYTES:
        raise r.fail("agent", "queue_max_bytes", f"{qmax} < {MIN_QUEUE_BYTES} (the least useful)")
    node = r.text("model", "node", empty=True)
    window = r.text("update", "window", empty=True).strip() if r.has("update", "window") else ""
    if window and not _WINDOW.fullmatch(window):
        raise r.fail("update", "window", f"{window!r} is not HH:MM-HH:MM (24 h) or empty")
    idle_s = r.get("update", "idle_s", (int, float), "a number of seconds") \
        if r.has("update", "idle_s") else IDLE_S
    if not 0 <= idle_s <= 30 * 24 * 3600:
        raise r.fail("update", "idle_s", f"{idle_s} is not in [0, 2592000]")
    return DeviceConfig(
        device_id=device_id,
        board=r.text("device", "board"),
        host=r.text("broker", "host"),
        port=port,
        ca=r.path_("broker", "ca", must_exist=check_files),
        cert=r.path_("broker", "cert", must_exist=check_files),
        key=r.path_("broker", "key", must_exist=check_files),
        model_path=r.path_("model", "path", must_exist=False) if model.strip() else None,
        node=node,
        version=version,
        state_dir=r.path_("agent", "state_dir", must_exist=False),
        report_interval_s=float(interval),
        queue_max_bytes=qmax,
        share_examples=r.get("agent", "share_examples", (bool,), "true or false"),
        models_dir=r.path_("model", "models_dir", must_exist=False, default=MODELS_DIR),
        tuf_root=r.path_("update", "tuf_root", must_exist=False, default=TUF_ROOT),
        window=window,
        idle_s=float(idle_s),
    )


def _rel(p: Path | None, base: Path) -> str:
    if p is None:
        return ""
    try:
        return Path(p).absolute().relative_to(base).as_posix()
    except ValueError:
        return str(p)


def write_device_config(path: PathLike, cfg: DeviceConfig) -> None:
    """Write cfg as device.toml (atomically: temp file, fsync, rename)."""
    p = Path(path).absolute()
    base = p.parent
    q = json.dumps  # a JSON string literal is a valid TOML basic string
    text = (
        f"# edgellm device configuration (docs/fleet.md, \"The device agent\")\n"
        f"[device]\nid = {q(cfg.device_id)}        # pseudonym issued by the hub\n"
        f"board = {q(cfg.board)}\n\n"
        f"[broker]\nhost = {q(cfg.host)}\nport = {int(cfg.port)}\n"
        f"ca = {q(_rel(cfg.ca, base))}          # relative paths are relative to this file\n"
        f"cert = {q(_rel(cfg.cert, base))}\nkey = {q(_rel(cfg.key, base))}\n\n"
        f"[model]\npath = {q(_rel(cfg.model_path, base))}\nnode = {q(cfg.node)}\n"
        f"version = {int(cfg.version)}\n"
        f"models_dir = {q(_rel(cfg.models_dir, base) or MODELS_DIR)}"
        f"   # the model store; the served model is its current pointer\n\n"
        f"[agent]\nstate_dir = {q(_rel(cfg.state_dir, base))}   # queue, bdSeq, seq counters\n"
        f"report_interval_s = {float(cfg.report_interval_s)!r}\n"
        f"queue_max_bytes = {int(cfg.queue_max_bytes)}\n"
        f"share_examples = {'true' if cfg.share_examples else 'false'}"
        f"   # opt-in; text is redacted before it leaves\n\n"
        f"[update]\ntuf_root = {q(_rel(cfg.tuf_root, base) or TUF_ROOT)}"
        f"   # the TUF root written at provisioning\n"
        f"window = {q(cfg.window)}   # maintenance window \"02:00-04:00\" (local) or \"\"\n"
        f"idle_s = {float(cfg.idle_s)!r}   # or swap after this many idle seconds\n")
    base.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".device.toml.", dir=base)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
