"""The built-in demo models, one subfolder each (`model.yaml` + `model.py`); the default repository.

The `__init__.py` files only make setuptools ship the `model.py` files and give each a distinct
module name for type-checkers; the repository loads them by path (see `engine.models.backends`).
"""
