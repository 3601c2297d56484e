# SPDX-License-Identifier: MIT
"""Steps 6-7 of the guided demo: a signed improvement reaches the device, a forged one does
not.

6. ``publish_release`` (`edgellm hub release ... --bundle DIR`) signs version 2 of the leaf
   (its 8-bit build) as TUF targets and starts a rollout; the running hub service offers it,
   the device's agent (DeviceUpdates + Updater) verifies, installs, health-checks, commits
   and reports; the rollout's status is printed.
7. Version 3 is signed, then one byte of its model file on the hub's disk is changed: the
   device refuses it (``hash_mismatch``, an attack), keeps answering with version 2, and the
   hub halts the rollout and flags the device.

Public API: ``step_release(home, agent, bundle, question) -> str``, ``step_forged(home,
agent, bundle, question, good)``, ``restamp(src, dst, version) -> Bundle``.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path
from typing import Any

from ..errors import EdgeLLMError
from .walkthrough import say

_FINAL = ("committed", "rolled_back", "refused", "already_installed")


def restamp(src: Path, dst: Path, version: int) -> Any:
    """A copy of the bundle folder src whose manifest says `version` (the same model bytes):
    the demo ships one trained version of each node, so its builds stand in for later ones."""
    from ..formats.bundle import MODEL_NAME, read_manifest, write_manifest

    b = read_manifest(src)
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    shutil.copyfile(src / MODEL_NAME, dst / MODEL_NAME)
    return write_manifest(dst, board=b.board, isa_features=b.isa_features, recipe=b.recipe,
                          source=b.source, node=b.node, version=version, config=b.config,
                          weights_bytes=b.weights_bytes, lineage=dataclasses.replace(b.lineage),
                          scores=b.scores)


def _wait_report(home: Any, agent: Any, release: int, timeout: float = 60.0) -> dict[str, Any]:
    """Run the device's update loop (agent.tick, as `edgellm agent` does every second) until
    the hub stored the device's final report of release."""
    from ..fleet import store

    end = time.monotonic() + timeout
    with store.connect(home.registry_db) as conn:
        while time.monotonic() < end:
            agent.tick()
            row = conn.execute("SELECT * FROM fleet_updates WHERE device = ? AND release = ? "
                               "ORDER BY stored_at DESC LIMIT 1",
                               (agent.cfg.device_id, release)).fetchone()
            if row is not None and row["outcome"] in _FINAL:
                return dict(row)
            time.sleep(0.05)
    raise EdgeLLMError(f"no report of release {release} reached the hub in {timeout:g} s")


def _rollout_status(home: Any, rid: int, until: tuple[str, ...] = ("done", "halted")) -> str:
    """`edgellm hub rollout status RID`, once the service has judged the rollout."""
    from ..fleet import rollout, store

    end = time.monotonic() + 5
    with store.connect(home.registry_db) as conn:
        st = rollout.status(conn, rid)
        while st["state"] not in until and time.monotonic() < end:
            time.sleep(0.05)
            st = rollout.status(conn, rid)
    return rollout.format_status([st], detail=True)


def step_release(home: Any, agent: Any, bundle: Any, question: str) -> str:
    """Release the 8-bit build as version 2; the device installs it. Returns its answer."""
    from ..fleet.release import publish_release
    from .fleet_step import answer

    say("6. A signed improvement", """`edgellm hub release` signs version 2 as TUF targets:
        the model and its manifest, each with its length and sha256 and a signed block naming
        the node, version, board, a release counter devices never accept going down, and the
        golden answer (the model's greedy tokens for a prompt, run at the hub). The hub
        service offers it over MQTT (one device, one wave here; a fleet gets a canary share
        first and halts when too many fail). The offer is only a hint: the device refreshes
        the signed metadata over its own MQTT connection, checks it against the TUF root it
        was flashed with, checks counter, board and node, downloads the bundle in verified
        chunks beside the running model, switches by one atomic rename, re-runs the golden
        prompt in a child process, and commits -- or rolls back -- and reports upstream.""")
    v2 = restamp(bundle.folder, home.root.parent / "releases" / "leaf-v2", 2)
    prompt = question.replace("\n", "\\n")
    print(f"$ edgellm hub release {bundle.node} --version 2 --bundle {v2.folder} --canary 100% "
          f"--prompt $'{prompt}' --home {home.root}")
    rel = publish_release(home, bundle.node, 2, bundle=v2.folder, prompt=question, canary=1.0)
    print(f"signed as release {rel.release}: {', '.join(rel.targets.values())} "
          f"({rel.sizes['model'] / 1e6:.1f} MB model); rollout {rel.rollout}")
    if rel.health is not None:
        print(f"signed golden answer: {len(rel.health.expected)} greedy tokens of the question, "
              f"p95 under {rel.health.max_ms_per_token:g} ms/token")
    t0 = time.monotonic()
    r = _wait_report(home, agent, rel.release)
    active = agent.updater.active
    print(f"device {agent.cfg.device_id}: {r['outcome']} in {time.monotonic() - t0:.1f} s; "
          f"now serving {active.node} v{active.version} ({bundle.recipe}, sha256 "
          f"{active.model_sha256[:12]}...)")
    print(_rollout_status(home, int(rel.rollout or 0)))
    text = answer(agent, question)
    print(f"{question}{text}")
    return text


def step_forged(home: Any, agent: Any, bundle: Any, question: str, good: str) -> None:
    """Version 3 with one byte changed on the hub's disk after signing: refused."""
    from ..fleet.release import publish_release
    from ..fleet.slots import SlotStore
    from ..fleet.tuf_repo import TufRepo
    from .fleet_step import answer

    say("7. A forged update", """The hub signs version 3 (the same weights, stamped anew).
        Then someone who can write the hub's disk, but holds none of its signing keys, changes
        one byte of the model file -- as a planted model would. The signed metadata still
        holds the true sha256 and length, and re-signing it needs the keys, so the device's
        TUF client refuses the download with a typed reason, marked as an attack. Nothing is
        staged; the device keeps answering with version 2; the hub halts the rollout and flags
        the device.""")
    v3 = restamp(bundle.folder, home.root.parent / "releases" / "leaf-v3", 3)
    print(f"$ edgellm hub release {bundle.node} --version 3 --bundle {v3.folder} --canary 100% "
          f"--no-health --home {home.root}")
    rel = publish_release(home, bundle.node, 3, bundle=v3.folder, health=False, canary=1.0)
    path = TufRepo.open(home).target_file(rel.targets["model"])
    if path is None:
        raise EdgeLLMError(f"release {rel.release}: no stored model target")
    raw = bytearray(path.read_bytes())
    at = len(raw) // 2
    raw[at] ^= 0x01
    path.write_bytes(bytes(raw))
    print(f"signed as release {rel.release}, rollout {rel.rollout}; then byte {at:,} of "
          f"{path.relative_to(home.root)} flipped on the hub's disk")
    r = _wait_report(home, agent, rel.release)
    print(f"device {agent.cfg.device_id}: {r['outcome']}, reason {r['reason']}, attack "
          f"{bool(r['attack'])}: {r['detail'][:150]}")
    active = agent.updater.active
    models = SlotStore(agent.updater.root)
    models.verify(active)  # every file of the running bundle, against its sha256
    staged = len(list(models.staging.iterdir()))
    text = answer(agent, question)
    same = "the same answer as before" if text == good else "a DIFFERENT answer"
    print(f"still serving {active.node} v{active.version} (sha256 {active.model_sha256[:12]}..., "
          f"verified; {staged} files staged): {same}")
    print(_rollout_status(home, int(rel.rollout or 0)))
