"""Heatmaps: where in the image each label lives, by any of the registered map methods.

* ``base``: the method base classes and the contexts the runner hands them;
* ``methods/``: one module per method, each registering its class;
* ``registry``: the methods by name, in display order, and the docs table;
* ``blocks``: the one block runner, every requested method's tokens from one forward;
* ``similarity``: feature surgery and similarity maps;
* ``compute``: a batch's maps, windows and points for SAM;
* ``draw``: overlays, contact sheets, atlases and point prompts.
"""

from pipeline.heatmaps.base import HeatmapMethod, LastBlockMethod, PathMethod  # noqa: F401
from pipeline.heatmaps.registry import method, method_table, names, register, titles, unregister  # noqa: F401
from pipeline.heatmaps import methods  # noqa: F401,E402  (registers every method)
