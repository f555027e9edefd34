"""What a verdict does, per tenant: thresholds turning P(fake) into an action, the explain band, and the rules
for provenance declarations and near-duplicate matches.

The rules come from the settings or from a YAML policy file (`PolicyFile`, README: Per-tenant policy). A
tenant's rules override the file's default field by field, the default overrides the settings, and whatever
is unset is inherited. The worker's `Policies` (moderation.worker.policies) re-reads the file while it runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from moderation.errors import ModerationError
from moderation.events import MAX_FRAMES_JUDGED, Action
from moderation.settings import Settings

DeclaredAi = Literal["label_fake", "evidence_only"]
MatchApply = Literal["banked_label", "evidence_only"]
SETTINGS_VERSION = "settings"
PDQ_BITS = 256


class InvalidPolicy(ModerationError):
    """A policy file that cannot be read or does not validate; the message says where and why."""


@dataclass(frozen=True)
class ProvenanceRule:
    """What an image that declares itself AI-made (C2PA action or IPTC DigitalSourceType) gets."""

    declared_ai: DeclaredAi = "label_fake"
    skip_model: bool = False


@dataclass(frozen=True)
class MatchRule:
    """How uploads are matched against the near-duplicate bank (PDQ) and what a match decides."""

    enabled: bool = True
    max_distance: int = 31  # HMA's PDQ default
    min_quality: int = 50  # below it PDQ hashes of flat images collide
    apply: MatchApply = "banked_label"
    skip_model: bool = False
    bank_model_flags: bool = False


@dataclass(frozen=True)
class Policy:
    review_threshold: float = 0.5
    flag_threshold: float = 0.8
    explain_above: float = 0.5
    version: str = SETTINGS_VERSION
    provenance: ProvenanceRule = field(default_factory=ProvenanceRule)
    match: MatchRule = field(default_factory=MatchRule)
    frames: int = 8  # of an animated or multi-page image judged at most (within MODERATION_MAX_FRAMES)

    def __post_init__(self) -> None:
        if self.review_threshold > self.flag_threshold:
            raise ValueError(
                f"review_threshold ({self.review_threshold:g}) must not exceed flag_threshold ({self.flag_threshold:g})"
            )

    @classmethod
    def from_settings(cls, settings: Settings) -> Policy:
        return cls(settings.review_threshold, settings.flag_threshold, settings.explain_above)

    def action(self, score: float) -> Action:
        if score >= self.flag_threshold:
            return "flag"
        if score >= self.review_threshold:
            return "review"
        return "allow"


# -- the file: every field optional, as unset means inherited ------------------------------------------------


class _Rules(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ProvenanceOverrides(_Rules):
    declared_ai: DeclaredAi | None = Field(
        default=None,
        description="label_fake: an image whose C2PA manifest or IPTC DigitalSourceType declares it AI-made is "
        "labelled fake (decided_by provenance); evidence_only: shown to reviewers, the model decides.",
    )
    skip_model: bool | None = Field(
        default=None, description="With label_fake, do not run the model on a declared-AI image."
    )


class MatchOverrides(_Rules):
    enabled: bool | None = Field(
        default=None, description="Match uploads against the near-duplicate bank (PDQ hashes)."
    )
    max_distance: int | None = Field(
        default=None, ge=0, le=PDQ_BITS, description="Largest Hamming distance between two PDQ hashes that is a match."
    )
    min_quality: int | None = Field(
        default=None,
        ge=0,
        le=100,
        description="Uploads whose PDQ quality is below this are not matched (flat images collide).",
    )
    apply: MatchApply | None = Field(
        default=None,
        description="banked_label: a match takes the banked decision's label (decided_by match); "
        "evidence_only: the match is shown to reviewers, the model decides.",
    )
    skip_model: bool | None = Field(
        default=None, description="With banked_label, do not run the model on a matched image."
    )
    bank_model_flags: bool | None = Field(
        default=None,
        description="Bank this tenant's own flag verdicts (decided_by model), not only reviewer decisions.",
    )


class TenantRules(_Rules):
    review_threshold: float | None = Field(
        default=None, ge=0, le=1, description="P(fake) at or above this goes to review."
    )
    flag_threshold: float | None = Field(default=None, ge=0, le=1, description="P(fake) at or above this is flagged.")
    explain_above: float | None = Field(
        default=None, ge=0, description="Explain when P(fake) is at or above this (0: always, above 1: never)."
    )
    frames: int | None = Field(
        default=None,
        ge=1,
        le=MAX_FRAMES_JUDGED,
        description="Frames of an animated or multi-page image judged at most (the first, the last, evenly "
        "between and the biggest scene changes); the verdict takes the highest P(fake). 1: the first frame "
        "only. Never more than the worker's MODERATION_MAX_FRAMES.",
    )
    provenance: ProvenanceOverrides = Field(default_factory=ProvenanceOverrides)
    match: MatchOverrides = Field(default_factory=MatchOverrides)

    @model_validator(mode="after")
    def _ordered(self) -> TenantRules:
        review, flag = self.review_threshold, self.flag_threshold
        if review is not None and flag is not None and review > flag:
            raise ValueError(f"review_threshold ({review:g}) must not exceed flag_threshold ({flag:g})")
        return self


TenantName = Annotated[str, Field(min_length=1, max_length=200)]  # as UploadEvent.tenant


class PolicyFile(_Rules):
    """A per-tenant policy file (YAML). Unset fields inherit: a tenant's from the default, the default's
    from the worker's settings."""

    version: str = Field(
        min_length=1,
        max_length=128,
        pattern=r"^\S+$",
        description="Shown in every verdict as policy_version: change it with every edit.",
    )
    default: TenantRules = Field(
        default_factory=TenantRules, description="The rules of every tenant not listed, and what listed ones inherit."
    )
    tenants: dict[TenantName, TenantRules] = Field(
        default_factory=dict, description="Per tenant (UploadEvent.tenant): only what differs from the default."
    )


