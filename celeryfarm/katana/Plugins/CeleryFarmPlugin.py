"""Katana drop-in: registers celeryfarm as a render farm plug-in, and its farm settings.

It is part of the installed ``celeryfarm`` package: put the ``celeryfarm/katana`` folder
that holds this ``Plugins/`` folder on ``KATANA_RESOURCES`` (``celeryfarm env`` prints it),
with the package importable by Katana's Python (see the README). Loading this file adds
the farm's settings (``celeryfarm.plugin.FARM_SETTINGS``: pool, priority, step limits,
retries and failure rules, limits, renderType) to the ``farmSettings`` of Render nodes, where
artists set them per render.
"""

from celeryfarm.plugin import CeleryFarmPlugin, install_farm_settings

install_farm_settings()

PluginRegistry = [("FarmPlugin", 2.0, "Celery Farm", CeleryFarmPlugin)]
