"""Shapes of the registry API. Serializers validate shape only; state changes are the registry
verbs' job (called by the views), and semantic checks the verbs own (e.g. a scheduling config's
``min <= max``) are reported by them."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers
from rest_framework.settings import api_settings

from core import names
from core.serializers import RejectUnknownFieldsMixin, StrictCharField, StrictIntegerField
from proto import codec
from registry import floor_schedule
from registry.labels import MAX_LABEL_PART, validate_labels
from registry.models import ModelLoadInfo, ModelRevision, ModelSchedulingConfig, Node, NodeModel

from .problems import InvalidModelOptions

# Column limits: PositiveBigIntegerField (bytes of VRAM/RAM) and PositiveIntegerField.
MAX_BYTES = 2**63 - 1
MAX_INT = 2**31 - 1
MAX_MODEL_NAME = names.MAX_NAME_LENGTH
# Labels one request may carry (a node's labels, a scheduling config's node selector).
MAX_LABELS = 64


@extend_schema_field(
    {
        "type": "object",
        "maxProperties": MAX_LABELS,
        "additionalProperties": {"type": "string", "maxLength": MAX_LABEL_PART},
    }
)
class LabelMapField(serializers.DictField):
    """A map of label key -> value: at most 64 pairs; keys are names (1-255 characters, no
    control characters, no outer whitespace), values at most 255 characters without control
    characters (``core.names``)."""

    child = StrictCharField(
        max_length=MAX_LABEL_PART, allow_blank=True, trim_whitespace=False, validators=[names.validate_label_value]
    )

    def to_internal_value(self, data):
        if isinstance(data, dict) and len(data) > MAX_LABELS:
            raise serializers.ValidationError(f"At most {MAX_LABELS} labels per request.")
        labels = super().to_internal_value(data)
        key_errors = {key: messages for key in labels if (messages := names.name_errors(key, what="Label key"))}
        if key_errors:
            raise serializers.ValidationError(key_errors)
        try:
            return validate_labels(labels)
        except ValueError as exc:
            raise serializers.ValidationError(str(exc)) from exc


def validate_model_name(value: str) -> str:
    """A model name taken from a URL: the canonical form of ``core.names``, else a 400
    ``validation_error`` on the field ``model``."""
    errors = names.model_name_errors(value)
    if errors:
        raise serializers.ValidationError({"model": errors})
    return value


# --- worker-facing ---------------------------------------------------------------------------

MAX_GPU_VENDOR = 32


class GpuVendorField(StrictCharField):
    """Any short printable string: LocalAI's workers report vendors this server need not know
    (``apple``, ...); blank means ``unknown``. Control characters are refused (the value ends up
    in a label and on admin pages)."""

    def __init__(self, **kwargs):
        super().__init__(max_length=MAX_GPU_VENDOR, allow_blank=True, **kwargs)

    def to_internal_value(self, data):
        value = super().to_internal_value(data)
        if not value.isprintable():
            raise serializers.ValidationError("Must not contain control characters.")
        return value or Node.GpuVendor.UNKNOWN


class NodeRegistrationSerializer(serializers.Serializer):
    """LocalAI's worker registration body, plus two fields of this project's worker.

    Unknown fields are ignored here, unlike on the other write endpoints: this body is a wire
    contract with LocalAI workers, which send fields this server does not use
    (``gpu_compute_capability``, ``capability``, ``vram_budget``, ...), and a newer worker that
    sends a field we do not know must still be able to register.
    """

    name = StrictCharField(
        max_length=names.MAX_NAME_LENGTH,
        validators=[names.validate_node_name],
        help_text="the re-registration key",
    )
    node_type = serializers.ChoiceField(choices=Node.NodeType.choices, default=Node.NodeType.BACKEND)
    address = StrictCharField(
        max_length=512,
        required=False,
        allow_blank=True,
        default="",
        help_text="gRPC host:port (grpcs://host:port: dialled with TLS); required for backend nodes",
    )
    http_address = StrictCharField(max_length=512, required=False, allow_blank=True, default="")
    token = StrictCharField(
        required=False,
        allow_blank=True,
        write_only=True,
        trim_whitespace=False,
        help_text="the registration token (LocalAI workers send it here as well as in the bearer header)",
    )
    total_vram = StrictIntegerField(min_value=0, max_value=MAX_BYTES, default=0, help_text="bytes")
    available_vram = StrictIntegerField(
        min_value=0, max_value=MAX_BYTES, required=False, allow_null=True, help_text="bytes; defaults to total_vram"
    )
    total_ram = StrictIntegerField(min_value=0, max_value=MAX_BYTES, default=0, help_text="bytes")
    available_ram = StrictIntegerField(
        min_value=0, max_value=MAX_BYTES, required=False, allow_null=True, help_text="bytes; defaults to total_ram"
    )
    gpu_vendor = GpuVendorField(
        default=Node.GpuVendor.UNKNOWN,
        help_text="any short name (nvidia, amd, intel, apple, vulkan, ...); blank = unknown",
    )
    total_disk = StrictIntegerField(
        min_value=0, max_value=MAX_BYTES, default=0, help_text="bytes of the models directory's filesystem"
    )
    available_disk = StrictIntegerField(
        min_value=0, max_value=MAX_BYTES, required=False, allow_null=True, help_text="bytes; defaults to total_disk"
    )
    labels = LabelMapField(required=False, allow_null=True, default=dict)
    max_replicas_per_model = StrictIntegerField(
        min_value=0, max_value=MAX_INT, default=1, help_text="replica slots per model; 0 is treated as 1"
    )
    auth_mode = serializers.ChoiceField(
        choices=Node.AuthMode.choices,
        default=Node.AuthMode.FLEET_TOKEN,
        help_text=(
            "`node_token`: answer with a per-node `node_token` that authenticates every later call of this "
            "node (the fleet token is then refused for it). Omitted (LocalAI's worker) = `fleet_token`: no "
            "node token, later calls present the fleet registration token; refused when "
            "CONTROLPLANE_ALLOW_FLEET_TOKEN_NODES is off."
        ),
    )
    serves_worker_api = serializers.BooleanField(
        default=False,
        help_text=(
            "the worker answers the worker gRPC service (controlplane.worker.v1.Worker) at `address`, so "
            "replicas may be placed on it at once. Omitted (LocalAI's worker) = the reconciler finds out; "
            "only nodes that answer it are placed on."
        ),
    )

    def validate(self, attrs):
        if attrs["node_type"] == Node.NodeType.BACKEND and not attrs.get("address"):
            raise serializers.ValidationError({"address": ["This field is required for backend nodes."]})
        attrs["labels"] = attrs.get("labels") or {}
        attrs.pop("token", None)
        return attrs


class NodeRegisteredSerializer(serializers.ModelSerializer):
    """Registration answer. For an ``auth_mode: node_token`` registration, ``node_token`` is
    shown this once and authenticates every other call of this node; a ``fleet_token`` node
    gets none (its calls present the fleet registration token)."""

    # Not read-only: the schema would then list it as always present. It is set by the view.
    node_token = serializers.CharField(
        required=False,
        help_text="bearer token for /api/node/{id}/...; only in node_token mode. Keep it: re-registering this "
        "name needs it (X-Node-Token)",
    )
    worker_token = serializers.CharField(
        required=False,
        help_text="the only bearer token the worker's gRPC service may accept (the control plane's command "
        "credential); only in node_token mode",
    )
    backend_token = serializers.CharField(
        required=False,
        help_text="the bearer token this node's backends must require (LOCALAI_GRPC_AUTH_TOKEN); frontends get it "
        "with each lease; only in node_token mode",
    )

    class Meta:
        model = Node
        fields = [
            "id",
            "name",
            "node_type",
            "status",
            "auth_mode",
            "worker_api",
            "created_at",
            "node_token",
            "worker_token",
            "backend_token",
        ]
        read_only_fields = fields


HEARTBEAT_FIGURES = ("available_vram", "available_ram", "total_disk", "available_disk")
_INTEGER_ERRORS = serializers.IntegerField.default_error_messages


class HeartbeatInvalid(ValueError):
    """A heartbeat body that ``parse_heartbeat`` refuses: ``errors`` maps a field (or
    ``non_field_errors``) to its messages, as a DRF ``ValidationError`` carries them."""

    def __init__(self, errors: dict[str, list[str]]):
        super().__init__(errors)
        self.errors = errors


def parse_heartbeat(data) -> dict[str, int | None]:
    """The one validation of a heartbeat body (parsed JSON): the figures it reports, by name
    (a figure sent as null is None, i.e. unknown; one not sent is absent), or ``HeartbeatInvalid``.

    Each figure is a JSON integer (not a string, float or boolean) between 0 and ``MAX_BYTES``;
    unknown fields are ignored (LocalAI's workers send what their version measures, and a
    rejected heartbeat would silently let the node go stale: LocalAI's client does not look at
    the answer). Shared by the heartbeat's lean path (``registry/api/heartbeat.py``) and
    ``HeartbeatSerializer`` (the DRF view, which answers every refused body), with DRF's own
    messages, so both paths accept and refuse the same bodies in the same words.
    """
    if not isinstance(data, Mapping):
        message = str(serializers.Serializer.default_error_messages["invalid"]).format(datatype=type(data).__name__)
        raise HeartbeatInvalid({api_settings.NON_FIELD_ERRORS_KEY: [message]})
    figures: dict[str, int | None] = {}
    errors: dict[str, list[str]] = {}
    for name in HEARTBEAT_FIGURES:
        if name not in data:
            continue
        value = data[name]
        if value is None:
            figures[name] = None
        elif isinstance(value, bool) or not isinstance(value, int):
            errors[name] = [str(_INTEGER_ERRORS["invalid"])]
        elif value < 0:
            errors[name] = [str(_INTEGER_ERRORS["min_value"]).format(min_value=0)]
        elif value > MAX_BYTES:
            errors[name] = [str(_INTEGER_ERRORS["max_value"]).format(max_value=MAX_BYTES)]
        else:
            figures[name] = value
    if errors:
        raise HeartbeatInvalid(errors)
    return figures


class HeartbeatSerializer(serializers.Serializer):
    """What the worker can see now, in bytes; unknown values are omitted (or null).

    Unknown fields are ignored, as on registration: LocalAI's workers send what their version
    measures, and a rejected heartbeat would silently let the node go stale (LocalAI's client
    does not look at the answer).
    """

    # The fields describe the body for the schema; validation is parse_heartbeat's, which the
    # heartbeat's lean path runs too (to_internal_value below).

    available_vram = StrictIntegerField(min_value=0, max_value=MAX_BYTES, required=False, allow_null=True)
    available_ram = StrictIntegerField(min_value=0, max_value=MAX_BYTES, required=False, allow_null=True)
    total_disk = StrictIntegerField(
        min_value=0, max_value=MAX_BYTES, required=False, allow_null=True, help_text="models directory's filesystem"
    )
    available_disk = StrictIntegerField(min_value=0, max_value=MAX_BYTES, required=False, allow_null=True)

    def to_internal_value(self, data):
        try:
            return parse_heartbeat(data)
        except HeartbeatInvalid as refused:
            raise serializers.ValidationError(refused.errors) from None


class NodeStatusSerializer(serializers.Serializer):
    """The node's status after the call."""

    status = serializers.ChoiceField(choices=Node.Status.choices, read_only=True)


