"""Django app config for the engine (management commands and tasks live here)."""
from django.apps import AppConfig


class StopMonitorConfig(AppConfig):
    name = "stopmonitor"
    verbose_name = "Stop monitor engine"
