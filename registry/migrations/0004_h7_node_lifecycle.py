"""Who drained a node (``Node.drained_by``), who wrote a label (``NodeLabel.source``), and the
permission a staff session needs for the frontend API (``registry.use_frontend_api``).

Rows that exist before this migration: a node already draining is taken as drained by an
operator (its drain then survives restarts and is lifted by an operator; the safe reading of an
unknown owner), the auto-label keys are marked ``auto``, and every other label ``operator``
(kept across re-registrations, as every label was before).
"""

from django.db import migrations, models

AUTO_LABEL_KEYS = ["gpu.vendor", "gpu.vram", "node.name", "node.replica-slots"]


def mark_existing_rows(apps, schema_editor):
    Node = apps.get_model("registry", "Node")
    NodeLabel = apps.get_model("registry", "NodeLabel")
    Node.objects.filter(status="draining").update(drained_by="operator")
    NodeLabel.objects.filter(key__in=AUTO_LABEL_KEYS).update(source="auto")


class Migration(migrations.Migration):
    dependencies = [
        ("registry", "0003_localai_parts_clock"),
    ]

    operations = [
        migrations.AlterModelOptions(
            name="lease",
            options={
                "ordering": ["-created_at"],
                "permissions": [("use_frontend_api", "Can call the frontend API with an admin session")],
            },
        ),
        migrations.AddField(
            model_name="node",
            name="drained_by",
            field=models.CharField(
                blank=True,
                choices=[("", "not drained"), ("node", "the node itself"), ("operator", "an operator")],
                default="",
                max_length=16,
            ),
        ),
        migrations.AddField(
            model_name="nodelabel",
            name="source",
            field=models.CharField(
                choices=[
                    ("worker", "sent by the worker at registration"),
                    ("operator", "set by an operator"),
                    ("auto", "derived by the control plane"),
                ],
                default="operator",
                max_length=16,
            ),
        ),
        migrations.RunPython(mark_existing_rows, migrations.RunPython.noop),
    ]
