#!/usr/bin/env python
"""Django's command-line utility for the control plane."""

import os
import sys


def main():
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings")
    if sys.argv[1:2] == ["gateway"]:
        # gRPC reads its configuration once, when first imported: the gateway's is set first.
        from gateway import grpc_environment

        grpc_environment.configure()
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
