"""Packages of the wheel; everything else is in pyproject.toml.

Only the mapping of the repository's conf/ folder onto the package ``inboxlift.conf`` needs code:
the wheel then carries the settings files, so a Databricks job or notebook finds them without the
repository (``inboxlift.settings.default_conf_dir``).
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages("lib"), "inboxlift.conf"],
    package_dir={"": "lib", "inboxlift.conf": "conf"},
)
