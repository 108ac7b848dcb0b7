"""AccountSettings: the jsonb settings read into one typed value, and written back."""

from twisted.trial import unittest

from mailgw.accounts.settings import AccountSettings

STORED = {"multipart": "strict", "attachments": "links", "archive": True, "show_cab": False,
          "social_links": {"facebook": "https://facebook.com/acme"}, "track_opens": False,
          "track_clicks": False, "categories": ["News", "Offers"], "language": 4}


class FromJSONTests(unittest.TestCase):
    def test_every_key_read(self):
        self.assertEqual(AccountSettings.from_json(STORED), AccountSettings(
            multipart="strict", attachments="links", archive=True, show_cab=False,
            social_links={"facebook": "https://facebook.com/acme"}, track_opens=False,
            track_clicks=False, categories=("News", "Offers"), language=4))

    def test_nothing_stored_means_the_defaults(self):
        for stored in ({}, None, [], "x"):
            self.assertEqual(AccountSettings.from_json(stored), AccountSettings())
        self.assertEqual(AccountSettings(), AccountSettings(
            multipart="generate", attachments="keep", archive=False, show_cab=True,
            social_links={}, track_opens=True, track_clicks=True, categories=(),
            language=3))

    def test_bad_values_mean_the_defaults(self):
        """A typo never blocks an account, nor turns on what it did not say."""
        stored = {"multipart": "lenient", "attachments": ["reject"], "archive": "yes",
                  "show_cab": 0, "social_links": "https://facebook.com/acme",
                  "track_opens": None, "track_clicks": "no", "categories": "News",
                  "language": 99, "unknown": 1}
        self.assertEqual(AccountSettings.from_json(stored), AccountSettings())

    def test_social_links_that_are_not_text_are_left_out(self):
        settings = AccountSettings.from_json({"social_links": {
            "facebook": "https://facebook.com/acme", "x": 3, "instagram": None}})
        self.assertEqual(settings.social_links, {"facebook": "https://facebook.com/acme"})


    def test_categories_that_are_no_names_are_left_out(self):
        """T-3: empty, too long, with a comma or a control character, or repeated."""
        settings = AccountSettings.from_json({"categories": [
            "News", "", "x" * 65, "a,b", "tab\there", 3, None, " padded", "News", "Offers"]})
        self.assertEqual(settings.categories, ("News", "Offers"))


class ChangesTests(unittest.TestCase):
    def test_only_the_settings_given(self):
        """Merged into the stored settings: the others keep their values."""
        self.assertEqual(AccountSettings.changes(multipart="strict", attachments=None,
                                                 archive=False),
                         {"multipart": "strict", "archive": False})
        self.assertEqual(AccountSettings.changes(), {})

    def test_changes_read_back_as_written(self):
        self.assertEqual(AccountSettings.from_json(AccountSettings.changes(**STORED)),
                         AccountSettings.from_json(STORED))

    def test_unknown_names_and_bad_values_refused(self):
        for values, named in (({"archve": True}, "archve"), ({"multipart": "lenient"},
                                                             "multipart"),
                              ({"archive": "yes"}, "archive"), ({"show_cab": 1}, "show_cab"),
                              ({"social_links": {"x": 3}}, "social_links"),
                              ({"categories": ("News", "a,b")}, "categories"),
                              ({"categories": ("News", "News")}, "categories"),
                              ({"language": 9}, "language"), ({"language": True}, "language")):
            error = self.assertRaises(ValueError, AccountSettings.changes, **values)
            self.assertIn(named, str(error))
