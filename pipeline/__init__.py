"""clipsight library: config, model loading, tokens, text encoding, images, run directory, toy world."""

import warnings

# openai-clip 1.0.1 imports pkg_resources, which setuptools marks deprecated; the pin in
# pyproject.toml keeps it importable, so the warning only adds noise to every command.
warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
