# SPDX-License-Identifier: MIT
"""`edgellm doctor`: check that a device can run its model and reach its hub, and say how to fix it.

Checks, in order (each PASS, WARN or FAIL, with a one-line fix unless it passed):

- ``config``: device.toml loads (edgellm.fleet.device_config), its certificate files exist;
- ``cpu``: this CPU's architecture and ISA features (as ``edgellm info`` and the board
  profiles see them, edgellm.boards) cover the board profile and the model's bundle;
- ``model``: the served model (the SlotStore's current pointer, else [model] path) is
  complete and its sha256 matches its manifest;
- ``memory``: the model's estimated resident memory (edgellm.hub.estimate) fits in RAM;
- ``storage``: free space at the state and models folders leaves room to stage an update;
- ``clock``: the time is not before this edgellm's build, and inside the validity of the
  device certificate and of the broker's certificate (TLS fails on a wrong clock);
- ``broker``: a TLS connection to [broker] host:port with the device certificate, trusting
  only the configured CA, within a short timeout. No MQTT session is opened, so a running
  agent is not disturbed; under TLS 1.3 a refused client certificate shows up as an alert
  right after the handshake, which the check waits for.

Public API: ``Check``, ``run_checks(config=None, board=None, *, timeout=5.0, now=None)``,
``format_report(checks)``, ``DEFAULT_CONFIG``. ``edgellm doctor`` exits 1 when a check FAILs.

.. versionadded:: 0.1
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from .errors import EdgeLLMError

__all__ = ["DEFAULT_CONFIG", "Check", "format_report", "run_checks"]

PathLike = Union[str, "os.PathLike[str]"]
DEFAULT_CONFIG = Path("/var/lib/edgellm/device.toml")
BUILD_FLOOR = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)  # no edgellm 0.1 predates it
MIN_FREE = 16 << 20  # below this even the queue and pointers cannot be written safely
CERT_WARN_DAYS = 30
_MIB = 1 << 20

PASS, WARN, FAIL = "PASS", "WARN", "FAIL"


@dataclass(frozen=True)
class Check:
    """One check's outcome: name, status (PASS/WARN/FAIL), what was found, how to fix it."""

    name: str
    status: str
    detail: str
    fix: str = ""

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "status": self.status, "detail": self.detail, "fix": self.fix}


def _mib(n: float) -> str:
    return f"{n / _MIB:,.0f} MiB" if n >= _MIB else f"{n / 1024:,.0f} KiB"


def _utc(t: dt.datetime) -> str:
    return t.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


# --- the checks ----------------------------------------------------------------------------


def _check_config(path: Path) -> tuple[Check, Any]:
    from .fleet.device_config import load_device_config

    if not path.is_file():
        return Check("config", FAIL, f"no device config at {path}",
                     "give --config PATH, or provision this device (edgellm flash ... or "
                     "edgellm firstboot)"), None
    try:
        cfg = load_device_config(path)
    except EdgeLLMError as exc:
        return Check("config", FAIL, str(exc),
                     "fix the field it names, or flash the device again for a fresh identity"), None
    return Check("config", PASS, f"{path}: device {cfg.device_id}, board {cfg.board}, broker "
                 f"{cfg.host}:{cfg.port}"), cfg


def _check_cpu(board: str | None, bundle: Any) -> tuple[Check, Any]:
    from . import boards

    arch, have = boards.host_arch(), boards.host_isa_features()
    detail = f"{arch}, {' '.join(sorted(have)) or 'no SIMD features'}"
    prof = None
    if board:
        try:
            prof = boards.load_board(board)
        except EdgeLLMError as exc:
            return Check("cpu", FAIL, f"{detail}; {exc}",
                         "give --board with one of `edgellm boards` names"), None
        problems = prof.host_problems()
        if problems:
            return Check("cpu", FAIL, f"{detail}; board {prof.name} needs {'; '.join(problems)}",
                         f"this machine is not a {prof.name}: use the right --board, or flash a "
                         "build made for this board"), prof
    if bundle is not None:
        missing = [f for f in bundle.isa_features if f not in have]
        if bundle.isa_features and missing and (prof is None or prof.arch == arch):
            return Check("cpu", FAIL, f"{detail}; the model was built for {bundle.board} and "
                         f"needs {' '.join(missing)}",
                         f"flash a build for this board (edgellm flash --board {board or '...'})"
                         ), prof
    needs = f"; {prof.name} needs {' '.join(prof.isa_features) or 'nothing more'}" if prof else ""
    return Check("cpu", PASS, detail + needs), prof


