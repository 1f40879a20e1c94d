"""Query filters of the API's lists (django-filter ``FilterSet``s, applied by
``DjangoFilterBackend``).

Every filter value is validated by its form field: a value that is not one of a choice's
values, not a UUID or not an ISO 8601 instant, or an explicitly empty parameter (``?status=``)
is a 400 ``validation_error`` naming the parameter (``core.problems``), never an unfiltered
list or a 500. ``ordering`` takes the listed fields only (``-`` for descending, commas for
several), and a unique key always breaks ties so that ``limit``/``offset`` pages are stable.
"""

from __future__ import annotations

import re
from datetime import UTC

import django_filters
from django.core.exceptions import ValidationError
from django.db.models import Exists, OuterRef
from django_filters.fields import IsoDateTimeField
from drf_spectacular.utils import OpenApiParameter

from core import names
from registry.models import Node, NodeLabel, NodeModel


class StableOrderingFilter(django_filters.OrderingFilter):
    """``?ordering=`` over an allow-list, the primary key last (same direction as the first
    field) so that equal values keep one order from page to page."""

    def filter(self, qs, value):
        if not value:
            return qs
        ordering = [self.get_ordering_value(param) for param in value]
        tie_breaker = "-pk" if ordering[0].startswith("-") else "pk"
        return qs.order_by(*ordering, tie_breaker)


def ordering_parameter(filterset_class) -> OpenApiParameter:
    """The ``ordering`` query parameter of a FilterSet as one string with a pattern (the
    allowed fields, ``-`` for descending, comma-separated): the form django-filter reads, and
    one whose every invalid value a schema can describe."""
    ordering = filterset_class.base_filters["ordering"]
    fields = "|".join(re.escape(field) for field in ordering.param_map)
    return OpenApiParameter(
        "ordering",
        {"type": "string", "pattern": f"^-?({fields})(,-?({fields}))*$"},
        description=ordering.extra["help_text"],
    )


class InstantField(IsoDateTimeField):
    """An ISO 8601 instant, in UTC once parsed: an instant a database cannot hold (year 1 at a
    positive offset is before year 1 in UTC) is a validation error, not an overflow later."""

    def to_python(self, value):
        instant = super().to_python(value)
        if instant is None:
            return None
        try:
            return instant.astimezone(UTC)
        except OverflowError:
            raise ValidationError("Enter an instant between the years 1 and 9999 in UTC.", code="invalid") from None


class InstantFilter(django_filters.IsoDateTimeFilter):
    field_class = InstantField


class StrictFilterSet(django_filters.FilterSet):
    """A FilterSet that refuses an explicitly empty parameter (``?kind=`` is not a kind) unless
    the filter is listed in ``blank_allowed``, and an empty item of a comma-separated one
    (``?ordering=name,``: django-filter checks each item against the choices but lets an empty
    one through, and the database cannot sort by it); absent parameters do not filter."""

    blank_allowed: tuple[str, ...] = ()

    def is_valid(self):
        valid = super().is_valid()
        for name in self.filters:
            if name in self.blank_allowed or name not in self.data:
                continue
            if any(value == "" for value in self.data.getlist(name)):
                if name not in self.form.errors:
                    self.form.add_error(name, "This field may not be blank.")
                valid = False
            elif isinstance(self.filters[name], django_filters.filters.BaseCSVFilter):
                if any(item in ("", None) for item in self.form.cleaned_data.get(name) or ()):
                    self.form.add_error(name, "Leave no item empty between two commas.")
                    valid = False
        return valid


def validate_label_selector(value: str) -> None:
    """``key`` or ``key=value``: the key a name (``core.names``), the value a label value."""
    key, _, label_value = value.partition("=")
    names.validate_label_key(key)
    names.validate_label_value(label_value)


class NodeFilter(StrictFilterSet):
    status = django_filters.ChoiceFilter(choices=Node.Status.choices, help_text="the node's status")
    node_type = django_filters.ChoiceFilter(choices=Node.NodeType.choices, help_text="backend or agent")
    name = django_filters.CharFilter(max_length=names.MAX_NAME_LENGTH, help_text="exact node name")
    label = django_filters.CharFilter(
        method="filter_label",
        max_length=2 * names.MAX_NAME_LENGTH + 1,
        validators=[validate_label_selector],
        help_text="`key` (the node carries the label) or `key=value` (with this value)",
    )
    ordering = StableOrderingFilter(
        fields=("name", "status", "created_at", "last_heartbeat"),
        help_text="sort by name, status, created_at or last_heartbeat (`-` descending); default name",
    )

    class Meta:
        model = Node
        fields = ["status", "node_type", "name", "label"]

    def filter_label(self, queryset, name, value):
        key, has_value, label_value = value.partition("=")
        labels = NodeLabel.objects.filter(node=OuterRef("pk"), key=key)
        if has_value:
            labels = labels.filter(value=label_value)
        return queryset.filter(Exists(labels))


class ReplicaFilter(StrictFilterSet):
    node = django_filters.UUIDFilter(field_name="node_id", help_text="node id")
    model = django_filters.CharFilter(
        field_name="model_name", max_length=names.MAX_NAME_LENGTH, help_text="exact model name"
    )
    state = django_filters.ChoiceFilter(choices=NodeModel.State.choices, help_text="the replica's state")
    ordering = StableOrderingFilter(
        fields=("model_name", "replica_index", "state", "in_flight", "created_at"),
        help_text="sort by model_name, replica_index, state, in_flight or created_at (`-` descending); "
        "default model_name, node name, replica_index",
    )

    class Meta:
        model = NodeModel
        fields = ["node", "model", "state"]
