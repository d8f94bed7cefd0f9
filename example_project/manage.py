#!/usr/bin/env python
"""The example project's command-line entry point (``python example_project/manage.py …``).

It works from any working directory: the project folder and the repository root are put on
``sys.path`` so that ``exampleproject`` and, in a checkout without an install, ``batchframework``
can be imported.
"""

import os
import sys
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parent
REPOSITORY_ROOT = PROJECT_DIR.parent


def main() -> None:
    for path in (str(REPOSITORY_ROOT), str(PROJECT_DIR)):
        if path not in sys.path:
            sys.path.insert(0, path)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "exampleproject.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
