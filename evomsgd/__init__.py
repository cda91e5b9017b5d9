"""evomsgd: one process and one SQLite file that queue and deliver WhatsApp messages."""

from importlib import metadata

try:
    __version__ = metadata.version("evomsgd")
except metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
