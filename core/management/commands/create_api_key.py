"""``manage.py create_api_key NAME --role frontend|operator``: print a new API key.

Only the key goes to standard output (so ``KEY=$(manage.py create_api_key ...)`` works); what
was created is reported on standard error. The key is shown this once: only its hash is kept.
"""

from django.core.management.base import BaseCommand, CommandError

from core.models import ApiKey


class Command(BaseCommand):
    help = "Create an API key and print it (only the key) on standard output."

    def add_arguments(self, parser):
        parser.add_argument("name", help="who or what will use the key (e.g. frontend-1)")
        parser.add_argument("--role", required=True, choices=ApiKey.Role.values, help="frontend or operator")

    def handle(self, *args, name, role, **options):
        try:
            key, plaintext = ApiKey.objects.create_key(name, role)
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        self.stderr.write(f"created {role} API key {key.name!r} ({key.prefix}...); it is shown only once")
        self.stdout.write(plaintext)