class HeartbeatAnswerSerializer(NodeStatusSerializer):
    """The node's status, and the gRPC address the control plane has for it: a worker whose
    advertised address differs (the database was restored from a backup taken before the
    worker last registered) registers again, with its kept node token, to correct it."""

    address = serializers.CharField(read_only=True)


class NodeReplicaSerializer(serializers.ModelSerializer):
    """One replica row of a node, as the worker sees it while draining."""

    class Meta:
        model = NodeModel
        fields = ["model_name", "replica_index", "state", "in_flight", "address"]
        read_only_fields = fields


# --- operator: nodes -------------------------------------------------------------------------


class NodeSerializer(serializers.ModelSerializer):
    """A node with its labels and load. Expects a queryset with ``with_load()`` annotations and
    prefetched labels (no query per row)."""

    labels = serializers.SerializerMethodField()
    model_count = serializers.IntegerField(
        source="replica_count", read_only=True, help_text="replica rows on this node, any model, any state"
    )
    in_flight_total = serializers.IntegerField(read_only=True, help_text="requests in flight over its replicas")

    class Meta:
        model = Node
        fields = [
            "id",
            "name",
            "node_type",
            "status",
            "drained_by",
            "address",
            "http_address",
            "total_vram",
            "available_vram",
            "reserved_vram",
            "vram_budget",
            "total_ram",
            "available_ram",
            "total_disk",
            "available_disk",
            "gpu_vendor",
            "auth_mode",
            "worker_api",
            "worker_api_detail",
            "worker_api_checked_at",
            "max_replicas_per_model",
            "max_replicas_per_model_manual",
            "reported_max_replicas_per_model",
            "labels",
            "model_count",
            "in_flight_total",
            "last_heartbeat",
            "created_at",
            "updated_at",
        ]
        read_only_fields = fields

    @extend_schema_field({"type": "object", "additionalProperties": {"type": "string"}})
    def get_labels(self, node) -> dict[str, str]:
        return {label.key: label.value for label in node.labels.all()}


