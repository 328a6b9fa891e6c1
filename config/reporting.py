"""Django's error report (the debug page, error e-mails) without secrets: ``DEFAULT_EXCEPTION_REPORTER_FILTER``."""

from __future__ import annotations

from django.views.debug import SafeExceptionReporterFilter

from config.secrets import MASK, contains_secret, secret_values


class SecretsExceptionReporterFilter(SafeExceptionReporterFilter):
    """Django's filter (names matching API, TOKEN, KEY, SECRET, PASS, SIGNATURE are hidden), plus: any
    setting, META value (under ``runserver`` the whole environment, ``DATABASE_URL`` included) or frame
    variable whose text holds a configured secret (:func:`config.secrets.secret_values`) is ``***``."""

    cleansed_substitute = MASK

    def cleanse_setting(self, key, value):
        value = super().cleanse_setting(key, value)
        if not isinstance(value, dict | list | tuple):
            try:
                text = value if isinstance(value, str) else repr(value)
            except Exception:  # noqa: BLE001 - an object that cannot print itself prints nothing
                return self.cleansed_substitute
            if contains_secret(text, secret_values()):
                return self.cleansed_substitute
        return value

    def get_traceback_frame_variables(self, request, tb_frame):
        secrets = secret_values()
        out = []
        for name, value in super().get_traceback_frame_variables(request, tb_frame):
            try:
                text = repr(value)
            except Exception:  # noqa: BLE001
                text = ""
            out.append((name, self.cleansed_substitute if contains_secret(text, secrets) else value))
        return out
