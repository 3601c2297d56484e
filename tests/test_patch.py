# SPDX-License-Identifier: MIT
"""Patch files: byte-identical deltas, adapter patches, the exact-base binding, defensive
parsing, and 1,000 random mutations of a delta that are all refused or caught (C1)."""

from __future__ import annotations

import hashlib
import json
import random
import struct
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgellm.errors import PatchBaseError, PatchError
from edgellm.fleet.patch import MAGIC, apply_patch, make_adapter_patch, make_delta, read_patch
from edgellm.formats.adapter import write_adapter
from edgellm.formats.convert import convert
from edgellm.formats.gguf import RawTensor, read_gguf, write_gguf

DATA = Path(__file__).parent / "data" / "stories260K"
PRELUDE = struct.Struct("<8sII")


def rewrite(src: Path, dst: Path, change: Callable[[str, np.ndarray], np.ndarray | None],
            extra: dict[str, Any] | None = None) -> Path:
    """Copy a GGUF, replacing tensors for which change(name, raw uint8) returns new bytes."""
    with read_gguf(src) as f:
        tensors = []
        for t in f.tensors.values():
            raw = np.frombuffer(f.tensor_bytes(t.name), np.uint8)
            new = change(t.name, raw.copy())
            tensors.append((t.name, RawTensor(bytes(raw) if new is None else new.tobytes(),
                                              t.shape), t.type))
        write_gguf(dst, {**dict(f.fields), **(extra or {})}, tensors)
    return dst


def finetune(names: set[str], seed: int, step: float = 1e-3) -> Callable[[str, np.ndarray], np.ndarray | None]:
    """A few F32 tensors nudged as a fine-tuning step would (small relative changes)."""
    rng = np.random.default_rng(seed)

    def change(name: str, raw: np.ndarray) -> np.ndarray | None:
        if name not in names:
            return None
        w = raw.view(np.float32)
        return (w * (1 + step * rng.standard_normal(w.shape).astype(np.float32))).view(np.uint8)
    return change


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("patch")
    f32 = convert(DATA / "stories260K.bin", root / "f32.gguf", type="f32",
                  tokenizer=DATA / "tok512.bin", log=None)
    q8 = convert(DATA / "stories260K.bin", root / "q8.gguf", type="q8_0",
                 tokenizer=DATA / "tok512.bin", log=None)
    tuned = rewrite(f32, root / "f32-tuned.gguf",
                    finetune({"blk.0.attn_q.weight", "blk.2.ffn_down.weight"}, 1),
                    extra={"edgellm.version": 2})  # the header changes too: offsets move
    return {"f32": f32, "q8": q8, "tuned": tuned, "root": root}


def _apply(patch: Path, base: Path | None) -> bytes:
    out = bytearray()
    apply_patch(read_patch(patch), base, out.extend)
    return bytes(out)


@pytest.mark.parametrize("codec", ["lzma", "zlib"])
def test_delta_rebuilds_the_new_file_byte_for_byte(models: dict[str, Path], codec: str) -> None:
    base, new = models["f32"], models["tuned"]
    patch = models["root"] / f"d-{codec}.patch"
    patch.write_bytes(make_delta(base, new, node="en", codec=codec))
    assert _apply(patch, base) == new.read_bytes()
    p = read_patch(patch)
    changed = {t.name: t.src for t in p.tensors if t.src != "base"}
    assert set(changed) == {"blk.0.attn_q.weight", "blk.2.ffn_down.weight"}
    assert p.result_sha256 == hashlib.sha256(new.read_bytes()).hexdigest()
    assert p.size < new.stat().st_size // 10


def test_xor_encoding_beats_plain_for_a_finetuned_tensor(models: dict[str, Path]) -> None:
    xor = make_delta(models["f32"], models["tuned"], xor=True)
    plain = make_delta(models["f32"], models["tuned"], xor=False)
    assert len(xor) < len(plain)
    (models["root"] / "x.patch").write_bytes(xor)
    assert "xor" in {t.src for t in read_patch(models["root"] / "x.patch").tensors}


def test_identical_versions_give_a_tiny_delta(models: dict[str, Path]) -> None:
    patch = models["root"] / "same.patch"
    patch.write_bytes(make_delta(models["q8"], models["q8"]))
    p = read_patch(patch)
    assert {t.src for t in p.tensors} == {"base"} and {s.src for s in p.head} == {"base"}
    assert p.blobs == ()  # only the header's tensor list (names, offsets, sha256s) is sent
    assert patch.stat().st_size < 16 << 10
    assert _apply(patch, models["q8"]) == models["q8"].read_bytes()


