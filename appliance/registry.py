"""The bundles this appliance has served, which one is active, and the retraining pause.

``state/bundles/<bundle id>/`` holds every installed bundle (never modified after install: the
manifest's hashes still hold); ``state/bundles/active.json`` names the active one and keeps the
history of promotions and rollbacks (who, when, why). Promotion is one atomic rename of that file,
so a crash leaves either the old or the new bundle active, never a half state. Until anything is
promoted, the daemon serves ``[model] bundle`` from the config.

The daemon polls ``active.json`` and switches bundles between batches (``Daemon._maybe_switch``),
so a promotion or a rollback takes effect without a restart and without losing an image: images
keep queueing durably in SQLite while the new models load.

``state/control/pause`` asks the daemon to finish the batch in hand and unload its models, so that
retraining can have the GPU; it holds the requester's PID, and a pause whose process has died (a
retrain killed with ``kill -9``) is ignored, so inspection resumes by itself.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from appliance.bundle import Bundle, BundleError, load_bundle
from appliance.outbox import atomic_write

ACTIVE = "active.json"


class RegistryError(ValueError):
    """A registry operation cannot be done; the message says why and what to do."""


@dataclass(frozen=True)
class Entry:
    id: str
    kind: str
    created_at: str
    path: Path
    active: bool
    summary: dict


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class BundleRegistry:
    def __init__(self, state_dir: Path) -> None:
        self.root = Path(state_dir) / "bundles"
        self.control = Path(state_dir) / "control"

    # -- reading --------------------------------------------------------------------------
    def _state(self) -> dict:
        path = self.root / ACTIVE
        if not path.is_file():
            return {"active": None, "history": []}
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise RegistryError(f"{path} is unreadable ({exc}); restore it or delete it") from exc

    def active_id(self) -> str | None:
        return self._state()["active"]

    def active_path(self) -> Path | None:
        active = self.active_id()
        return self.root / active if active else None

    def generation(self) -> tuple[int, int] | None:
        """Changes whenever ``active.json`` is replaced (cheap to poll)."""
        try:
            stat = (self.root / ACTIVE).stat()
        except FileNotFoundError:
            return None
        return stat.st_ino, stat.st_mtime_ns

    def history(self) -> list[dict]:
        return list(self._state()["history"])

    def entries(self) -> list[Entry]:
        active = self.active_id()
        out = []
        for folder in sorted(p for p in self.root.glob("*") if (p / "manifest.json").is_file()):
            manifest = json.loads((folder / "manifest.json").read_text())
            out.append(
                Entry(
                    id=folder.name,
                    kind=manifest.get("kind", "?"),
                    created_at=manifest.get("created_at", "?"),
                    path=folder,
                    active=folder.name == active,
                    summary=manifest.get("retrain", {}).get("summary", {}),
                )
            )
        return sorted(out, key=lambda e: e.created_at)

    # -- changing -------------------------------------------------------------------------
    def install(self, bundle_dir: Path) -> Bundle:
        """Copy a verified bundle into the registry (idempotent by bundle id)."""
        bundle = load_bundle(bundle_dir)
        target = self.root / bundle.id
        if target.exists():
            return load_bundle(target)
        tmp = self.root / f".{bundle.id}.installing"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(bundle.path, tmp)
        load_bundle(tmp)  # the copy is complete and intact before it gets its name
        os.replace(tmp, target)
        return load_bundle(target)

    def promote(self, bundle_id: str, *, by: str, reason: str) -> None:
        """Make ``bundle_id`` the active bundle (one atomic write)."""
        try:
            load_bundle(self.root / bundle_id)
        except BundleError as exc:
            raise RegistryError(f"cannot promote {bundle_id}: {exc}") from exc
        state = self._state()
        state["history"].append(
            {"id": bundle_id, "at": _now(), "by": by, "reason": reason, "from": state["active"]}
        )
        state["active"] = bundle_id
        atomic_write(self.root / ACTIVE, json.dumps(state, indent=2).encode())

    def adopt(self, configured: Path, *, by: str) -> str:
        """Before the first promotion: install and activate the configured bundle, so that the
        history starts with it and a rollback can return to it. Returns the active id."""
        active = self.active_id()
        if active is None:
            active = self.install(configured).id
            self.promote(active, by=by, reason="the configured [model] bundle")
        return active

    def rollback(self, bundle_id: str | None = None, *, by: str) -> str:
        """Activate ``bundle_id``, or the bundle that was active before the current one."""
        state = self._state()
        if bundle_id is None:
            previous = [h["from"] for h in state["history"] if h["id"] == state["active"]]
            if not previous or previous[-1] is None:
                raise RegistryError(
                    "nothing to roll back to: the active bundle replaced none; "
                    "name one with `appliance bundles rollback ID`"
                )
            bundle_id = previous[-1]
        if not (self.root / bundle_id).is_dir():
            known = ", ".join(e.id for e in self.entries()) or "none"
            raise RegistryError(f"no installed bundle {bundle_id!r}; installed: {known}")
        self.promote(bundle_id, by=by, reason="rollback")
        return bundle_id

    # -- pausing for retraining -----------------------------------------------------------
    def request_pause(self, reason: str) -> None:
        payload = {"pid": os.getpid(), "reason": reason, "at": _now()}
        atomic_write(self.control / "pause", json.dumps(payload).encode())

    def release_pause(self) -> None:
        (self.control / "pause").unlink(missing_ok=True)

    def pause_requested(self) -> dict | None:
        """The live pause request, or None (no file, or its process has died)."""
        path = self.control / "pause"
        try:
            request = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError):
            return None  # torn or foreign file: do not stop inspecting for it
        return request if _alive(int(request.get("pid", -1))) else None


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
