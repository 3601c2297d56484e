# SPDX-License-Identifier: MIT
"""The flash package: one build plus one device identity, as a folder and as a safe archive.

A package is what `edgellm flash` hands to a device over any link (serial, SSH, SD card)::

    flash.json              {"format": 1, "device_id", "board", "node", "version",
                             "model_sha256", "files": {"bundle/model.gguf": {"sha256", "size"}, ...}}
    bundle/                 model.gguf, bundle.json (the build, unchanged)
    identity/               device.toml (node and version of this build), device.crt, device.key,
                            server-ca.crt, provisioned-root.json (when the hub has a TUF root)

and installs into the device layout (docs/flash.md)::

    DEVICE_ROOT/  device.toml, device.crt, device.key, server-ca.crt, provisioned-root.json,
                  flash.json (the package installed last), state/, models/ (the SlotStore)

Usage::

    pkg = make_package(out, bundle_dir=b, identity_dir=home.device_dir("d-1"), board="rpi5")
    archive = pack(pkg, "d-1.elpkg")              # deterministic uncompressed tar
    # ... carried to the device ...
    pkg = unpack(archive, tmp)                    # regular files only, names and sizes checked
    active = install_package(pkg, "/var/lib/edgellm")

``install_package`` verifies every file against flash.json, that a provisioned device keeps
its identity (device id, broker, certificate, key, CA, TUF root; ``reprovision=True`` lifts
this for an authenticated operator) and the free space before it writes anything; it holds
the store's inter-process lock (``updater.store_lock``) while it installs; the model goes in
through the update path (``SlotStore.provision`` on a device with no model, else
``Updater.apply`` of a full bundle, health check and rollback included), and the identity
files are renamed into place only after the model committed. The same package again changes
nothing.

Public API: ``FlashInfo``, ``make_package``, ``read_package``, ``verify_package``, ``pack``,
``unpack``, ``install_package``, ``installed_info``, ``ARCHIVE_SUFFIX``.

.. versionadded:: 0.1
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Union

from .._fsutil import atomic_write, fsync_dir
from ..errors import (
    EdgeLLMError,
    FlashDiskFullError,
    FlashError,
    FlashIdentityError,
    FlashPackageError,
)
from ..formats.bundle import MANIFEST_NAME, MODEL_NAME, check_node, read_manifest, sha256_file

__all__ = ["ARCHIVE_SUFFIX", "FORMAT", "IDENTITY_FILES", "FlashInfo", "install_package",
           "installed_info", "make_package", "pack", "read_package", "unpack",
           "verify_package"]

PathLike = Union[str, "os.PathLike[str]"]
FORMAT = 1
FLASH_JSON = "flash.json"
ARCHIVE_SUFFIX = ".elpkg"
MODELS_DIR = "models"  # the SlotStore root under DEVICE_ROOT (device_config's models_dir default)
IDENTITY_REQUIRED = ("device.toml", "device.crt", "device.key", "server-ca.crt")
IDENTITY_FILES = (*IDENTITY_REQUIRED, "provisioned-root.json")
SECRET_FILES = frozenset({"device.key"})  # written 0600, never world-readable
MAX_FLASH_JSON = 1 << 20  # a manifest of a handful of files is a few hundred bytes
MAX_MEMBERS = 32  # flash.json + bundle (2) + identity (5), with room to grow
MAX_IDENTITY_FILE = 1 << 20  # a certificate, key, config or TUF root
MAX_PACKAGE_BYTES = 1 << 36  # 64 GiB: far above any edge model; bounds a hostile flash.json
_CHUNK = 1 << 20
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_PART_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$")
_BOARD_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")


@dataclass(frozen=True)
class FlashInfo:
    """A package's flash.json, validated; ``digest`` is the sha256 of its exact bytes."""

    device_id: str
    board: str
    node: str
    version: int
    model_sha256: str
    files: Mapping[str, tuple[str, int]]  # name -> (sha256, size)
    digest: str

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files.values())

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "device_id": self.device_id, "board": self.board,
                "node": self.node, "version": self.version, "model_sha256": self.model_sha256,
                "files": {k: {"sha256": s, "size": n} for k, (s, n) in sorted(self.files.items())}}


# --- flash.json -----------------------------------------------------------------------