class NodeLabelsSerializer(RejectUnknownFieldsMixin, serializers.Serializer):
    """A node's labels: key -> value (strings of at most 255 characters)."""

    labels = LabelMapField()


class MaxReplicasSerializer(RejectUnknownFieldsMixin, serializers.Serializer):
    """Replica slots per model on this node (an operator override kept across re-registrations)."""

    max_replicas_per_model = StrictIntegerField(min_value=1, max_value=MAX_INT)


# --- operator: scheduling --------------------------------------------------------------------


class FloorWindowSerializer(RejectUnknownFieldsMixin, serializers.Serializer):
    """A scheduled floor: while the window is open, the model keeps at least `min_replicas`
    replicas (docs/autoscaling.md)."""

    # The days, times and time zone are checked by the schedule's own parser
    # (``registry.floor_schedule``, in ``SchedulingConfigWriteSerializer.validate``).

    days = StrictCharField(max_length=64, help_text='"*" or day names and ranges: "mon-fri", "sat,sun"')
    start = StrictCharField(max_length=5, help_text='"HH:MM", wall-clock time in the time zone')
    end = StrictCharField(
        max_length=5, help_text='"HH:MM" (or "24:00"), exclusive; not after start: the window crosses midnight'
    )
    min_replicas = StrictIntegerField(min_value=0, max_value=MAX_INT, help_text="the floor while the window is open")
    timezone = StrictCharField(max_length=64, default="UTC", help_text='an IANA time zone, e.g. "Europe/Paris"')


