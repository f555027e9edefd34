"""The per-tenant policies in force in a worker: loaded from the settings or MODERATION_POLICY_FILE, and
re-read while the worker runs; a changed file is swapped in only once all of it validates, so a bad edit
keeps the policy in force, logged and counted."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Mapping
from pathlib import Path

from moderation.policy import Compiled, InvalidPolicy, Policy, compile_policy
from moderation.settings import Settings
from moderation.worker import metrics

log = logging.getLogger(__name__)


class Policies:
    """Every tenant's policy. `for_tenant` is what the pipeline asks, once an event; a reload replaces the
    whole set in one assignment, so an event never sees half of an edit."""

    def __init__(self, compiled: Compiled, *, path: Path | None = None, base: Policy | None = None) -> None:
        self._path, self._base = path, base or compiled.default
        self._failed: str | None = None  # the last refused content (digest or read error): counted once
        self._install(compiled)
        self._accept()

    @classmethod
    def from_settings(cls, settings: Settings) -> Policies:
        """The global thresholds of the settings for every tenant (version `settings`)."""
        return cls.of(Policy.from_settings(settings))

    @classmethod
    def of(cls, policy: Policy) -> Policies:
        """One policy for every tenant."""
        return cls(Compiled(policy, {}))

    @classmethod
    def from_file(cls, path: Path, settings: Settings) -> Policies:
        """The file's policy over the settings' thresholds; InvalidPolicy if it cannot be read or validated."""
        base = Policy.from_settings(settings)
        try:
            compiled = compile_policy(path.read_bytes(), base)
        except OSError as exc:
            raise InvalidPolicy(f"cannot read the policy file {path}: {exc}") from exc
        except InvalidPolicy as exc:
            raise InvalidPolicy(f"policy file {path}: {exc}") from exc
        log.info("policy %s from %s: default and %d tenants", compiled.version, path, len(compiled.tenants))
        return cls(compiled, path=path, base=base)

    @classmethod
    def load(cls, settings: Settings) -> Policies:
        """From MODERATION_POLICY_FILE when set, else from the settings alone."""
        if settings.policy_file is None:
            return cls.from_settings(settings)
        return cls.from_file(settings.policy_file, settings)

    @property
    def version(self) -> str:
        return self._compiled.version

    @property
    def default(self) -> Policy:
        return self._compiled.default

    @property
    def tenants(self) -> Mapping[str, Policy]:
        return self._compiled.tenants

    def for_tenant(self, tenant: str | None) -> Policy:
        compiled = self._compiled
        return compiled.default if tenant is None else compiled.tenants.get(tenant, compiled.default)

    def reload(self) -> bool:
        """Swap in the file when its content changed and all of it validates; True when it did. A file that
        cannot be read or does not validate leaves the policy in force: logged and counted once per content."""
        if self._path is None:
            return False
        try:
            text = self._path.read_bytes()
        except OSError as exc:
            return self._refuse(f"read error {exc.errno}", f"cannot read the policy file {self._path}: {exc}")
        digest = hashlib.sha256(text).hexdigest()
        if digest == self._compiled.digest:
            self._accept()  # back to what is in force: the same bad edit again counts again
            return False
        if digest == self._failed:
            return False
        try:
            compiled = compile_policy(text, self._base)
        except InvalidPolicy as exc:
            return self._refuse(digest, f"policy file {self._path}: {exc}")
        previous = self.version
        self._install(compiled)
        self._accept()
        log.info("policy %s in force (was %s): default and %d tenants", compiled.version, previous, len(self.tenants))
        return True

    async def watch(self, interval_s: float) -> None:
        """Reload every `interval_s` seconds until cancelled. The whole file is read each time and compared by
        digest (a few KB): an mtime can miss an edit made within its resolution, and a Kubernetes ConfigMap
        volume swaps a symlink rather than the file."""
        if self._path is None:
            return
        while True:
            await asyncio.sleep(interval_s)
            await asyncio.to_thread(self.reload)

    def _install(self, compiled: Compiled) -> None:
        self._compiled = compiled
        metrics.POLICY_INFO.clear()
        metrics.POLICY_INFO.labels(compiled.version).set(1)

    def _accept(self) -> None:
        self._failed = None
        metrics.POLICY_FILE_REFUSED.set(0)

    def _refuse(self, content: str, problem: str) -> bool:
        if content != self._failed:
            self._failed = content
            metrics.POLICY_RELOAD_FAILURES.inc()
            metrics.POLICY_FILE_REFUSED.set(1)
            log.error("%s; policy %s stays in force", problem, self.version)
        return False