def _check_name(name: Any) -> str:
    """A member name: "flash.json", "bundle/<file>" or "identity/<file>", nothing else."""
    if not isinstance(name, str):
        raise FlashPackageError(f"member name {name!r} is not a string")
    parts = name.split("/")
    ok = (name == FLASH_JSON or (len(parts) == 2 and parts[0] in ("bundle", "identity")
                                 and bool(_PART_RE.match(parts[1])) and parts[1] not in (".", "..")))
    if not ok:
        raise FlashPackageError(f"member {name!r} is not allowed in a flash package (only "
                                "flash.json, bundle/<file> and identity/<file>)")
    if parts[0] == "identity" and parts[1] not in IDENTITY_FILES:
        raise FlashPackageError(f"member {name!r}: identity files are {', '.join(IDENTITY_FILES)}")
    return name


def _parse_info(data: bytes, where: str) -> FlashInfo:
    """Validate flash.json's bytes (every field, the file list, the caps)."""
    if len(data) > MAX_FLASH_JSON:
        raise FlashPackageError(f"{where}: {len(data)} bytes, more than {MAX_FLASH_JSON}")
    try:
        d = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FlashPackageError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(d, dict):
        raise FlashPackageError(f"{where}: must be a JSON object")
    if d.get("format") != FORMAT:
        raise FlashPackageError(f"{where}: format {d.get('format')!r}; this edgellm reads "
                                f"format {FORMAT} (upgrade edgellm on the device)")

    def field(key: str, t: type) -> Any:
        v = d.get(key)
        if not isinstance(v, t) or isinstance(v, bool):
            raise FlashPackageError(f"{where}: field {key!r} is missing or not a {t.__name__}")
        return v

    from ..fleet.protocol import ProtocolError, check_device_id

    device_id, board, node = field("device_id", str), field("board", str), field("node", str)
    version, model_sha = field("version", int), field("model_sha256", str)
    try:
        check_device_id(device_id)
        check_node(node)
    except (ProtocolError, EdgeLLMError) as exc:
        raise FlashPackageError(f"{where}: {exc}") from None
    if not _BOARD_RE.match(board):
        raise FlashPackageError(f"{where}: board {board!r} is not a board id")
    if version < 1:
        raise FlashPackageError(f"{where}: version must be >= 1")
    if not _SHA_RE.match(model_sha):
        raise FlashPackageError(f"{where}: model_sha256 is not a sha256")
    raw = field("files", dict)
    if len(raw) > MAX_MEMBERS - 1:
        raise FlashPackageError(f"{where}: {len(raw)} files, more than {MAX_MEMBERS - 1}")
    files: dict[str, tuple[str, int]] = {}
    for name, entry in sorted(raw.items()):
        if _check_name(name) == FLASH_JSON:
            raise FlashPackageError(f"{where}: flash.json cannot list itself")
        sha = entry.get("sha256") if isinstance(entry, dict) else None
        size = entry.get("size") if isinstance(entry, dict) else None
        if not isinstance(sha, str) or not _SHA_RE.match(sha):
            raise FlashPackageError(f"{where}: files[{name!r}].sha256 is not a sha256")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise FlashPackageError(f"{where}: files[{name!r}].size is not a byte count")
        if name.startswith("identity/") and size > MAX_IDENTITY_FILE:
            raise FlashPackageError(f"{where}: {name} is {size} bytes (cap {MAX_IDENTITY_FILE})")
        files[name] = (sha, size)
    need = [f"bundle/{MODEL_NAME}", f"bundle/{MANIFEST_NAME}",
            *(f"identity/{n}" for n in IDENTITY_REQUIRED)]
    missing = [n for n in need if n not in files]
    if missing:
        raise FlashPackageError(f"{where}: the package lacks {', '.join(missing)}")
    if files[f"bundle/{MODEL_NAME}"][0] != model_sha:
        raise FlashPackageError(f"{where}: model_sha256 differs from bundle/{MODEL_NAME}'s sha256")
    total = sum(s for _, s in files.values())
    if total > MAX_PACKAGE_BYTES:
        raise FlashPackageError(f"{where}: {total} bytes in all, more than {MAX_PACKAGE_BYTES}")
    return FlashInfo(device_id, board, node, version, model_sha, files,
                     hashlib.sha256(data).hexdigest())


