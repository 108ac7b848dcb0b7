"""Places from a GeoIP2 file, opened at start-up (T-1, R-3)."""

from pathlib import Path

from twisted.trial import unittest

from mailgw.errors import StartupError
from mailgw.events.geo import NOWHERE, GeoLocator, Place
from tests.geoip import BERLIN, BOGOTA, city_database


class GeoLocatorTests(unittest.TestCase):
    def test_city_database(self):
        geo = GeoLocator.open(city_database(self.mktemp()))
        self.addCleanup(geo.close)
        self.assertEqual(geo.locate(BOGOTA), Place("Bogota", "Bogota D.C.", "Colombia", "CO",
                                                   4.6097, -74.0817))
        self.assertEqual(geo.locate(BERLIN).city, "Berlin")
        for unknown in ("192.0.2.1", "10.0.0.1", "::1", "", "not an address"):
            self.assertEqual(geo.locate(unknown), NOWHERE)

    def test_country_database(self):
        geo = GeoLocator.open(city_database(self.mktemp(), "GeoLite2-Country"))
        self.addCleanup(geo.close)
        self.assertEqual(geo.locate(BOGOTA), Place(country="Colombia", country_code="CO"))

    def test_no_file_no_places(self):
        self.assertEqual(GeoLocator.open("").locate(BOGOTA), NOWHERE)

    def test_missing_or_corrupt_file_is_a_startup_error(self):
        corrupt = Path(self.mktemp())
        corrupt.write_bytes(b"\x00garbage" * 100)
        truncated = Path(self.mktemp())
        truncated.write_bytes(Path(city_database(self.mktemp())).read_bytes()[:300])
        other = city_database(self.mktemp(), "GeoLite2-ASN")
        for path, words in (("/nonexistent/GeoLite2-City.mmdb", "cannot open"),
                            (str(corrupt), "not a MaxMind database"),
                            (str(truncated), "not a MaxMind database"),
                            (other, "not a City or Country")):
            error = self.assertRaises(StartupError, GeoLocator.open, path)
            self.assertIn("tracking.geoip_database: ", str(error))
            self.assertIn(words, str(error))
            self.assertNotIn("\n", str(error))
