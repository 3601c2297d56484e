# SPDX-License-Identifier: MIT
"""Board profiles: the shipped files, their sources, the loader's errors, host features and the CLI."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgellm import boards
from edgellm.boards import BoardProfile, BoardProfileError, UnknownBoardError
from edgellm.errors import EdgeLLMError, InvalidArgumentError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
BOARDS = ROOT / "boards"
REQUIRED = {"rpi5", "rpi5-8gb", "rpi4", "rpi-zero-2w", "jetson-orin-nano", "jetson-agx-orin",
            "coral-dev-board", "x86-host"}
NUMERIC_FIELDS = {"cores", "ram_mb", "ram_share", "storage_gb", "mem_bandwidth_gbs",
                  "sustained_factor", "thermal_limit_c"}
RPI5 = (BOARDS / "rpi5.toml").read_text(encoding="utf-8")


def edgellm(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgellm", *args], capture_output=True,
                          text=True, timeout=120, cwd=ROOT,
                          env=None if env is None else {**os.environ, **env})


def numeric_lines(text: str) -> list[tuple[int, str, str, str]]:
    """(line number, key, comment, line) of every line whose TOML value is a number.

    Independent of the loader: a line holding a number has no string in its value, so its
    comment starts at the first '#'.
    """
    out = []
    section = ""
    for n, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if s.startswith("[") and not s.startswith("[["):
            section = s.strip("[]") + "."
            continue
        if "=" not in s or s.startswith("#"):
            continue
        code, _, comment = line.partition("#")
        try:
            parsed = tomllib.loads(code)
        except tomllib.TOMLDecodeError:
            continue  # a string value holding '#', or a multi-line value
        for key, v in parsed.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out.append((n, section + key, comment.strip(), line))
    return out


# --------------------------------------------------------------------------------------
# The shipped profiles


def test_the_required_boards_ship_and_stems_match_names() -> None:
    names = boards.list_boards()
    assert set(names) >= REQUIRED
    assert names == sorted(p.stem for p in BOARDS.glob("*.toml"))
    assert boards.boards_dir().resolve() == BOARDS.resolve()


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_every_shipped_profile_loads_and_matches_its_file(name: str) -> None:
    prof = boards.load_board(name)
    raw = tomllib.loads((BOARDS / f"{name}.toml").read_text(encoding="utf-8"))
    assert raw["schema"] == boards.SCHEMA_VERSION
    assert prof.name == name == prof.path.stem
    assert prof.ram_mb == raw["ram_mb"] and prof.cores == raw["cores"]
    assert prof.isa_features == tuple(raw["isa_features"])
    assert prof.ram_budget_bytes == int(raw["ram_mb"] * 2**20 * raw["ram_share"])
    assert prof.ram_budget_bytes <= prof.ram_mb * 2**20
    assert math.isclose(prof.sustained_bandwidth_bytes_per_s,
                        raw["mem_bandwidth_gbs"] * 1e9 * raw["sustained_factor"])
    assert prof.default_type in prof.quant_types
    assert boards.load_board(prof.path) == prof  # by path too
    json.dumps(prof.to_dict())  # JSON-ready


def test_published_isa_facts_of_the_arm_boards() -> None:
    # Armv8.2 cores (A76, A78AE) have dot product; Armv8.0 ones (A72, A53) do not.
    all_ = boards.load_all()
    for name in ("rpi5", "rpi5-8gb", "jetson-orin-nano", "jetson-agx-orin"):
        assert "dotprod" in all_[name].isa_features, name
    for name in ("rpi4", "rpi-zero-2w", "coral-dev-board"):
        assert all_[name].isa_features == ("neon",), name
    assert all_["x86-host"].arch == "x86_64" and "avx2" in all_["x86-host"].isa_features
    assert all_["coral-dev-board"].backend == "tflite" and all_["coral-dev-board"].tflite_delegate
    assert all(p.backend == "native" for n, p in all_.items() if n != "coral-dev-board")
    assert all_["rpi5-8gb"].ram_mb == 2 * all_["rpi5"].ram_mb


@pytest.mark.parametrize("path", sorted(BOARDS.glob("*.toml")), ids=lambda p: p.stem)
def test_every_number_in_a_shipped_profile_names_its_source(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    lines = numeric_lines(text)
    assert {k for _, k, _, _ in lines} >= NUMERIC_FIELDS  # the scan sees the real fields
    for n, key, comment, line in lines:
        words = re.findall(r"[A-Za-z]{2,}", comment)
        assert len(words) >= 3, f"{path.name}:{n}: {key} has no source comment: {line!r}"
    assert text.startswith("# SPDX-License-Identifier: MIT\n")
    # The loader reads the same comments (what `edgellm boards show` prints).
    src = boards.field_sources(path)
    for _, key, comment, _ in lines:
        assert src[key] == comment


# --------------------------------------------------------------------------------------
# Errors: each names the file, the field and the fix


def sub(old: str, new: str) -> Callable[[str], str]:
    def f(text: str) -> str:
        assert old in text, old
        return text.replace(old, new, 1)
    return f


def drop(key: str) -> Callable[[str], str]:
    return lambda text: re.sub(rf"(?m)^{key} = .*\n", "", text)


def before_measured(extra: str) -> Callable[[str], str]:
    return lambda text: text.replace("[measured]", f"{extra}\n\n[measured]")


BAD = [
    ("missing field", drop("cores"), "cores", "add cores = 4"),
    ("missing schema", drop("schema"), "schema", "add schema = 1"),
    ("newer schema", sub("schema = 1", "schema = 2"), "schema", "write schema = 1"),
    ("string for int", sub("ram_mb = 4096", 'ram_mb = "4GB"'), "ram_mb",
     "field 'ram_mb' must be an integer (got '4GB'); write ram_mb = 4096"),
    ("float for int", sub("ram_mb = 4096", "ram_mb = 4096.0"), "ram_mb", "write ram_mb = 4096"),
    ("bool for int", sub("cores = 4", "cores = true"), "cores", "write cores = 4"),
    ("string for float", sub("ram_share = 0.75", 'ram_share = "75%"'), "ram_share", "write ram_share = 0.75"),
    ("share above 1", sub("ram_share = 0.75", "ram_share = 1.5"), "ram_share", "0.01 <= ram_share <= 1"),
    ("zero factor", sub("sustained_factor = 0.5", "sustained_factor = 0"), "sustained_factor",
     "write sustained_factor = 0.5"),
    ("no cores", sub("cores = 4", "cores = 0"), "cores", "write cores = 4"),
    ("negative bandwidth", sub("mem_bandwidth_gbs = 17.1", "mem_bandwidth_gbs = -17.1"),
     "mem_bandwidth_gbs", "write mem_bandwidth_gbs = 17.1"),
    ("nan bandwidth", sub("mem_bandwidth_gbs = 17.1", "mem_bandwidth_gbs = nan"),
     "mem_bandwidth_gbs", "must be finite"),
    ("unknown ISA feature", sub('"fp16"]', '"fp16", "avx3"]'), "isa_features", "use only: neon"),
    ("x86 feature on arm", sub('"fp16"]', '"fp16", "avx2"]'), "isa_features", "fix arch"),
    ("listed twice", sub('"fp16"]', '"fp16", "neon"]'), "isa_features", "list each value once"),
    ("ISA not a list", sub('isa_features = ["neon", "dotprod", "fp16"]', 'isa_features = "neon"'),
     "isa_features", 'write isa_features = ["neon", "dotprod"]'),
    ("unknown backend", sub('backend = "native"', 'backend = "cuda"'), "backend", 'write backend = "native"'),
    ("unknown arch", sub('arch = "aarch64"', 'arch = "arm64"'), "arch", 'write arch = "aarch64"'),
    ("unknown quant type", sub('"q4_0"]', '"q4_1"]'), "quant_types", "use only: f32"),
    ("no quant types", sub('quant_types = ["f16", "q8_0", "q4_0_mixed", "q4_0"]', "quant_types = []"),
     "quant_types", "write quant_types ="),
    ("default not allowed", sub('default_type = "q4_0_mixed"', 'default_type = "f32"'),
     "default_type", "add it to quant_types"),
    ("tflite without delegate", sub('backend = "native"', 'backend = "tflite"'), "tflite_delegate",
     "write tflite_delegate ="),
    ("delegate on native", before_measured('tflite_delegate = "libedgetpu.so.1"'), "tflite_delegate",
     "remove the tflite_delegate line"),
    ("unknown field", before_measured("ram_gb = 4  # typo"), "ram_gb", "did you mean 'ram_mb'?"),
    ("empty string", sub('soc = "Broadcom BCM2712"', 'soc = ""'), "soc", "write soc ="),
    ("bad name", sub('name = "rpi5"', 'name = "RPi 5"'), "name", "write name ="),
    ("measured not a number", lambda t: t + '"decode_tok_s.abc" = "fast"\n', "measured.decode_tok_s.abc",
     "under [measured]"),
    ("measured negative", lambda t: t + "decode_ratio = -1.0  # x\n", "measured.decode_ratio",
     'write "decode_ratio" = 12.5'),
    ("measured not a table", sub("[measured]", "measured = 3"), "measured", "write [measured]"),
    ("bad TOML syntax", sub("cores = 4", "cores = = 4"), "cores", "fix the syntax there"),
    ("unquoted string", sub('soc = "Broadcom BCM2712"', "soc = Broadcom BCM2712"), "soc",
     "fix the syntax there"),
]


@pytest.mark.parametrize(("case", "mutate", "field", "fix"), BAD, ids=[b[0] for b in BAD])
def test_a_bad_profile_names_file_field_and_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                case: str, mutate: Callable[[str], str],
                                                field: str, fix: str) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rpi5.toml").write_text(mutate(RPI5), encoding="utf-8")
    with pytest.raises(BoardProfileError) as ei:
        boards.load_board("rpi5", tmp_path)
    msg = str(ei.value)
    assert msg.startswith("rpi5.toml: "), msg  # the file, relative to the working directory
    assert f"field '{field}'" in msg and ei.value.field == field, msg
    assert fix in msg, msg
    assert isinstance(ei.value, ValueError) and isinstance(ei.value, EdgeLLMError)
    assert ei.value.path == tmp_path / "rpi5.toml"


def test_the_name_must_be_the_file_stem(tmp_path: Path) -> None:
    path = tmp_path / "rpi9.toml"
    path.write_text(RPI5, encoding="utf-8")
    with pytest.raises(BoardProfileError, match=r"rpi9\.toml: field 'name' must equal the file stem "
                       r"'rpi9' \(got 'rpi5'\); write name = \"rpi9\" or rename the file to rpi5\.toml"):
        boards.load_board(path)


def test_bytes_that_are_not_utf8_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "rpi5.toml"
    path.write_bytes(RPI5.encode() + b"\n# \xff\xfe\n")
    with pytest.raises(BoardProfileError, match="is not UTF-8 text.*save the file as UTF-8"):
        boards.load_board(path)


def test_an_unknown_board_lists_the_valid_ones() -> None:
    with pytest.raises(UnknownBoardError) as ei:
        boards.load_board("rpi6")
    msg = str(ei.value)
    assert "unknown board 'rpi6'" in msg and "did you mean 'rpi5'?" in msg
    for name in boards.list_boards():
        assert name in msg
    assert isinstance(ei.value, LookupError) and isinstance(ei.value, BoardProfileError)
    with pytest.raises(UnknownBoardError, match="valid boards: coral-dev-board"):
        boards.load_board("jetson-xavier")


def test_missing_files_and_folders_are_typed_errors(tmp_path: Path) -> None:
    with pytest.raises(BoardProfileError, match="board profile file not found"):
        boards.load_board(tmp_path / "nope.toml")
    with pytest.raises(BoardProfileError, match="board profile folder not found"):
        boards.list_boards(tmp_path / "nowhere")
    assert boards.list_boards(tmp_path) == [] and boards.load_all(tmp_path) == {}


def test_a_custom_folder_and_the_environment_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "bedside-7.toml").write_text(RPI5.replace('name = "rpi5"', 'name = "bedside-7"'),
                                             encoding="utf-8")
    assert boards.list_boards(tmp_path) == ["bedside-7"]
    assert boards.load_board("bedside-7", tmp_path).ram_mb == 4096
    monkeypatch.setenv("EDGELLM_BOARDS_DIR", str(tmp_path))
    assert boards.boards_dir() == tmp_path
    assert list(boards.load_all()) == ["bedside-7"]


# --------------------------------------------------------------------------------------
# Hypothesis: whatever the file holds, the loader answers a profile or BoardProfileError

VALID = tomllib.loads(RPI5)


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + "}"


def toml_text(d: dict[str, Any]) -> str:
    return "".join(f"{json.dumps(k)} = {toml_value(v)}\n" for k, v in d.items())


scalars = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1), st.floats(), st.booleans(),
    st.text(max_size=12), st.sampled_from(boards.ISA_FEATURES + boards.QUANT_TYPES + boards.ARCHES
                                          + boards.BACKENDS + ("none", "rpi5")))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=3)), max_leaves=6)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(changes=st.dictionaries(st.sampled_from([*VALID, "extra"]), st.one_of(st.none(), values),
                               max_size=4))
def test_random_field_values_never_escape_as_other_errors(changes: dict[str, Any]) -> None:
    d = dict(VALID)
    for k, v in changes.items():
        if v is None:
            d.pop(k, None)
        else:
            d[k] = v
    try:
        prof = boards.parse_board(toml_text(d), "boards/rpi5.toml")
    except BoardProfileError as exc:
        assert str(exc).startswith("boards/rpi5.toml: ")
        return
    # Accepted: the invariants the build and selection code rely on hold.
    assert 0 < prof.ram_share <= 1 and 0 < prof.sustained_factor <= 1
    assert prof.cores >= 1 and prof.ram_budget_bytes > 0 and prof.sustained_bandwidth_bytes_per_s > 0
    assert set(prof.isa_features) <= set(boards.ISA_FEATURES) and prof.default_type in prof.quant_types
    assert all(isinstance(v, float) and math.isfinite(v) for v in prof.measured.values())


@settings(max_examples=200, deadline=None)
@given(data=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(lambda t: RPI5[:len(t)] + t)))
def test_arbitrary_text_never_escapes_as_other_errors(data: bytes | str) -> None:
    try:
        boards.parse_board(data, "boards/rpi5.toml")
    except BoardProfileError:
        pass


# --------------------------------------------------------------------------------------
# Profiles as values


def test_profiles_are_immutable_and_replace_revalidates() -> None:
    p = boards.load_board("rpi5")
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.cores = 8  # type: ignore[misc]
    with pytest.raises(TypeError):
        p.measured["decode_ratio"] = 1.0  # type: ignore[index]
    q = dataclasses.replace(p, measured={"kernel_gbs.q4_0": 3})  # how `edgellm bench` adds rates
    assert q.measured == {"kernel_gbs.q4_0": 3.0} and p.measured == {}
    assert hash(q) == hash(p)  # measured is not hashed; the rest is
    with pytest.raises(BoardProfileError, match="field 'cores'"):
        dataclasses.replace(p, cores=0)


def test_with_bandwidth_and_load_board_bandwidth() -> None:
    host = boards.load_board("x86-host")
    fast = boards.load_board("x86-host", bandwidth_gbs=40.0)
    assert fast.mem_bandwidth_gbs == 40.0 and fast.sustained_factor == 1.0
    assert fast.sustained_bandwidth_bytes_per_s == 40e9
    assert host.sustained_bandwidth_bytes_per_s < 40e9 and host.mem_bandwidth_gbs == 21.3
    assert boards.with_bandwidth(host, 30.0, 0.5).sustained_bandwidth_bytes_per_s == 15e9
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(BoardProfileError, match="mem_bandwidth_gbs"):
            boards.with_bandwidth(host, bad)


def test_required_isa_missing_and_host_can_run() -> None:
    rpi5 = boards.load_board("rpi5")
    assert rpi5.required_isa_missing({"neon"}) == ["dotprod", "fp16"]
    assert rpi5.required_isa_missing(["neon", "dotprod", "fp16", "i8mm"]) == []
    have = boards.host_isa_features()
    host = boards.load_board("x86-host")
    same_arch = boards.host_arch() == "x86_64"
    assert host.host_can_run() == (same_arch and {"avx2", "fma", "f16c"} <= have)
    vnni = dataclasses.replace(host, isa_features=("avx2", "avx512_vnni"))
    assert vnni.host_can_run() == (same_arch and {"avx2", "avx512_vnni"} <= have)
    for p in boards.load_all().values():
        if p.arch != boards.host_arch():
            assert not p.host_can_run() and "this host is" in p.host_problems()[0]


def test_cpu_feature_names_translate_to_the_profile_vocabulary() -> None:
    t = boards.translate_cpu_features
    assert t(["avx", "avx2", "fma", "f16c", "os_ymm"]) == {"avx2", "fma", "f16c"}
    assert t(["avx", "avx2", "fma", "f16c"]) == set()  # the OS does not save YMM registers
    assert t(["avx2", "avx512f", "avx512vnni", "avx512dq", "os_ymm"]) == {"avx2"}
    assert t(["avx512f", "avx512bw", "avx512vl", "avx512vnni", "os_ymm", "os_zmm"]) == {
        "avx512f", "avx512bw", "avx512vl", "avx512_vnni"}
    assert t(["asimd", "asimddp"], {"asimdhp", "i8mm", "sve", "fp"}) == {
        "neon", "dotprod", "fp16", "i8mm", "sve"}
    assert t(["asimd"], {"avx2"}) == {"neon"}  # cpuinfo adds only Arm extras the core lacks
    assert t(None, {"fpu", "avx2", "fma", "avx512_vnni"}) == {"avx2", "fma", "avx512_vnni"}


def test_host_features_agree_with_the_c_core_and_the_kernel() -> None:
    from edgellm import _native

    have = boards.host_isa_features()
    assert have <= set(boards.ISA_FEATURES)
    c = set(_native.build_info()["cpu_features"])
    assert ("avx2" in have) == ({"avx2", "os_ymm"} <= c)
    assert ("neon" in have) == ("asimd" in c)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file() and boards.host_arch() == "x86_64":
        flags = set()
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
        assert have == boards.translate_cpu_features(None, flags)  # two independent detectors


def test_calibrate_bandwidth_measures_a_positive_rate() -> None:
    gbs = boards.calibrate_bandwidth(mib=16, repeats=2, n_threads=1)
    assert math.isfinite(gbs) and 0.1 < gbs < 10_000
    for kwargs in ({"mib": 4}, {"repeats": 0}, {"n_threads": 0}, {"mib": 8.5}):
        with pytest.raises(InvalidArgumentError):
            boards.calibrate_bandwidth(**kwargs)  # type: ignore[arg-type]
    lines = boards.calibration_toml(boards.load_board("x86-host"), gbs, "this test")
    assert lines[0] == f"mem_bandwidth_gbs = {gbs:.1f}  # measured on this test"
    rpi5 = boards.load_board("rpi5")
    assert boards.calibration_toml(rpi5, 8.55, "a Pi")[0].startswith("sustained_factor = 0.50  # measured on a Pi")


def test_comments_and_nested_measured_tables(tmp_path: Path) -> None:
    text = RPI5.replace('description = "Raspberry Pi 5, 4 GB: the default bedside device"',
                        'description = "bed #4, ward \\"B\\""  # where it stands')
    text += "kernel_gbs.q4_0 = 3.5  # measured on bed #4 with edgellm bench --kernels\n"
    text += '"decode_tok_s.ab12" = 9  # measured on bed #4\n'
    path = tmp_path / "rpi5.toml"
    path.write_text(text, encoding="utf-8")
    p = boards.load_board(path)
    assert p.description == 'bed #4, ward "B"'
    assert dict(p.measured) == {"kernel_gbs.q4_0": 3.5, "decode_tok_s.ab12": 9.0}
    src = boards.field_sources(p)
    assert src["description"] == "where it stands"
    assert src["measured.kernel_gbs.q4_0"] == "measured on bed #4 with edgellm bench --kernels"
    assert src["measured.decode_tok_s.ab12"] == "measured on bed #4"


def test_the_docs_describe_every_field() -> None:
    doc = (ROOT / "docs" / "boards.md").read_text(encoding="utf-8")
    for f in dataclasses.fields(BoardProfile):
        if f.name != "path":
            assert f"`{f.name}`" in doc, f.name
    rows = {m.group(1): m.group(0) for m in re.finditer(r"(?m)^\| `([a-z0-9-]+)` \|.*$", doc)}
    for name, p in boards.load_all().items():  # the docs' board table matches the files
        row = rows[name]
        assert f"| {p.ram_mb} MiB | {p.mem_bandwidth_gbs:g} GB/s |" in row, row
        assert row.endswith(f"| {' '.join(p.isa_features)} | {p.backend} |"), row


# --------------------------------------------------------------------------------------
# The command


def test_cli_boards_table() -> None:
    r = edgellm("boards")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:3] == ["name", "SoC", "cores"]
    rows = {ln.split()[0]: ln for ln in lines[1:]}
    assert set(rows) == set(boards.list_boards())
    for name, p in boards.load_all().items():
        assert f"{p.ram_budget_bytes >> 20} MiB" in rows[name]
        assert rows[name].rstrip().endswith("yes") == p.host_can_run()
    j = json.loads(edgellm("boards", "--json").stdout)
    assert [d["name"] for d in j] == boards.list_boards()


def test_cli_boards_show_prints_units_and_sources() -> None:
    r = edgellm("boards", "show", "rpi5")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert out.startswith("rpi5: ")
    for _, key, comment, _ in numeric_lines(RPI5):
        assert f"source: {comment}" in out, key
    assert "17.1 GB/s" in out and "4096 MiB" in out and "85 °C" in out
    assert f"{4096 * 2**20 * 3 // 4:,} bytes" in out
    j = json.loads(edgellm("boards", "show", "rpi5", "--json").stdout)
    assert j == json.loads(json.dumps({**boards.load_board("rpi5").to_dict(),
                                       "host_problems": boards.load_board("rpi5").host_problems(),
                                       "sources": boards.field_sources(BOARDS / "rpi5.toml")}))


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    r = edgellm("boards", "show", "rpi6")
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "did you mean 'rpi5'?" in r.stderr
    (tmp_path / "rpi5.toml").write_text(RPI5.replace("ram_mb = 4096", 'ram_mb = "4GB"'), encoding="utf-8")
    r = edgellm("boards", "--dir", str(tmp_path))
    assert r.returncode == 1
    assert "rpi5.toml: field 'ram_mb' must be an integer (got '4GB'); write ram_mb = 4096" in r.stderr


def test_cli_calibrate() -> None:
    r = edgellm("boards", "calibrate", "--mib", "8", "--repeats", "1", "-t", "1", "--json")
    assert r.returncode == 0, r.stderr
    j = json.loads(r.stdout)
    assert j["board"] == "x86-host" and j["bandwidth_gbs"] > 0 and j["mib"] == 8
    assert j["toml"][0].startswith(f"mem_bandwidth_gbs = {j['bandwidth_gbs']:.1f}  # measured on ")
    assert boards.host_cpu_name() in j["toml"][0]  # the comment names the machine it ran on