def _info_bytes(info: Mapping[str, Any]) -> bytes:
    return (json.dumps(info, indent=2, sort_keys=True) + "\n").encode("utf-8")


def read_package(package_dir: PathLike) -> FlashInfo:
    """Read and validate a package folder's flash.json (no hashing: see verify_package).

    Raises:
        FlashPackageError: no flash.json, or a malformed one.
    """
    p = Path(package_dir) / FLASH_JSON
    try:
        with open(p, "rb") as f:
            data = f.read(MAX_FLASH_JSON + 1)
    except OSError as exc:
        raise FlashPackageError(f"{package_dir} is not a flash package: {exc.strerror}: {p}") \
            from None
    return _parse_info(data, str(p))


def verify_package(package_dir: PathLike) -> FlashInfo:
    """Check every file against flash.json (size, then sha256) and the parts' consistency.

    Returns:
        The FlashInfo.

    Raises:
        FlashPackageError: a missing, resized or altered file; a bundle manifest or device.toml
            that says another model, node, version or device than flash.json.
    """
    root = Path(package_dir)
    info = read_package(root)
    for name, (sha, size) in info.files.items():
        p = root / name
        if not p.is_file() or p.is_symlink():
            raise FlashPackageError(f"{root}: {name} is missing (or not a regular file)")
        if p.stat().st_size != size:
            raise FlashPackageError(f"{p}: {p.stat().st_size} bytes, flash.json says {size}")
        if sha256_file(p) != sha:
            raise FlashPackageError(f"{p}: sha256 differs from flash.json: altered or corrupt")
    try:
        b = read_manifest(root / "bundle")
        b.verify()
    except EdgeLLMError as exc:
        raise FlashPackageError(f"{root}: bundle: {exc}") from None
    if (b.file(MODEL_NAME).sha256, b.node, b.version) != (info.model_sha256, info.node,
                                                         info.version):
        raise FlashPackageError(f"{root}: bundle.json is {b.node}@{b.version}, flash.json says "
                                f"{info.node}@{info.version}")
    cfg = _load_identity(root / "identity")
    if cfg.device_id != info.device_id:
        raise FlashPackageError(f"{root}: device.toml is for {cfg.device_id}, flash.json for "
                                f"{info.device_id}")
    return info


def _load_identity(folder: Path) -> Any:
    from ..fleet.device_config import load_device_config

    try:
        return load_device_config(folder / "device.toml", check_files=True)
    except EdgeLLMError as exc:
        raise FlashPackageError(f"identity {folder}: {exc}") from None


# --- making and packing -----------------------------------------------------------------