def policy_schema() -> dict[str, Any]:
    return PolicyFile.model_json_schema()


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys: a tenant listed twice would silently lose its first rules."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: set[Hashable] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=deep)
        if isinstance(key, Hashable):
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def parse_policy(text: bytes | str) -> PolicyFile:
    """The file's rules, or InvalidPolicy naming each problem by its place in the file."""
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as exc:
        raise InvalidPolicy(f"not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise InvalidPolicy("the policy file must be a mapping with version, default and tenants")
    try:
        return PolicyFile.model_validate(raw)
    except ValidationError as exc:
        raise InvalidPolicy("; ".join(_describe(err) for err in exc.errors())) from exc


def _describe(err: Any) -> str:
    parts = [str(part) or '""' for part in err["loc"] if part != "[key]"]
    where = ".".join(parts) + (" (the name)" if "[key]" in err["loc"] else "") or "(top level)"
    message = {"extra_forbidden": "unknown field", "missing": "required"}.get(err["type"], err["msg"])
    message = message.removeprefix("Value error, ")
    if err["type"] == "string_type":  # YAML reads an unquoted 2026-05-01 as a date, 1.10 as the number 1.1
        message += " (quote it)"
    return f"{where}: {message}"


def _overridden(base: Any, rules: BaseModel) -> Any:
    return dataclasses.replace(base, **{k: v for k, v in rules if v is not None and not isinstance(v, BaseModel)})


def _resolve(base: Policy, rules: TenantRules, version: str, where: str) -> Policy:
    try:
        policy = _overridden(base, rules)
        return dataclasses.replace(
            policy,
            version=version,
            provenance=_overridden(base.provenance, rules.provenance),
            match=_overridden(base.match, rules.match),
        )
    except ValueError as exc:  # thresholds out of order only once inherited ones are filled in
        raise InvalidPolicy(f"{where}: {exc} (after inheritance)") from exc


@dataclass(frozen=True)
class Compiled:
    """A policy file compiled over a base policy: the default, each tenant's, and the file's digest."""

    default: Policy
    tenants: Mapping[str, Policy]
    digest: str = ""  # sha256 of the file's bytes; empty from the settings alone

    @property
    def version(self) -> str:
        return self.default.version


def compile_policy(text: bytes, base: Policy) -> Compiled:
    rules = parse_policy(text)
    default = _resolve(base, rules.default, rules.version, "default")
    tenants = {name: _resolve(default, t, rules.version, f"tenants.{name}") for name, t in rules.tenants.items()}
    return Compiled(default, tenants, hashlib.sha256(text).hexdigest())