def test_a_delta_refuses_another_base_before_writing(models: dict[str, Path]) -> None:
    patch = models["root"] / "d.patch"
    patch.write_bytes(make_delta(models["f32"], models["tuned"]))
    writes: list[bytes] = []
    for base in (models["q8"], models["tuned"], None, models["root"] / "absent.gguf"):
        with pytest.raises(PatchBaseError):
            apply_patch(read_patch(patch), base, writes.append)
    assert writes == []


def test_adapter_patch_round_trip_and_binding(models: dict[str, Path]) -> None:
    with read_gguf(models["q8"]) as f:
        meta = f.metadata
    rng = np.random.default_rng(3)
    pairs = {"blk.1.attn_v.weight": (rng.standard_normal((4, 64)).astype(np.float32),
                                     rng.standard_normal((32, 4)).astype(np.float32))}
    adapter = write_adapter(models["root"] / "a.gguf", meta, pairs, 8.0)
    patch = models["root"] / "a.patch"
    patch.write_bytes(make_adapter_patch(adapter, models["q8"], node="en/medical", codec="zlib"))
    p = read_patch(patch)
    assert (p.kind, p.node, p.codec) == ("adapter", "en/medical", "zlib")
    assert p.tensors == () and p.size == patch.stat().st_size
    assert _apply(patch, models["q8"]) == adapter.read_bytes()
    with pytest.raises(PatchBaseError):
        _apply(patch, models["f32"])
    with pytest.raises(PatchError):  # not an adapter
        make_adapter_patch(models["q8"], models["q8"])


def test_make_delta_refuses_a_layout_it_cannot_reproduce(models: dict[str, Path]) -> None:
    odd = models["root"] / "odd.gguf"
    data = bytearray(models["q8"].read_bytes())
    data += b"\x01"  # a non-zero byte after the last tensor
    odd.write_bytes(bytes(data))
    with pytest.raises(PatchError, match="padding"):
        make_delta(models["q8"], odd)
    with pytest.raises(PatchError, match="codec"):
        make_delta(models["q8"], models["q8"], codec="bz2")


# --------------------------------------------------------------------------------------
# Defensive parsing


def _split(data: bytes) -> tuple[dict[str, Any], bytes]:
    _, _, hlen = PRELUDE.unpack_from(data)
    return json.loads(data[16:16 + hlen]), data[16 + hlen:]