def _models_dir(cfg: Any, config_path: Path) -> Path:
    md = getattr(cfg, "models_dir", None) if cfg is not None else None
    return Path(md) if md else config_path.parent / "models"


def _check_model(cfg: Any, config_path: Path) -> tuple[Check, Any]:
    from .fleet.slots import SlotStore
    from .formats.bundle import read_manifest

    store = SlotStore(_models_dir(cfg, config_path))
    fix = ("the agent falls back to the last good model when it starts; if none is left, flash "
           "the device again (edgellm flash)")
    try:
        active = store.read_pointer("current")
    except EdgeLLMError as exc:
        return Check("model", FAIL, f"{store.root}/current: {exc}", fix), None
    try:
        if active is not None:
            bundle = store.verify(active)  # reads pointers only: doctor never repairs
            return Check("model", PASS, f"{active.describe()} verified (sha256 of "
                         f"{_mib(bundle.model_size)})"), bundle
        path = getattr(cfg, "model_path", None)
        if path is not None:
            bundle = read_manifest(Path(path).parent).verify()
            return Check("model", PASS, f"{path} verified ({bundle.node}@{bundle.version})"), bundle
    except EdgeLLMError as exc:
        return Check("model", FAIL, str(exc), fix), None
    return Check("model", FAIL, f"no model installed ({store.root} has no current pointer)",
                 "flash a model onto the device (edgellm flash --board B --device ID ...)"), None


def _meminfo() -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        text = Path("/proc/meminfo").read_text(encoding="ascii", errors="replace")
    except OSError:
        return out
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[key] = int(parts[0]) * 1024  # kB
    return out


def _check_memory(prof: Any, bundle: Any) -> Check:
    info = _meminfo()
    total, avail = info.get("MemTotal"), info.get("MemAvailable")
    if total is None or avail is None:
        return Check("memory", WARN, "cannot read /proc/meminfo", "run doctor on Linux")
    detail = f"{_mib(total)} total, {_mib(avail)} available"
    if prof is not None and total < prof.ram_mb * _MIB * 0.85:
        return Check("memory", WARN, f"{detail}; board {prof.name} has {prof.ram_mb} MiB",
                     "check --board (a smaller RAM variant has its own profile)")
    if bundle is not None:
        from .boards import usable_cpus
        from .hub.estimate import memory_bytes

        try:
            need = memory_bytes(bundle.config, bundle.weights_bytes, bundle.config.seq_len,
                                "f16", n_threads=usable_cpus()).total
        except EdgeLLMError as exc:
            return Check("memory", WARN, f"{detail}; no estimate ({exc})", "")
        detail += f"; the model needs about {_mib(need)} at its full context"
        if need > total:
            return Check("memory", FAIL, detail, "flash a smaller build for this board "
                         "(edgellm select shows what fits)")
        if need > avail:
            return Check("memory", WARN, detail, "stop other programs, or flash a smaller build")
    return Check("memory", PASS, detail)


def _free(path: Path) -> tuple[Path, int]:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p, shutil.disk_usage(p).free


def _check_storage(paths: list[Path], bundle: Any) -> Check:
    size = int(bundle.model_size) if bundle is not None else 0
    need, want = size + MIN_FREE, 2 * size + 256 * _MIB  # one staged update; two and room
    seen: dict[Path, int] = {}
    for p in paths:
        q, free = _free(p)
        seen[q] = free
    worst_path, worst = min(seen.items(), key=lambda kv: kv[1])
    detail = ", ".join(f"{_mib(free)} free at {p}" for p, free in seen.items())
    what = f" (an update of this model stages {_mib(size)})" if size else ""
    if worst < need:
        return Check("storage", FAIL, detail + what,
                     f"free at least {_mib(need - worst)} at {worst_path} (old logs, other "
                     "files), or use a larger card")
    if worst < want:
        return Check("storage", WARN, detail + what, f"free space at {worst_path}: updates "
                     "need room for the old and the new model")
    return Check("storage", PASS, detail)