class SchedulingConfigWriteSerializer(RejectUnknownFieldsMixin, serializers.Serializer):
    """Desired replicas of a model and where they may run; omitted fields take their defaults."""

    min_replicas = StrictIntegerField(min_value=0, max_value=MAX_INT, default=0)
    max_replicas = StrictIntegerField(min_value=0, max_value=MAX_INT, default=0, help_text="0 = unlimited")
    node_selector = LabelMapField(required=False, default=dict, help_text="labels a node must all carry")
    target_in_flight_per_replica = StrictIntegerField(
        min_value=1,
        max_value=MAX_INT,
        allow_null=True,
        default=None,
        help_text="load-aware autoscaling: in-flight requests per replica to aim for; null = off",
    )
    upscale_delay_s = StrictIntegerField(
        min_value=0, max_value=MAX_INT, default=30, help_text="seconds a higher desired count must hold"
    )
    downscale_delay_s = StrictIntegerField(
        min_value=0, max_value=MAX_INT, default=600, help_text="seconds a lower desired count must hold"
    )
    floor_schedule = serializers.ListField(
        child=FloorWindowSerializer(),
        required=False,
        default=list,
        max_length=floor_schedule.MAX_WINDOWS,
        help_text="scheduled floors: windows in which a higher min_replicas applies (docs/autoscaling.md)",
    )
    # Placement (docs/placement.md): each kept as stored when omitted.
    placement = serializers.ChoiceField(choices=ModelSchedulingConfig.Placement.choices, required=False)
    disk_bytes = StrictIntegerField(
        min_value=0, max_value=2**63 - 1, required=False, help_text="size on disk; 0 = unknown"
    )
    spread_by = StrictCharField(
        max_length=63, allow_blank=True, required=False, help_text='node label key to spread across; "" = off'
    )

    def validate(self, attrs):
        # The days, times and time zone, and each window's floor against the ceiling: the
        # schedule's own parser, so the API and the verb (``upsert``) refuse the same specs.
        windows = [dict(window) for window in attrs.get("floor_schedule") or []]
        try:
            floor_schedule.parse(windows, max_replicas=attrs.get("max_replicas", 0))
        except floor_schedule.ScheduleError as exc:
            raise serializers.ValidationError({"floor_schedule": [exc.args[0]]}) from None
        attrs["floor_schedule"] = windows
        return attrs