def _join(header: dict[str, Any], payload: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return PRELUDE.pack(MAGIC, 1, len(raw)) + raw + payload


def test_malformed_patches_raise_patch_error(models: dict[str, Path]) -> None:
    good = make_delta(models["f32"], models["tuned"], codec="zlib")
    header, payload = _split(good)
    t = next(i for i, x in enumerate(header["tensors"]) if x["src"] != "base")
    b = header["tensors"][t]["blob"]

    def edit(fn: Callable[[dict[str, Any]], None]) -> bytes:
        h = json.loads(json.dumps(header))
        fn(h)
        return _join(h, payload)

    bomb_payload = bytearray(payload)
    cases: dict[str, bytes] = {
        "empty": b"",
        "magic": b"NOTPATCH" + good[8:],
        "format": good[:8] + struct.pack("<I", 2) + good[12:],
        "header too long": good[:12] + struct.pack("<I", 1 << 30) + good[16:],
        "header not json": PRELUDE.pack(MAGIC, 1, 3) + b"{{{",
        "header a list": _join([], payload),  # type: ignore[arg-type]
        "truncated": good[:-1],
        "appended": good + b"\0",
        "unknown key": edit(lambda h: h.update(evil=1)),
        "unknown kind": edit(lambda h: h.update(kind="exec")),
        "bool size": edit(lambda h: h["result"].update(size=True)),
        "negative offset": edit(lambda h: h["tensors"][t].update(offset=-32)),
        "huge size": edit(lambda h: h["blobs"][b].update(size=1 << 50)),
        "overlap": edit(lambda h: h["tensors"][t + 1].update(offset=h["tensors"][t]["offset"])),
        "past result": edit(lambda h: h["result"].update(size=h["tensors"][-1]["offset"])),
        "base range": edit(lambda h: h["tensors"][0].update(base_offset=h["base"]["size"])),
        "blob twice": edit(lambda h: h["tensors"][t].update(
            blob=header["head"], nbytes=h["tensors"][t]["nbytes"])),
        "bad sha": edit(lambda h: h["base"].update(sha256="X" * 64)),
        "bad src": edit(lambda h: h["tensors"][t].update(src="file:/etc/passwd")),
        "bomb": edit(lambda h: h["blobs"][b].update(size=h["blobs"][b]["size"] - 1)),
        "flipped blob": _join(header, bytes(bomb_payload[:-5]) + bytes([payload[-5] ^ 1])
                              + payload[-4:]),
    }
    path = models["root"] / "bad.patch"
    for name, data in cases.items():
        path.write_bytes(data)
        with pytest.raises(PatchError):
            _apply(path, models["f32"])
            raise AssertionError(f"{name}: accepted")


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes_never_crash_the_parser(tmp_path_factory: pytest.TempPathFactory,
                                             data: bytes) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "p"
    path.write_bytes(MAGIC + data if data[:1] == b"\0" else data)
    with pytest.raises(PatchError):
        read_patch(path)


# --------------------------------------------------------------------------------------
# C1: 1,000 random mutations of a delta


def _mutate(rng: random.Random, good: bytes) -> tuple[str, bytes]:
    header, payload = _split(good)
    kind = rng.choice(["flip", "flip_payload", "truncate", "append", "offset", "nbytes", "src",
                       "base_offset", "blob", "size", "zsize", "swap"])
    if kind == "flip":
        i = rng.randrange(len(good))
        return kind, good[:i] + bytes([good[i] ^ (1 << rng.randrange(8))]) + good[i + 1:]
    if kind == "flip_payload":
        i = rng.randrange(len(payload))
        return kind, _join(header, payload[:i] + bytes([payload[i] ^ 0xFF]) + payload[i + 1:])
    if kind == "truncate":
        return kind, good[:rng.randrange(len(good))]
    if kind == "append":
        return kind, good + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
    ts = header["tensors"]
    t = ts[rng.randrange(len(ts))]
    delta = rng.choice([-64, -32, -1, 1, 32, 64, 4096])
    if kind == "offset":
        t["offset"] += delta
    elif kind == "nbytes":
        t["nbytes"] += delta
    elif kind == "src":
        t["src"] = rng.choice([s for s in ("base", "patch", "xor") if s != t["src"]])
    elif kind == "base_offset":
        t["base_offset"] = (t.get("base_offset") or 0) + delta
    elif kind == "blob":
        t["blob"] = rng.randrange(len(header["blobs"]) + 1)
    elif kind in ("size", "zsize"):
        blob = header["blobs"][rng.randrange(len(header["blobs"]))]
        blob[kind] = max(0, blob[kind] + delta)
    else:  # two tensors swap places in the result
        u = ts[rng.randrange(len(ts))]
        t["offset"], u["offset"] = u["offset"], t["offset"]
    return kind, _join(header, payload)


def test_thousand_mutated_deltas_are_refused_or_caught(models: dict[str, Path]) -> None:
    base, new = models["f32"], models["tuned"]
    good = make_delta(base, new, codec="zlib")
    want = new.read_bytes()
    rng = random.Random(2024)
    path = models["root"] / "mutant.patch"
    outcome = {"refused_at_parse": 0, "caught_while_applying": 0, "harmless": 0}
    kinds: dict[str, int] = {}
    for _ in range(1000):
        kind, data = _mutate(rng, good)
        kinds[kind] = kinds.get(kind, 0) + 1
        path.write_bytes(data)
        try:
            p = read_patch(path)
        except PatchError:
            outcome["refused_at_parse"] += 1
            continue
        out = bytearray()
        try:
            apply_patch(p, base, out.extend)
        except PatchError:
            outcome["caught_while_applying"] += 1
            continue
        # Accepted only if it rebuilt exactly the hub's file (a no-op mutation).
        assert bytes(out) == want, kind
        outcome["harmless"] += 1
    print(f"\n1000 mutations {kinds}: {outcome}")
    assert outcome["refused_at_parse"] + outcome["caught_while_applying"] >= 950


def test_the_cli_makes_inspects_and_applies(models: dict[str, Path]) -> None:
    import subprocess
    import sys

    root = models["root"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "edgellm", "patch", *args],
                              capture_output=True, text=True, timeout=120)

    r = run("delta", str(models["f32"]), str(models["tuned"]), "-o", str(root / "cli.patch"),
            "--node", "en", "--codec", "zlib")
    assert r.returncode == 0 and "% of" in r.stderr, r.stderr
    r = run("info", str(root / "cli.patch"), "--json")
    info = json.loads(r.stdout)
    assert (info["kind"], info["node"], info["codec"]) == ("delta", "en", "zlib")
    r = run("apply", str(root / "cli.patch"), "--base", str(models["f32"]), "-o", str(root / "o.gguf"))
    assert r.returncode == 0 and (root / "o.gguf").read_bytes() == models["tuned"].read_bytes()
    r = run("apply", str(root / "cli.patch"), "--base", str(models["q8"]), "-o", str(root / "x.gguf"))
    assert r.returncode == 1 and "built against base" in r.stderr
    assert not (root / "x.gguf").exists() and not (root / "x.gguf.tmp").exists()