def _build_time() -> dt.datetime:
    """The latest of BUILD_FLOOR and when this edgellm was installed (its files' mtime)."""
    from . import _version

    t = BUILD_FLOOR
    try:
        mtime = os.stat(_version.__file__).st_mtime
        t = max(t, dt.datetime.fromtimestamp(mtime, dt.timezone.utc))
    except OSError:
        pass
    return t


def _cert_window(cert: Any) -> tuple[dt.datetime, dt.datetime]:
    return cert.not_valid_before_utc, cert.not_valid_after_utc


def _check_clock(now: dt.datetime, cfg: Any, broker_cert: Any) -> Check:
    from cryptography import x509

    fix = ("set the time: enable NTP (timedatectl set-ntp true) and let it sync, or check the "
           "RTC battery; a Pi without one starts from the last saved time")
    built = _build_time()
    if now < built:
        return Check("clock", FAIL, f"it is {_utc(now)}, before this edgellm was built or "
                     f"installed ({_utc(built)})", fix)
    notes = [f"{_utc(now)}"]
    certs: list[tuple[str, Any]] = []
    if cfg is not None:
        try:
            certs.append(("device certificate", x509.load_pem_x509_certificate(
                Path(cfg.cert).read_bytes())))
        except (OSError, ValueError) as exc:
            return Check("clock", WARN, f"cannot read {cfg.cert}: {exc}", "flash the device "
                         "again for a fresh identity")
    if broker_cert is not None:
        certs.append(("broker certificate", broker_cert))
    warn = ""
    for what, cert in certs:
        start, end = _cert_window(cert)
        if now < start:
            return Check("clock", FAIL, f"it is {_utc(now)}, before the {what} is valid (from "
                         f"{_utc(start)})", fix)
        if now > end:
            return Check("clock", FAIL, f"the {what} expired {_utc(end)} (it is {_utc(now)})",
                         "if the clock is right, renew it (the hub's certificates: flash the "
                         "device again); else " + fix)
        if now > end - dt.timedelta(days=CERT_WARN_DAYS):
            warn = f"the {what} expires {_utc(end)}"
        notes.append(f"{what} valid until {_utc(end)}")
    if warn:
        return Check("clock", WARN, "; ".join([*notes, warn]), "renew it before it expires "
                     "(flash the device again, or re-issue on the hub)")
    return Check("clock", PASS, "; ".join(notes))


@dataclass
class _Probe:
    ok: bool
    detail: str
    cert: Any = None  # the broker's certificate (cryptography), also when verification failed


def _peer_cert(der: bytes | None) -> Any:
    if not der:
        return None
    from cryptography import x509

    try:
        return x509.load_der_x509_certificate(der)
    except ValueError:
        return None


