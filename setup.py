"""Package list only (everything else is in pyproject.toml).

The released suite and the lowering descriptors are kept in their own repository folders,
`suites/` and `backends/`, but ship inside the package as `pytest_rkv.suite` and
`pytest_rkv.descriptors`, so an installed copy runs exactly the files a checkout runs.
pyproject.toml's `packages.find` cannot add mapped folders to what it finds, hence this file.
"""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["pytest_rkv", "pytest_rkv.*"]) + ["pytest_rkv.suite", "pytest_rkv.descriptors"],
    package_dir={"pytest_rkv.suite": "suites", "pytest_rkv.descriptors": "backends"},
)
