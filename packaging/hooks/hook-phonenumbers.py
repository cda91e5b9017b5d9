# Replaces pyinstaller-hooks-contrib's hook, which collects every phonenumbers submodule:
# evomsgd parses, validates and formats numbers, so the region metadata it loads by name is
# needed, but not the 40 MB of geocoder, carrier and time-zone tables.
from PyInstaller.utils.hooks import collect_submodules

_UNUSED = ("phonenumbers.geo", "phonenumbers.carrier", "phonenumbers.tz", "phonenumbers.timezone")

hiddenimports = collect_submodules("phonenumbers", filter=lambda name: not name.startswith(_UNUSED))
excludedimports = ["phonenumbers.geodata", "phonenumbers.carrierdata", "phonenumbers.tzdata"]
