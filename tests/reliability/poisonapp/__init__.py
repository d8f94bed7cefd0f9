"""A tiny app for the reliability suite (part 2): handlers that poison a worker, and a
slow exactly-once effect for the database-restart scenario. Installed only by
``tests.reliability.settings_part2`` (the settings of the suite's subprocesses)."""
