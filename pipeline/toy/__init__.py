"""The toy world: synthetic scenes with known truth (``world``) and training the shipped toy CLIP (``train``)."""
