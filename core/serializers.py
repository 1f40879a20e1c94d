"""Serializer building blocks shared by every API app."""

from collections.abc import Mapping

from rest_framework import serializers


# RejectUnknownFieldsMixin: write serializers refuse fields they do not declare (and read-only
# ones). DRF silently ignores unknown keys, so a misspelt field (``min_replica``) would be
# dropped and the default stored. With this mixin the request fails with a 400 problem naming
# every offending field at once::
#
#     class HeartbeatSerializer(RejectUnknownFieldsMixin, serializers.Serializer): ...
#
# (No docstring on purpose: drf-spectacular would show it as the description of every
# serializer that has none of its own.)
class RejectUnknownFieldsMixin:
    def to_internal_value(self, data):
        if isinstance(data, Mapping):
            errors = {}
            for name in data:
                declared = self.fields.get(name)
                if declared is None:
                    errors[name] = ["Unknown field."]
                elif declared.read_only:
                    errors[name] = ["This field is read-only."]
            if errors:
                raise serializers.ValidationError(errors)
        return super().to_internal_value(data)


class StrictCharField(serializers.CharField):
    """A string, and only a string: DRF's CharField would turn ``3`` into ``"3"``."""

    def to_internal_value(self, data):
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictIntegerField(serializers.IntegerField):
    """A JSON integer, and only that: DRF's IntegerField would accept ``"3"``, ``3.0`` and
    ``true``."""

    def to_internal_value(self, data):
        if isinstance(data, bool) or not isinstance(data, int):
            self.fail("invalid")
        return super().to_internal_value(data)


class ProblemSerializer(serializers.Serializer):
    """RFC 9457 problem document (``application/problem+json``); used for the schema only."""

    type = serializers.CharField(help_text="URI identifying the problem type (urn:controlplane:problem:<code>)")
    title = serializers.CharField(help_text="Short, human-readable summary of the problem type")
    status = serializers.IntegerField(help_text="HTTP status code")
    detail = serializers.CharField(help_text="Human-readable explanation of this occurrence")
    code = serializers.CharField(help_text="Stable machine-readable code, e.g. validation_error, no_load_info")
    errors = serializers.DictField(
        child=serializers.ListField(child=serializers.CharField()),
        required=False,
        help_text="Validation errors only: field name (dotted for nested fields) -> messages",
    )
