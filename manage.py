#!/usr/bin/env python
"""Django's command-line utility for administrative tasks."""
import os
import signal
import sys


def main():
    if hasattr(signal, "SIGPIPE"):  # `manage.py events | head` ends quietly, like any CLI
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