class SchedulingConfigSerializer(serializers.ModelSerializer):
    """A model's scheduling config, with the reconciler's circuit-breaker state."""

    autoscaled = serializers.BooleanField(source="is_autoscaled", read_only=True)

    class Meta:
        model = ModelSchedulingConfig
        fields = [
            "model_name",
            "min_replicas",
            "max_replicas",
            "node_selector",
            "autoscaled",
            "target_in_flight_per_replica",
            "upscale_delay_s",
            "downscale_delay_s",
            "floor_schedule",
            "desired_replicas",
            "placement",
            "disk_bytes",
            "spread_by",
            "unsatisfiable_until",
            "unsatisfiable_ticks",
            "created_at",
            "updated_at",
        ]
        read_only_fields = fields

    def get_fields(self):
        fields = super().get_fields()
        fields["node_selector"] = LabelMapField(read_only=True)
        fields["floor_schedule"] = serializers.ListField(child=FloorWindowSerializer(), read_only=True)
        return fields


# --- frontend: load info ---------------------------------------------------------------------


class ModelOptionsBase64Field(StrictCharField):
    """``backend.ModelOptions`` serialized and base64-encoded, decoded once into the bytes to
    store: exactly as received (after checking that they parse), so fields a newer LocalAI sets
    and this server does not declare survive."""

    def __init__(self, **kwargs):
        super().__init__(allow_blank=True, trim_whitespace=False, **kwargs)

    def to_internal_value(self, data) -> codec.CheckedOptions:
        text = super().to_internal_value(data)
        try:
            blob = base64.b64decode(text.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError, ValueError):
            raise serializers.ValidationError("Not valid base64.") from None
        try:
            return codec.check_options(blob)
        except codec.InvalidModelOptions as exc:
            raise InvalidModelOptions(str(exc)) from exc


