#!/usr/bin/env python
"""Django's command-line utility for administrative tasks."""
import os
import signal
import sys


def main():
    if hasattr(signal, "SIGPIPE"):  # `manage.py events | head` ends quietly, like any CLI
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    from config.env import EX_CONFIG, check_settings_module

    problem = check_settings_module(os.environ)
    if problem:
        sys.stderr.write(problem + "\n")
        sys.exit(EX_CONFIG)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
