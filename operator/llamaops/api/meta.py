"""Shared building blocks of the API models.

Two families of models, one per naming convention:

* `SeedModel`: sections copied from the user's recipes (`model`, `lora`,
  `quantization`, `training`, `vllm`). Their keys stay snake_case, verbatim,
  so a recipe pastes in unchanged and maps 1:1 onto `LoraConfig`,
  `BitsAndBytesConfig`, `TrainingArguments` and `vllm serve` flags.
* `KubeModel`: Kubernetes-facing sections, camelCase as the API conventions ask.

Both forbid unknown keys: a typo must be an error, never a silently ignored knob.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from llamaops.api.constants import API_VERSION, FINETUNES, GROUP, SERVES, VERSION

__all__ = ["API_VERSION", "FINETUNES", "GROUP", "SERVES", "VERSION"]  # re-exported: the models' coordinates

# Kubernetes resource.Quantity, as the apimachinery regexp spells it; an amount of a resource is never negative.
QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
AMOUNT_PATTERN = QUANTITY_PATTERN.replace(r"^(\+|-)?", r"^\+?", 1)
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"

Quantity = Annotated[str, Field(pattern=AMOUNT_PATTERN, max_length=64)]
# A label's value (nodeSelector values, gpuProduct): at most 63 characters, alphanumeric at both ends.
LABEL_VALUE_PATTERN = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
LabelValue = Annotated[str, Field(pattern=LABEL_VALUE_PATTERN, max_length=63)]
# A label's key: an optional DNS-subdomain prefix and "/", then a name like a label value (taint keys too).
# (Patterns used in CEL rules spell a literal dot [.]: CEL string literals have no escape for it.)
LABEL_KEY_PATTERN = (r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                     r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
# A pvc:// location: a claim name (DNS subdomain), "/", a path; no ".." anywhere (no way out of the claim).
PVC_URI_PATTERN = r"^pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*(/[^/].*)?$"
PARENT_SEGMENT = r"(^|/)[.][.](/|$)"
# Strict everywhere else (the API server takes no "2048" for an integer), but
# timestamps arrive as RFC 3339 strings.
Timestamp = Annotated[datetime, Field(strict=False)]


def cel(rule: str, message: str, *, field_path: str | None = None, reason: str | None = None,
        optional_old_self: bool | None = None) -> dict[str, Any]:
    """One `x-kubernetes-validations` entry (a CEL rule the API server enforces)."""
    entry: dict[str, Any] = {"rule": rule, "message": message}
    if field_path:
        entry["fieldPath"] = field_path
    if reason:
        entry["reason"] = reason
    if optional_old_self is not None:
        entry["optionalOldSelf"] = optional_old_self
    return entry


def section(cls: type[BaseModel]) -> Any:
    """A sub-object that is always present, with every field at its default.

    The CRD's default is the whole default object: the API server then stores
    the same values the models assume, and CEL rules (which the server also
    checks against declared defaults) see every key.
    """
    default = cls().model_dump(by_alias=True, exclude_none=True, mode="json")
    return Field(default_factory=cls, json_schema_extra={"default": default})


def validations(*rules: dict[str, Any]) -> dict[str, Any]:
    """`json_schema_extra` carrying CEL rules onto a model's or field's schema."""
    return {"x-kubernetes-validations": list(rules)}


def pvc_uri_rules(field: str) -> list[dict[str, Any]]:
    """CEL rules of a field that may be a pvc:// location: a claim's name, then a path that stays inside it."""
    pvc = f"has(self.{field}) && self.{field}.startsWith('pvc://')"
    return [
        cel(f"!({pvc}) || self.{field}.matches('{PVC_URI_PATTERN}')",
            "a pvc:// location is pvc://<claim>/<path>, the claim a PersistentVolumeClaim name of this namespace",
            field_path=f".{field}", reason="FieldValueInvalid"),
        cel(f"!({pvc}) || !self.{field}.matches('{PARENT_SEGMENT}')",
            "a pvc:// path may not contain '..'", field_path=f".{field}", reason="FieldValueInvalid"),
    ]


def no_parent_rule(field: str) -> dict[str, Any]:
    """A CEL rule: a relative path inside a claim never climbs out of it."""
    return cel(f"!has(self.{field}) || !self.{field}.matches('{PARENT_SEGMENT}')",
               "the path may not contain '..'", field_path=f".{field}", reason="FieldValueInvalid")


class SeedModel(BaseModel):
    """A section with the seed recipes' snake_case keys."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)


class KubeModel(BaseModel):
    """A Kubernetes-facing section: camelCase on the wire, snake_case in Python."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
        validate_assignment=True,
    )


class SecretKeyRef(KubeModel):
    """A key of a Secret in the object's own namespace."""

    name: str = Field(pattern=DNS_SUBDOMAIN_PATTERN, max_length=253, description="Name of the Secret.")
    key: str = Field(min_length=1, max_length=253, description="Key inside the Secret.")


class SecretRef(KubeModel):
    """A Secret in the object's own namespace."""

    name: str = Field(pattern=DNS_SUBDOMAIN_PATTERN, max_length=253, description="Name of the Secret.")


class Toleration(KubeModel):
    """The core/v1 Toleration, so GPU node taints can be tolerated (with the API server's own pod rules)."""

    model_config = KubeModel.model_config | {
        "json_schema_extra": validations(
            cel("!has(self.operator) || self.operator != 'Exists' || !has(self.value) || self.value == ''",
                "operator Exists matches every value: remove value", field_path=".value", reason="FieldValueInvalid"),
            cel("(has(self.key) && self.key != '') || (has(self.operator) && self.operator == 'Exists')",
                "a toleration without a key must have operator Exists (it then tolerates every taint)",
                field_path=".operator", reason="FieldValueInvalid"),
            cel("!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
                "tolerationSeconds applies to effect NoExecute only", field_path=".tolerationSeconds",
                reason="FieldValueInvalid"),
        )
    }

    key: str | None = Field(None, max_length=316, pattern=LABEL_KEY_PATTERN)
    operator: Literal["Exists", "Equal"] | None = None
    value: LabelValue | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = Field(None, ge=0)


class Condition(KubeModel):
    """A Kubernetes-style status condition (metav1.Condition)."""

    type: str = Field(max_length=316)
    status: Literal["True", "False", "Unknown"]
    reason: str = Field("", max_length=1024)
    message: str = Field("", max_length=32768)
    last_transition_time: Timestamp | None = None
    observed_generation: int | None = Field(None, ge=0)


class StatusBase(KubeModel):
    """What every status of ours carries."""

    observed_generation: int | None = Field(None, description="The spec generation this status describes.")
    conditions: list[Condition] | None = Field(
        None, json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]})


class ObjectMeta(KubeModel):
    """The part of metadata the models read; the rest is kept as-is."""

    model_config = ConfigDict(extra="allow", alias_generator=to_camel, validate_by_name=True,
                              validate_by_alias=True, serialize_by_alias=True)

    name: str | None = None
    namespace: str | None = None
    uid: str | None = None
    generation: int | None = None
    creation_timestamp: Timestamp | None = None
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None


SpecT = TypeVar("SpecT", bound=BaseModel)
StatusT = TypeVar("StatusT", bound=BaseModel)


class Resource(KubeModel, Generic[SpecT, StatusT]):
    """A whole object of one of our kinds; subclasses pin `kind`."""

    api_version: Literal["llamaops.io/v1alpha1"] = Field(API_VERSION, alias="apiVersion")
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: SpecT
    status: StatusT | None = None
