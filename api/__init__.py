"""The Django app that owns the models, migrations, REST API and admin."""