class ModelOptionsJsonField(serializers.JSONField):
    """``backend.ModelOptions`` in its JSON form (fields by proto name), decoded once into the
    serialized bytes to store."""

    def to_internal_value(self, data) -> codec.CheckedOptions:
        value = super().to_internal_value(data)
        if not isinstance(value, dict):
            raise serializers.ValidationError("Must be an object of ModelOptions fields.")
        try:
            return codec.options_to_blob(codec.options_from_json(value))
        except codec.InvalidModelOptions as exc:
            raise InvalidModelOptions(str(exc)) from exc


class LoadInfoWriteSerializer(RejectUnknownFieldsMixin, serializers.Serializer):
    """Exactly one of ``model_options_b64`` (serialized ModelOptions, stored byte for byte) and
    ``model_options`` (ModelOptions fields by proto name)."""

    # Either form is decoded once, by its field: ``validated_data["opts_blob"]`` holds the bytes
    # to store. Options that are not a ModelOptions are a 400 ``invalid_model_options`` problem,
    # raised by the field (so before the errors of any later field are collected).

    backend_type = StrictCharField(max_length=255, allow_blank=True, trim_whitespace=False)
    model_options_b64 = ModelOptionsBase64Field(required=False, help_text="base64 of a serialized backend.ModelOptions")
    model_options = ModelOptionsJsonField(
        required=False, help_text="backend.ModelOptions in its JSON form, fields by proto name (e.g. ContextSize)"
    )
    options_required = True

    def validate(self, attrs):
        given = [attrs.pop(name) for name in ("model_options_b64", "model_options") if attrs.get(name) is not None]
        if len(given) > 1 or (self.options_required and not given):
            wanted = "exactly one" if self.options_required else "at most one"
            raise serializers.ValidationError(
                {"non_field_errors": [f"Send {wanted} of model_options_b64 and model_options."]}
            )
        attrs["opts_blob"] = given[0] if given else None
        return attrs


class LoadInfoSerializer(serializers.ModelSerializer):
    """A model's load recipe in both forms; ``source`` says whether it came from the per-model
    row or (legacy) from a replica row."""

    model_options_b64 = serializers.SerializerMethodField()
    model_options = serializers.SerializerMethodField()
    source = serializers.ChoiceField(choices=ModelLoadInfo.Source.choices, read_only=True)

    class Meta:
        model = ModelLoadInfo
        fields = ["model_name", "backend_type", "model_options_b64", "model_options", "updated_at", "source"]
        read_only_fields = fields

    def get_model_options_b64(self, info) -> str:
        return base64.b64encode(bytes(info.model_opts_blob or b"")).decode("ascii")

    @extend_schema_field(
        {
            "type": "object",
            "additionalProperties": True,
            "nullable": True,
            "description": "JSON form of the blob (declared fields at non-default values); null when the stored "
            "blob does not parse",
        }
    )
    def get_model_options(self, info):
        try:
            return codec.options_to_json(bytes(info.model_opts_blob or b""))
        except codec.InvalidModelOptions:
            return None


class RevisionSerializer(serializers.ModelSerializer):
    """One config revision of a model: the load info and scheduling config it stands for."""

    revision = serializers.IntegerField(source="number", read_only=True)
    current = serializers.BooleanField(source="is_current", read_only=True)
    model_options_b64 = serializers.SerializerMethodField()

    class Meta:
        model = ModelRevision
        fields = [
            "model_name",
            "revision",
            "current",
            "backend_type",
            "model_options_b64",
            "has_load_info",
            "scheduling",
            "template_digest",
            "reason",
            "created_by",
            "created_at",
        ]
        read_only_fields = fields

    def get_model_options_b64(self, revision) -> str:
        return base64.b64encode(bytes(revision.model_opts_blob or b"")).decode("ascii")


class RollbackSerializer(RejectUnknownFieldsMixin, serializers.Serializer):
    revision = StrictIntegerField(min_value=1, max_value=MAX_INT, help_text="the revision number to restore")