def make_package(out_dir: PathLike, *, bundle_dir: PathLike, identity_dir: PathLike,
                 board: str) -> Path:
    """Write a package folder: the verified build, the identity and flash.json (last).

    The identity's device.toml is rewritten for this build (board, node, version; state_dir
    "state"), its other fields unchanged, so the agent's birth reports the flashed model.

    Args:
        out_dir: the package folder; it must not exist or be empty.
        bundle_dir: a build folder (model.gguf + bundle.json), verified here.
        identity_dir: the hub's provisioning folder of the device (HubHome.add_device).
        board: the board id the device is (the caller checked the build runs on it).

    Returns:
        out_dir as a Path.

    Raises:
        FlashPackageError: a build that fails verification, an incomplete identity, a
            non-empty out_dir.
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FlashPackageError(f"{out} exists and is not an empty folder")
    if not _BOARD_RE.match(board):
        raise FlashPackageError(f"board {board!r} is not a board id")
    try:
        b = read_manifest(bundle_dir).verify()
    except EdgeLLMError as exc:
        raise FlashPackageError(f"build {bundle_dir}: {exc}") from None
    ident = Path(identity_dir)
    cfg = _load_identity(ident)
    made = not out.exists()
    try:
        _write_package(out, b, ident, cfg, board)
    except BaseException:
        _clear(out, made)
        raise
    return out


def _write_package(out: Path, b: Any, ident: Path, cfg: Any, board: str) -> None:
    (out / "bundle").mkdir(parents=True, exist_ok=True)
    (out / "identity").mkdir(exist_ok=True)
    files: dict[str, dict[str, Any]] = {}
    for f in (MODEL_NAME, MANIFEST_NAME):
        shutil.copyfile(b.folder / f, out / "bundle" / f)
    for n in IDENTITY_FILES[1:]:
        if (ident / n).is_file():
            shutil.copyfile(ident / n, out / "identity" / n)
            if n in SECRET_FILES:
                os.chmod(out / "identity" / n, 0o600)
    from ..fleet.device_config import write_device_config

    # Paths inside the hub's device folder move with it (written relative to device.toml).
    src = ident.absolute()
    moved: dict[str, Path] = {}
    for fld in dataclasses.fields(cfg):
        v = getattr(cfg, fld.name)
        if isinstance(v, Path) and v.absolute().is_relative_to(src):
            moved[fld.name] = out.absolute() / "identity" / v.absolute().relative_to(src)
    write_device_config(out / "identity" / "device.toml", dataclasses.replace(
        cfg, **{**moved, "board": board, "node": b.node, "version": b.version,
                "model_path": None}))
    for p in sorted((out / "bundle").iterdir()) + sorted((out / "identity").iterdir()):
        files[f"{p.parent.name}/{p.name}"] = {"sha256": sha256_file(p), "size": p.stat().st_size}
    info = {"format": FORMAT, "device_id": cfg.device_id, "board": board, "node": b.node,
            "version": b.version, "model_sha256": b.file(MODEL_NAME).sha256, "files": files}
    data = _info_bytes(info)
    _parse_info(data, str(out / FLASH_JSON))  # what we write must read back
    atomic_write(out / FLASH_JSON, data)


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname = size, 0, 0, 0, "", ""
    ti.mode = 0o600 if name.rsplit("/", 1)[-1] in SECRET_FILES else 0o644
    ti.type = tarfile.REGTYPE
    return ti


def pack(package_dir: PathLike, out_file: PathLike) -> Path:
    """One deterministic uncompressed tar of the package: flash.json first, then sorted files.

    Same package, same bytes (mtime 0, owner 0, fixed modes, no folder entries). Written to a
    temporary name, fsynced and renamed, so out_file is complete or absent.

    Raises:
        FlashPackageError: the folder is not a package, or a file's size differs from flash.json.
    """
    root = Path(package_dir)
    info = read_package(root)
    out = Path(out_file)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        with open(tmp, "wb") as raw:
            with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
                data = (root / FLASH_JSON).read_bytes()
                tf.addfile(_tarinfo(FLASH_JSON, len(data)), io.BytesIO(data))
                for name, (_, size) in sorted(info.files.items()):
                    p = root / name
                    if not p.is_file() or p.stat().st_size != size:
                        raise FlashPackageError(f"{p}: missing or not {size} bytes as flash.json says")
                    with open(p, "rb") as f:
                        tf.addfile(_tarinfo(name, size), f)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, out)
        fsync_dir(out.parent if str(out.parent) else Path("."))
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno == errno.ENOSPC:
            raise FlashDiskFullError(f"{out}: no space left for the archive") from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


# --- unpacking ------------------------------------------------------------------------


def _free_bytes(path: Path) -> int:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def _copy_checked(src: IO[bytes], dst: Path, size: int, sha: str | None, what: str) -> None:
    """Stream exactly size bytes into a new file, hashing; fsync it."""
    h = hashlib.sha256()
    left = size
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                 0o600 if dst.name in SECRET_FILES else 0o644)
    with os.fdopen(fd, "wb") as f:
        while left:
            chunk = src.read(min(_CHUNK, left))
            if not chunk:
                raise FlashPackageError(f"{what}: the archive ends early (truncated)")
            h.update(chunk)
            f.write(chunk)
            left -= len(chunk)
        f.flush()
        os.fsync(f.fileno())
    if sha is not None and h.hexdigest() != sha:
        raise FlashPackageError(f"{what}: sha256 differs from flash.json: altered or corrupt")


def unpack(archive: PathLike, dest_dir: PathLike) -> Path:
    """Extract a package archive safely into dest_dir (which must not exist or be empty).

    Only regular files named as flash.json allows are taken (no links, devices, folders,
    absolute or ``..`` names, duplicates); flash.json must come first and every later
    member must have the size and sha256 it lists. On any failure dest_dir is removed again.

    Returns:
        dest_dir, a package folder (verify_package passes on it).

    Raises:
        FlashPackageError: an unsafe, malformed, truncated or altered archive.
        FlashDiskFullError: less free space at dest_dir than the package needs (checked first).
    """
    dest = Path(dest_dir)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise FlashPackageError(f"{dest} exists and is not an empty folder")
    made = not dest.exists()
    _prescan(Path(archive))
    try:
        with tarfile.open(archive, mode="r:") as tf:
            info = _unpack_members(tf, dest, str(archive))
        if verify_package(dest).digest != info.digest:
            raise FlashPackageError(f"{archive}: flash.json changed while unpacking")
        return dest
    except tarfile.TarError as exc:
        _clear(dest, made)
        raise FlashPackageError(f"{archive}: not a flash package archive ({exc})") from None
    except OSError as exc:
        _clear(dest, made)
        if exc.errno == errno.ENOSPC:
            raise FlashDiskFullError(f"{dest}: no space left while unpacking") from None
        raise
    except BaseException:
        _clear(dest, made)
        raise


def _prescan(archive: Path) -> None:
    """Walk the raw tar headers before tarfile does: tarfile reads an extended header (pax,
    GNU long name) whole into memory, so a hostile size there is refused here first."""
    try:
        with open(archive, "rb") as f:
            for _ in range(2 * MAX_MEMBERS + 2):
                block = f.read(512)
                if len(block) < 512 or block == bytes(512):
                    return  # the end (or a truncation tarfile reports)
                raw = block[124:136]
                size = (int.from_bytes(raw[1:], "big") if raw[0] & 0x80 else
                        int(raw.rstrip(b"\0 ").decode("ascii") or "0", 8))
                if block[156:157] in (b"x", b"g", b"L", b"K") and size > MAX_FLASH_JSON:
                    raise FlashPackageError(f"{archive}: an extended tar header of {size} bytes")
                f.seek((size + 511) // 512 * 512, os.SEEK_CUR)
    except FlashPackageError:
        raise
    except (ValueError, UnicodeDecodeError):
        raise FlashPackageError(f"{archive}: not a flash package archive (bad tar header)") \
            from None
    except OSError as exc:
        raise FlashPackageError(f"{archive}: cannot read it: {exc.strerror}") from None


def _clear(dest: Path, made: bool) -> None:
    if made:
        shutil.rmtree(dest, ignore_errors=True)
    elif dest.is_dir():
        for p in dest.iterdir():
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def _unpack_members(tf: tarfile.TarFile, dest: Path, where: str) -> FlashInfo:
    info: FlashInfo | None = None
    seen: set[str] = set()
    for i, m in enumerate(tf):
        if i >= MAX_MEMBERS:
            raise FlashPackageError(f"{where}: more than {MAX_MEMBERS} members")
        if not m.isreg():
            raise FlashPackageError(f"{where}: member {m.name!r} is not a regular file "
                                    "(links, folders and devices are refused)")
        name = _check_name(m.name)
        if name in seen:
            raise FlashPackageError(f"{where}: member {name!r} appears twice")
        seen.add(name)
        src = tf.extractfile(m)
        assert src is not None  # a regular member always has a file object
        if info is None:
            if name != FLASH_JSON:
                raise FlashPackageError(f"{where}: the first member must be flash.json")
            info = _parse_info(src.read(MAX_FLASH_JSON + 1), f"{where}:{FLASH_JSON}")
            free = _free_bytes(dest)
            if info.total_bytes + m.size > free:
                raise FlashDiskFullError(f"{dest}: the package needs {info.total_bytes} bytes, "
                                         f"{free} are free")
            dest.mkdir(parents=True, exist_ok=True)
            (dest / "bundle").mkdir(exist_ok=True)
            (dest / "identity").mkdir(exist_ok=True)
            src = tf.extractfile(m)
            assert src is not None
            _copy_checked(src, dest / FLASH_JSON, m.size, None, f"{where}:{FLASH_JSON}")
            continue
        if name not in info.files:
            raise FlashPackageError(f"{where}: member {name!r} is not listed in flash.json")
        sha, size = info.files[name]
        if m.size != size:
            raise FlashPackageError(f"{where}: {name} is {m.size} bytes, flash.json says {size}")
        _copy_checked(src, dest / name, size, sha, f"{where}:{name}")
    if info is None:
        raise FlashPackageError(f"{where}: an empty archive")
    missing = sorted(set(info.files) - seen)
    if missing:
        raise FlashPackageError(f"{where}: the archive lacks {', '.join(missing)} (truncated?)")
    for d in (dest / "bundle", dest / "identity", dest):
        fsync_dir(d)
    return info


# --- installing -----------------------------------------------------------------------


def installed_info(device_root: PathLike) -> FlashInfo | None:
    """The flash.json of the package last installed in device_root (None: none, or invalid)."""
    try:
        return read_package(device_root)
    except FlashPackageError:
        return None


@contextlib.contextmanager
def _private_umask() -> Iterator[None]:
    """Files created inside are 0600 at birth (the device key is never readable by others).

    The umask is process-wide: installing runs in the flash receiver, not beside other work.
    """
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


def install_package(package_dir: PathLike, device_root: PathLike, *,
                    reprovision: bool = False) -> Any:
    """Install a package into a device root; returns the active model (slots.Active).

    Order: verify the package, that it keeps a provisioned device's identity (unless
    reprovision) and the free space (nothing written yet); take the store's inter-process
    lock (``updater.store_lock``: the running agent's Updater waits or skips its tick); stage
    the identity files as fsynced temporaries; install the model (provision, or the
    updater's apply of a full bundle: stage, verify, switch, health check, commit or roll
    back); then rename the identity files into place and write flash.json last. A refusal or
    rollback removes the temporaries: the device keeps its old model and identity. A package
    already installed (same model active, same identity bytes) changes nothing.

    Args:
        package_dir: a package folder (``unpack``).
        device_root: the device root (DEVICE_ROOT).
        reprovision: allow a package whose identity differs from the one the device has
            (another device id, broker, certificate, key, CA or TUF root). Off by default,
            so an unauthenticated link (the serial receiver) can provision a blank device or
            re-install its own identity, never re-anchor a provisioned device's trust.

    Raises:
        FlashPackageError: the package fails verification.
        FlashIdentityError: the device is provisioned with another identity and reprovision
            is off (nothing was written).
        FlashDiskFullError: the device root has too little free space.
        FlashError: the update path refused the model or rolled it back (the detail says why).
    """
    from ..fleet.slots import Active, SlotStore
    from ..fleet.updater import Update, Updater, store_lock

    pkg, root = Path(package_dir), Path(device_root)
    info = verify_package(pkg)
    ident = {n: (pkg / "identity" / n).read_bytes() for n in IDENTITY_FILES
             if (pkg / "identity" / n).is_file()}
    if not reprovision:
        _check_identity(pkg, root, ident)
    target = Active(info.model_sha256, info.node, info.version)
    store = SlotStore(root / MODELS_DIR)
    changed = {n: b for n, b in ident.items() if not _same(root / n, b)}
    flash_bytes = (pkg / FLASH_JSON).read_bytes()
    if store.read_pointer("current") == target and store.valid(target) and not changed:
        if not _same(root / FLASH_JSON, flash_bytes):
            atomic_write(root / FLASH_JSON, flash_bytes)
        return target
    need = sum(size for name, (_, size) in info.files.items()
               if name.startswith("identity/") or not store.valid(target)) + len(flash_bytes)
    free = _free_bytes(root)
    if need > free:
        raise FlashDiskFullError(f"{root}: installing needs {need} bytes, {free} are free "
                                 "(nothing was written)")
    root.mkdir(parents=True, exist_ok=True)
    tmps: list[tuple[Path, Path]] = []
    try:
        with store_lock(store.root).hold():  # the agent's Updater keeps out until we are done
            if not reprovision:  # again under the lock: another flash may have finished
                _check_identity(pkg, root, ident)
            with _private_umask():
                for n, data in sorted(changed.items()):  # stage: fsynced, not in place
                    tmp = root / f".{n}.flash-new"
                    with open(tmp, "wb") as f:
                        f.write(data)
                        f.flush()
                        os.fsync(f.fileno())
                    if n not in SECRET_FILES:
                        os.chmod(tmp, 0o644)
                    tmps.append((tmp, root / n))
            active = _install_model(store, pkg, info, target, Update, Updater)
            for tmp, final in tmps:
                os.replace(tmp, final)
            fsync_dir(root)
            atomic_write(root / FLASH_JSON, flash_bytes)
            return active
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EFBIG):
            raise FlashDiskFullError(f"{root}: no space left while installing ({exc.strerror}); "
                                     "the device keeps its previous model and identity") from None
        raise
    finally:
        for tmp, _ in tmps:
            tmp.unlink(missing_ok=True)


# device.toml fields that are the device's identity and trust (node, version, model and the
# agent's tuning change with each build and may differ)
IDENTITY_FIELDS = ("device_id", "host", "port", "ca", "cert", "key", "tuf_root", "models_dir")


def _identity_of(toml: Path) -> tuple[Any, ...]:
    """device.toml's identity fields, paths written relative to its folder when inside it."""
    from ..fleet.device_config import load_device_config

    cfg = load_device_config(toml, check_files=False)
    base = toml.parent.absolute()

    def norm(v: Any) -> Any:
        if isinstance(v, Path):
            a = v.absolute()
            return a.relative_to(base).as_posix() if a.is_relative_to(base) else str(a)
        return v

    return tuple(norm(getattr(cfg, f)) for f in IDENTITY_FIELDS)


def _check_identity(pkg: Path, root: Path, ident: Mapping[str, bytes]) -> None:
    """Refuse (no write) a package that would change a provisioned device's identity.

    Provisioned: the root has device.toml or provisioned-root.json. The package may then
    only bring the same device.toml identity fields and the same bytes of every other
    identity file it carries; a device.toml that cannot be read counts as different.
    """
    if not ((root / "device.toml").exists() or (root / "provisioned-root.json").exists()):
        return  # a blank device: first provisioning
    differs = [n for n in sorted(ident) if n != "device.toml" and not _same(root / n, ident[n])]
    try:
        if _identity_of(root / "device.toml") != _identity_of(pkg / "identity" / "device.toml"):
            differs.insert(0, "device.toml (device id, broker or trust paths)")
    except (EdgeLLMError, OSError) as exc:
        differs.insert(0, f"device.toml (the device's does not read: {exc})")
    if differs:
        raise FlashIdentityError(
            f"{root} is already provisioned and this package would replace its "
            f"{', '.join(differs)}: refused, nothing was written. Re-provisioning a device "
            "takes an authenticated operator: flash it over ssh://, or run `edgellm receive "
            "--reprovision` on the device itself (docs/flash.md, \"Re-provisioning\")")


def _install_model(store: Any, pkg: Path, info: FlashInfo, target: Any, update_cls: Any,
                   updater_cls: Any) -> Any:
    if store.read_pointer("current") is None and store.read_pointer("last_good") is None:
        return _provision(store, pkg)  # a new device: nothing to roll back to
    updater = updater_cls(store.root)
    try:
        updater.boot()
    except EdgeLLMError:  # pointers name models that are gone: start over as a new device
        return _provision(store, pkg)
    seen = {r["id"] for r in updater.reports()}
    try:
        report = updater.apply(update_cls(
            "bundle", info.node, info.version, info.model_sha256,
            {MODEL_NAME: pkg / "bundle" / MODEL_NAME,
             MANIFEST_NAME: pkg / "bundle" / MANIFEST_NAME}))
    except OSError:
        with contextlib.suppress(OSError, EdgeLLMError):
            updater.boot()  # undo the half-staged copy (the journal says staging: abort it)
        raise
    finally:  # a flash is not a hub rollout: nothing of it goes upstream
        for r in updater.reports():
            if r["id"] not in seen:
                updater.ack_report(r["id"])
    if report["outcome"] not in ("committed", "already_installed"):
        raise FlashError(f"the device refused the model ({report['outcome']}, "
                         f"{report['reason']}): {report['detail']}; it keeps "
                         f"{updater.active.describe() if updater.active else 'its model'}")
    return target


def _provision(store: Any, pkg: Path) -> Any:
    try:
        return store.provision(pkg / "bundle")
    except OSError:  # a cut copy: nothing points at it, remove it now rather than at next gc
        shutil.rmtree(store.staging_dir("provision"), ignore_errors=True)
        raise


def _same(path: Path, data: bytes) -> bool:
    try:
        return path.stat().st_size == len(data) and path.read_bytes() == data
    except OSError:
        return False

