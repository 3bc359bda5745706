"""How much the farm adds on top of bare Celery: ``make bench`` or ``python -m benchmarks.run``.

See BENCHMARKS.md for the figures, their targets and the latest results.
"""
