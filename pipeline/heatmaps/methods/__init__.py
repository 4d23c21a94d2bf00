"""One module per heatmap method; importing this package registers them all.

The shipped methods come first, in the order people see them (the original's three, then by
kind); any other module here follows, by name, so a new method needs no change to this file.
"""

import importlib
import pkgutil

SHIPPED = ("raw", "surgery", "single", "maskclip", "sclip", "clearclip", "naclip", "resclip", "gem")

for _name in (*SHIPPED, *sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in SHIPPED)):
    importlib.import_module(f"{__name__}.{_name}")
