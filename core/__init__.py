"""The project's small core: errors, settings and result types that every package imports.

Nothing here imports torch, diffusers or pydantic, so ``import core.errors, core.settings`` works on
any Python 3.11 and the import graph stays a tree: ``core`` <- ``model_build`` <- ``worker`` <- ``batch``.
"""
