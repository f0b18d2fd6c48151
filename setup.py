"""Installable package for lit_rlhf. Metadata and tool settings live in pyproject.toml."""

from setuptools import setup

setup()
