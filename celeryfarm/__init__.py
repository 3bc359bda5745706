"""celeryfarm: a render farm for Foundry's Katana on Celery and Redis.

``celery -A celeryfarm worker`` starts a render node (Celery finds the app in
:mod:`celeryfarm.celery`). Katana uses :class:`celeryfarm.plugin.CeleryFarmPlugin`; other
Python code can use :class:`celeryfarm.farm.Farm` directly.
"""

__version__ = "0.1.0"
