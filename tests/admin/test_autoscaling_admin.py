"""Issue 16 part 1 in the admin: the model form saves the load-aware autoscaling settings and a
floor schedule through ``upsert``, refuses a bad window on the form, and the page shows the
floor in force now."""

import json

import pytest
from django.urls import reverse

from registry.models import ModelSchedulingConfig

pytestmark = pytest.mark.django_db

EVERY_DAY = {"days": "*", "start": "00:00", "end": "24:00", "min_replicas": 2, "timezone": "UTC"}


def _form(**fields):
    return {
        "model_name": "llama",
        "min_replicas": "0",
        "max_replicas": "4",
        "node_selector": "{}",
        "placement": "spread",
        "target_in_flight_per_replica": "8",
        "upscale_delay_s": "",
        "downscale_delay_s": "120",
        **fields,
    }


def test_the_model_form_saves_autoscaling_and_a_floor_schedule(admin_client):
    response = admin_client.post(
        reverse("admin:registry_modelschedulingconfig_add"), _form(floor_schedule=json.dumps([EVERY_DAY]))
    )
    assert response.status_code == 302, response.content[:2000]
    config = ModelSchedulingConfig.objects.get(model_name="llama")
    assert (config.target_in_flight_per_replica, config.upscale_delay_s, config.downscale_delay_s) == (8, 30, 120)
    assert config.floor_schedule == [EVERY_DAY]

    page = admin_client.get(reverse("admin:registry_modelschedulingconfig_change", args=[config.pk]))
    assert "2 (min_replicas 0; windows: * 00:00-24:00 UTC: 2)" in page.content.decode()


@pytest.mark.parametrize(
    ("schedule", "message"),
    [
        ([{**EVERY_DAY, "days": "weekdays"}], "unknown day"),
        ([{**EVERY_DAY, "min_replicas": 5}], "min_replicas 5 &gt; max_replicas 4"),
        ({"days": "*"}, "must be a list"),
    ],
)
def test_a_bad_floor_schedule_is_shown_on_the_form(admin_client, schedule, message):
    response = admin_client.post(
        reverse("admin:registry_modelschedulingconfig_add"), _form(floor_schedule=json.dumps(schedule))
    )
    assert response.status_code == 200
    assert message in response.content.decode()
    assert not ModelSchedulingConfig.objects.exists()
