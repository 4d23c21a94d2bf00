"""The command line's parts: ``common`` (options, config resolution, running and printing stages), ``runs``
(the commands over a run directory), ``toy`` (the toy world). ``runall.py`` declares the app and joins them."""