def _fetch_cert(host: str, port: int, timeout: float) -> Any:
    """The broker's certificate without verifying it (only to compare dates with the clock)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout) as raw, \
                ctx.wrap_socket(raw, server_hostname=host) as s:
            return _peer_cert(s.getpeercert(binary_form=True))
    except (OSError, ssl.SSLError):
        return None


def _probe_broker(cfg: Any, timeout: float) -> _Probe:
    host, port = cfg.host, cfg.port
    where = f"{host}:{port}"
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cfg.ca))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(cfg.cert), str(cfg.key))
    except (OSError, ssl.SSLError) as exc:
        return _Probe(False, f"cannot load the device's TLS files ({exc})")
    try:
        raw = socket.create_connection((host, port), timeout)
    except OSError as exc:
        return _Probe(False, f"cannot connect to {where}: {exc.strerror or exc}")
    try:
        with ctx.wrap_socket(raw, server_hostname=host) as s:
            cert = _peer_cert(s.getpeercert(binary_form=True))
            s.settimeout(min(timeout, 1.0))
            try:  # TLS 1.3: the server's verdict on our certificate arrives after the handshake
                data = s.recv(1)
            except (socket.timeout, TimeoutError):
                return _Probe(True, f"TLS to {where} with the device certificate ({s.version()})",
                              cert)
            except ssl.SSLError as exc:
                return _Probe(False, f"{where} refused the device certificate "
                              f"({exc.reason or exc})", cert)
            except OSError as exc:
                return _Probe(False, f"{where} dropped the connection ({exc.strerror or exc})",
                              cert)
            if not data:
                return _Probe(False, f"{where} closed the connection after the handshake: it "
                              "refused the device certificate", cert)
            return _Probe(True, f"TLS to {where} ({s.version()})", cert)
    except ssl.SSLCertVerificationError as exc:
        return _Probe(False, f"the certificate of {where} does not verify against {cfg.ca}: "
                      f"{exc.verify_message}", _fetch_cert(host, port, timeout))
    except ssl.SSLError as exc:
        return _Probe(False, f"TLS with {where} failed ({exc.reason or exc})")
    except OSError as exc:
        return _Probe(False, f"{where}: {exc.strerror or exc}")
    finally:
        raw.close()


def _broker_check(p: _Probe, cfg: Any, clock: Check) -> Check:
    if p.ok:
        return Check("broker", PASS, p.detail)
    if clock.status == FAIL:
        fix = "fix the clock first (see the clock check): TLS checks dates"
    elif "cannot connect" in p.detail:
        fix = (f"start the hub's broker (edgellm hub broker), check the network, or [broker] "
               f"host/port in the device config (is {cfg.host}:{cfg.port} right?)")
    elif "refused the device certificate" in p.detail or "closed the connection" in p.detail:
        fix = "this device's certificate is revoked or from another hub: flash it again"
    else:
        fix = "check that device.toml's ca is the hub's server CA (flash the device again)"
    return Check("broker", FAIL, p.detail, fix)


# --- running them ---------------------------------------------------------------------------


def run_checks(config: PathLike | None = None, board: str | None = None, *,
               timeout: float = 5.0, now: dt.datetime | None = None) -> list[Check]:
    """Run every check that applies and return them in order.

    Args:
        config: device.toml (default /var/lib/edgellm/device.toml); without one only the
            checks of this machine run (cpu, memory, storage, clock against the build).
        board: the board profile to check against (default: the config's board).
        timeout: seconds for the broker's TCP connect and TLS handshake.
        now: the time to judge (default: the system clock; tests pass another).

    Returns:
        The checks, in the order of the module docstring.
    """
    path = Path(config) if config is not None else DEFAULT_CONFIG
    now = now or dt.datetime.now(dt.timezone.utc)
    checks: list[Check] = []
    cfg_check, cfg = _check_config(path)
    checks.append(cfg_check)
    model_check, bundle = _check_model(cfg, path) if cfg is not None else (None, None)
    cpu, prof = _check_cpu(board or (cfg.board if cfg is not None else None), bundle)
    checks.append(cpu)
    if model_check is not None:
        checks.append(model_check)
    checks.append(_check_memory(prof, bundle))
    places = ([cfg.state_dir, _models_dir(cfg, path)] if cfg is not None else
              [path.parent])
    checks.append(_check_storage(places, bundle))
    probe = _probe_broker(cfg, timeout) if cfg is not None else None
    clock = _check_clock(now, cfg, probe.cert if probe is not None else None)
    checks.append(clock)
    if probe is not None:
        checks.append(_broker_check(probe, cfg, clock))
    return checks


def format_report(checks: list[Check]) -> str:
    """The checks as aligned text lines: STATUS name detail, then "fix:" lines."""
    lines = []
    for c in checks:
        lines.append(f"{c.status:<5} {c.name:<8} {c.detail}")
        if c.fix and c.status != PASS:
            lines.append(f"{'':<14} fix: {c.fix}")
    n_fail = sum(c.status == FAIL for c in checks)
    n_warn = sum(c.status == WARN for c in checks)
    lines.append(f"{len(checks)} checks: {n_fail} failed, {n_warn} warnings")
    return "\n".join(lines)
