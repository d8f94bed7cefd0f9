"""Root pytest configuration: makes the repository importable and names the database in use."""

import os


def pytest_report_header(config):
    from django.conf import settings

    db = settings.DATABASES["default"]
    return f"batchframework tests: database={db['ENGINE'].rsplit('.', 1)[-1]} name={db.get('NAME')} CI={os.environ.get('CI', '')}"
