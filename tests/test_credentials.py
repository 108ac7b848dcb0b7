"""Passwords and API keys are stored as hashes (R-5)."""

from twisted.trial import unittest

from mailgw import credentials


class PasswordTests(unittest.TestCase):
    def test_hash_verifies_and_is_salted(self):
        first = credentials.hash_password("s3cret")
        second = credentials.hash_password("s3cret")
        self.assertNotEqual(first, second)
        self.assertTrue(first.startswith("scrypt$"))
        self.assertNotIn("s3cret", first)
        self.assertTrue(credentials.verify_password("s3cret", first))
        self.assertTrue(credentials.verify_password("s3cret", second))

    def test_wrong_password(self):
        stored = credentials.hash_password("s3cret")
        self.assertFalse(credentials.verify_password("S3cret", stored))

    def test_garbage_hash_never_verifies(self):
        for stored in ("", "plain", "scrypt$1$2$3$!!$!!", "md5$a$b$c$d$e"):
            self.assertFalse(credentials.verify_password("x", stored))


class APIKeyTests(unittest.TestCase):
    def test_keys_are_random_and_hashed(self):
        key = credentials.new_api_key()
        self.assertTrue(key.startswith(credentials.API_KEY_PREFIX))
        self.assertNotEqual(key, credentials.new_api_key())
        digest = credentials.hash_api_key(key)
        self.assertEqual(len(digest), 64)
        self.assertEqual(digest, credentials.hash_api_key(key))
        self.assertNotIn(key, digest)
