"""Where a hit came from, by a GeoIP2 or GeoLite2 file (T-1, W-1 cityName ... longitude).

The file is opened at start-up (`tracking.geoip_database`), so that a missing or corrupt
one stops mailgw with one line instead of failing every hit later. A City database gives
city, region, country and coordinates; a Country database the country only. Lookups
(about 15 us, memory-mapped) run on the reactor. No file: every place is empty.
"""

from __future__ import annotations

from dataclasses import dataclass

import geoip2.database
import geoip2.errors
import maxminddb
from twisted.logger import Logger

from mailgw.errors import StartupError


@dataclass(frozen=True)
class Place:
    city: str = ""
    region: str = ""
    country: str = ""
    country_code: str = ""
    latitude: float | None = None
    longitude: float | None = None


NOWHERE = Place()


class GeoLocator:
    """Places of client addresses; `GeoLocator(None)` knows none."""

    log = Logger()

    def __init__(self, reader: geoip2.database.Reader | None) -> None:
        self._reader = reader
        self._city = reader is not None and "City" in reader.metadata().database_type
        self._warned = False

    @classmethod
    def open(cls, path: str) -> GeoLocator:
        """The file named by tracking.geoip_database, or StartupError saying what is wrong
        with it; an empty path is no file."""
        if not path:
            return cls(None)
        key = "tracking.geoip_database"
        try:
            reader = geoip2.database.Reader(path)
        except OSError as e:
            raise StartupError(f"{key}: cannot open {path} ({e.strerror})") from None
        except (maxminddb.InvalidDatabaseError, ValueError) as e:
            raise StartupError(f"{key}: {path} is not a MaxMind database ({e})") from None
        kind = reader.metadata().database_type
        if "City" not in kind and "Country" not in kind:
            reader.close()
            raise StartupError(f"{key}: {path} is a {kind} database, not a City or Country "
                               "one")
        return cls(reader)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()

    def locate(self, address: str) -> Place:
        """The place of an address; NOWHERE when unknown (a private address, say)."""
        if self._reader is None:
            return NOWHERE
        try:
            if not self._city:
                country = self._reader.country(address).country
                return Place(country=country.name or "", country_code=country.iso_code or "")
            found = self._reader.city(address)
        except (geoip2.errors.AddressNotFoundError, ValueError):
            return NOWHERE
        except maxminddb.InvalidDatabaseError as e:
            # The header was fine at start-up, the data is not: said once, not per hit.
            if not self._warned:
                self._warned = True
                self.log.error("GeoIP database unreadable; places left empty: {error}",
                               error=e)
            return NOWHERE
        return Place(city=found.city.name or "",
                     region=found.subdivisions.most_specific.name or "",
                     country=found.country.name or "",
                     country_code=found.country.iso_code or "",
                     latitude=found.location.latitude, longitude=found.location.longitude)
