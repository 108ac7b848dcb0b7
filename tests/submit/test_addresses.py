"""Address normalization: the fast path for plain addresses agrees with email-validator."""

from email_validator import EmailNotValidError, validate_email
from twisted.trial import unittest

from mailgw.submit import addresses
from mailgw.submit.addresses import InvalidAddress, delivery_address, normalize_address

ADDRESSES = [
    "ana@example.net", "Ana.Perez@Example.NET", "a+tag@mail.example.co.uk",
    "o'brien@example.org", "x_y-z@sub-domain.example.com", "1@2.example.info",
    "a!#$%&'*+/=?^_`{|}~-@example.org", "a" * 64 + "@example.org",
    "a" * 65 + "@example.org", "b@" + ".".join(["a" * 63] * 3) + ".com",
    "b@" + ".".join(["a" * 63] * 4) + ".com", "c@" + "a" * 64 + ".com",
    ".ana@example.org", "ana.@example.org", "an..a@example.org", "ana@example",
    "ana@example.123", "ana@-example.org", "ana@example-.org", "ana@exa_mple.org",
    "ana@example..org", "ana@example.org.", "ana@xn--bcher-kva.example",
    "ana@ab--cd.example.org", "ana@test", "ana@example.test", "ana@EXAMPLE.LOCALHOST",
    "ana@foo.invalid", "ana@x.onion", "ana@1.in-addr.arpa", "ana@local",
    '"ana perez"@example.org', "ana@[192.0.2.1]", "José@example.org", "ana@exämple.org",
    "ana@exampl\u212a.org", "ana", "@example.org", "ana@", "ana@@example.org",
    "ana @example.org", "<ana@example.org>",
]


def _reference(address):
    try:
        valid = validate_email(address, check_deliverability=False, allow_smtputf8=False,
                               strict=True)
    except EmailNotValidError:
        return None
    return valid.normalized.lower()


class NormalizeAddressTests(unittest.TestCase):
    def setUp(self):
        normalize_address.cache_clear()

    def test_same_answer_as_email_validator(self):
        for address in ADDRESSES:
            try:
                normalized = normalize_address(address)
            except InvalidAddress:
                normalized = None
            self.assertEqual(normalized, _reference(address), address)

    def test_local_part_of_more_than_64_octets(self):
        """RFC 5321 4.5.3.1.1, whichever path the address takes."""
        self.assertEqual(normalize_address("a" * 64 + "@example.org"), "a" * 64 + "@example.org")
        self.assertEqual(normalize_address("a" * 64 + "@exämple.org"),
                         "a" * 64 + "@exämple.org")  # by email-validator
        for address in ("a" * 65 + "@example.org", "a" * 65 + "@exämple.org"):
            with self.assertRaises(InvalidAddress):
                normalize_address(address)

    def test_plain_addresses_do_not_reach_email_validator(self):
        self.patch(addresses, "validate_email",
                   lambda *args, **kwargs: self.fail("email-validator was asked"))
        self.assertEqual(normalize_address("Bo.Smith+news@Mail.Example.COM"),
                         "bo.smith+news@mail.example.com")


class DeliveryAddressTests(unittest.TestCase):
    def test_local_part_as_written_domain_lowered(self):
        """RFC 5321 2.4: only the domain is case-insensitive."""
        for written, delivered in (("Ana.Perez@Example.NET", "Ana.Perez@example.net"),
                                   ("ana@example.net", "ana@example.net"),
                                   ("O'Brien+News@Mail.Example.COM",
                                    "O'Brien+News@mail.example.com")):
            self.assertEqual(delivery_address(written, normalize_address(written)), delivered)

    def test_local_part_written_anew_is_the_normalized_one(self):
        self.assertEqual(delivery_address('"Ana"@Example.org', "ana@example.org"),
                         "ana@example.org")
