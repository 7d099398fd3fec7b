"""The bundled search spaces, one YAML per ``--space NAME``. This folder sits at the top of the
checkout and ships as ``raycxr.search_spaces`` (pyproject.toml's package-dir mapping), so that
:mod:`raycxr.config` reads it with importlib.resources from a wheel and an editable install alike.
It is a regular package, not a bare folder, because an editable install only maps a folder
elsewhere in the tree into the package when it has an ``__init__.py``."""
