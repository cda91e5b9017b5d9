# Replaces pyinstaller-hooks-contrib's hook, which collects every phonenumbers submodule:
# evomsgd parses, validates and formats numbers, so the region metadata it loads by name is
# needed, and the time-zone table (quiet hours in the recipient's zone: phonenumbers.timezone,
# ~250 kB), but not the 40 MB of geocoder and carrier tables.
from PyInstaller.utils.hooks import collect_submodules

_UNUSED = ("phonenumbers.geo", "phonenumbers.carrier")

hiddenimports = collect_submodules("phonenumbers", filter=lambda name: not name.startswith(_UNUSED))
excludedimports = ["phonenumbers.geodata", "phonenumbers.carrierdata"]
