"""The package version, in one place: the build reads it from here (pyproject.toml's dynamic version), and every
stored run and bench row records it. Read from the code, not from installed metadata, which an editable install
keeps at the version it was installed with."""

__version__ = "0.2.1"
