"""A tiny app for the benchmarks: the handlers, plain Celery baseline tasks, and the seed's
Game → Player → Card models."""
