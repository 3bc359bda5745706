"""Katana drop-in: registers celeryfarm as a render farm plug-in.

Put the folder that holds this ``Plugins/`` folder on ``KATANA_RESOURCES`` and make the
``celeryfarm`` package importable by Katana's Python (see the README).
"""

from celeryfarm.plugin import CeleryFarmPlugin

PluginRegistry = [("FarmPlugin", 2.0, "Celery Farm", CeleryFarmPlugin)]
