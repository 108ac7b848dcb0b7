"""A tiny GeoLite2-City database built with mmdb-writer, for the tracking tests."""

from pathlib import Path

from mmdb_writer import MMDBWriter
from netaddr import IPSet

# Addresses of the documentation ranges (RFC 5737) with a place.
BOGOTA, BERLIN = "203.0.113.7", "198.51.100.20"
PLACES = {
    "203.0.113.0/24": {"city": {"names": {"en": "Bogota"}},
                       "subdivisions": [{"names": {"en": "Bogota D.C."}, "iso_code": "DC"}],
                       "country": {"names": {"en": "Colombia"}, "iso_code": "CO"},
                       "location": {"latitude": 4.6097, "longitude": -74.0817}},
    "198.51.100.0/24": {"city": {"names": {"en": "Berlin"}},
                        "subdivisions": [{"names": {"en": "Land Berlin"}, "iso_code": "BE"}],
                        "country": {"names": {"en": "Germany"}, "iso_code": "DE"},
                        "location": {"latitude": 52.52, "longitude": 13.405}},
}


def city_database(path: str | Path, database_type: str = "GeoLite2-City") -> str:
    """Write the database to `path`; its path back, as text."""
    writer = MMDBWriter(ip_version=6, database_type=database_type, languages=["en"],
                        description={"en": "mailgw tests"}, ipv4_compatible=True)
    for network, place in PLACES.items():
        writer.insert_network(IPSet([network]), place)
    writer.to_db_file(str(path))
    return str(path)
