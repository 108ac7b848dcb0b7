"""Config: defaults, the annotated example, and errors that name the key."""

from pathlib import Path

from twisted.trial import unittest

from mailgw.config import Config, ConfigError, load_config, parse_config

EXAMPLE = Path(__file__).parent.parent / "etc" / "mailgw.toml"


class DefaultsTests(unittest.TestCase):
    def test_no_file_gives_defaults(self):
        config = load_config(None)
        self.assertEqual(config, Config())
        self.assertEqual(config.smtp.starttls_listeners, ["tcp:2500", "tcp:58700"])
        self.assertEqual(config.smtp.implicit_tls_listeners, ["tcp:46500"])
        self.assertEqual(config.http.listener, "tcp:8080")
        self.assertEqual(config.smtp.max_message_size, 512000)
        self.assertEqual(config.database.dsn, "")

    def test_annotated_example_lists_every_default(self):
        """etc/mailgw.toml shows the defaults: parsing it changes nothing."""
        self.assertEqual(load_config(EXAMPLE), Config())
        text = EXAMPLE.read_text()
        for section in ("smtp", "http", "tls", "database", "delivery", "webhooks",
                        "tracking", "inbound"):
            fields = Config.__dataclass_fields__[section].default_factory().__dataclass_fields__
            for key in fields:
                self.assertIn(f"\n{key} = ", text, f"{section}.{key} missing from the example")

    def test_values_are_read(self):
        config = parse_config({"hostname": "mx.example.org",
                                "smtp": {"starttls_listeners": ["tcp:587"]},
                                "database": {"dsn": "host=db", "pool_size": 9}})
        self.assertEqual(config.hostname, "mx.example.org")
        self.assertEqual(config.smtp.starttls_listeners, ["tcp:587"])
        self.assertEqual(config.smtp.implicit_tls_listeners, ["tcp:46500"])
        self.assertEqual(config.database.pool_size, 9)

    def test_embedded_restart_seconds(self):
        self.assertEqual(Config().database.embedded_restart_seconds, 300)
        for seconds in (0, 12.5):
            config = parse_config({"database": {"embedded_restart_seconds": seconds}})
            self.assertEqual(config.database.embedded_restart_seconds, seconds)

    def test_connection_caps_admit_the_benchmarks_clients(self):
        """bench/ runs up to 50 sessions from loopback."""
        self.assertGreaterEqual(Config().smtp.max_connections_per_address, 50)
        self.assertGreaterEqual(Config().smtp.max_connections, 50)

    def test_bounce_domain_defaults_to_the_hostname(self):
        self.assertEqual(parse_config({"hostname": "mx.example.org"}).bounce_domain,
                         "mx.example.org")
        config = parse_config({"hostname": "mx.example.org",
                               "delivery": {"bounce_domain": "bounces.example.org"}})
        self.assertEqual(config.bounce_domain, "bounces.example.org")

    def test_default_tls_paths_are_under_state_dir(self):
        config = parse_config({"state_dir": "/srv/mailgw"})
        self.assertEqual(config.certificate_path, Path("/srv/mailgw/tls/cert.pem"))
        self.assertEqual(config.private_key_path, Path("/srv/mailgw/tls/key.pem"))


class ErrorTests(unittest.TestCase):
    def assertConfigError(self, data, *words):
        with self.assertRaises(ConfigError) as caught:
            parse_config(data)
        for word in words:
            self.assertIn(word, str(caught.exception))

    def test_unknown_top_level_key(self):
        self.assertConfigError({"hostnme": "x"}, "hostnme", "unknown key")

    def test_unknown_section_key(self):
        self.assertConfigError({"smtp": {"max_size": 1}}, "smtp.max_size", "unknown key")

    def test_wrong_type(self):
        self.assertConfigError({"smtp": {"max_message_size": "big"}}, "smtp.max_message_size",
                               "integer")

    def test_bool_is_not_an_integer(self):
        self.assertConfigError({"database": {"pool_size": True}}, "database.pool_size")

    def test_list_items_checked(self):
        self.assertConfigError({"smtp": {"starttls_listeners": ["tcp:25", 25]}},
                               "smtp.starttls_listeners[1]")

    def test_section_must_be_a_table(self):
        self.assertConfigError({"smtp": 3}, "smtp", "table")

    def test_bad_values(self):
        self.assertConfigError({"database": {"pool_size": 0}}, "database.pool_size")
        self.assertConfigError({"http": {"listen_backlog": 0}}, "http.listen_backlog")
        self.assertConfigError({"http": {"dmds_max_recipients": 0}}, "http.dmds_max_recipients")
        for key in ("tls_handshake_timeout", "max_connections", "max_connections_per_address",
                    "data_timeout", "max_commands_without_message", "listen_backlog"):
            self.assertConfigError({"smtp": {key: 0}}, f"smtp.{key}")
        self.assertConfigError({"http": {"public_base_url": "example.org"}},
                               "http.public_base_url")
        self.assertConfigError({"smtp": {"trusted_networks": ["10.0.0.0/33"]}},
                               "smtp.trusted_networks[0]")
        self.assertConfigError({"http": {"metrics_networks": ["127.0.0.0/8", "localhost"]}},
                               "http.metrics_networks[1]")
        self.assertConfigError({"delivery": {"dns_servers": ["127.0.0.1"]}},
                               "delivery.dns_servers")
        self.assertConfigError({"delivery": {"dns_servers": ["ns.example.org:53"]}},
                               "delivery.dns_servers", "not an IP address")
        self.assertConfigError({"delivery": {"tls_policy": "maybe"}}, "delivery.tls_policy")
        self.assertConfigError({"delivery": {"remote_smtp_port": 70000}},
                               "delivery.remote_smtp_port")
        for seconds in (-1, float("nan"), float("inf")):
            self.assertConfigError({"delivery": {"connection_idle_seconds": seconds}},
                                   "delivery.connection_idle_seconds")
            self.assertConfigError({"database": {"embedded_restart_seconds": seconds}},
                                   "database.embedded_restart_seconds", "0 or more")
        self.assertConfigError({"tls": {"certificate": "/c.pem"}}, "tls.private_key")
        self.assertConfigError({"hostname": "two words"}, "hostname")
        for domain in ("bounces@example.org", "two words", "example..org"):
            self.assertConfigError({"delivery": {"bounce_domain": domain}},
                                   "delivery.bounce_domain")
        self.assertConfigError({"smtp": {"trusted_networks": ["10.0.0.0/8"]}},
                               "smtp.trusted_account")

    def test_bad_inbound_values(self):
        for key in ("max_message_size", "max_recipients", "max_connections",
                    "max_connections_per_address", "idle_timeout", "tls_handshake_timeout",
                    "data_timeout", "max_commands_without_message"):
            self.assertConfigError({"inbound": {key: 0}}, f"inbound.{key}")
        self.assertConfigError({"inbound": {"listeners": "tcp:25"}}, "inbound.listeners")

    def test_bad_tracking_values(self):
        self.assertConfigError({"tracking": {"trusted_proxies": ["10.0.0.0/33"]}},
                               "tracking.trusted_proxies[0]")
        self.assertConfigError({"tracking": {"machine_networks": ["apple"]}},
                               "tracking.machine_networks[0]")
        self.assertConfigError({"tracking": {"machine_agents": [" "]}},
                               "tracking.machine_agents[0]")
        for seconds in (-1, float("nan")):
            self.assertConfigError({"tracking": {"scanner_seconds": seconds}},
                                   "tracking.scanner_seconds")
        for seconds in (0, float("inf")):
            self.assertConfigError({"tracking": {"commit_wait_seconds": seconds}},
                                   "tracking.commit_wait_seconds")

    def test_missing_file(self):
        with self.assertRaises(ConfigError) as caught:
            load_config("/nonexistent/mailgw.toml")
        self.assertIn("does not exist", str(caught.exception))

    def test_invalid_toml(self):
        path = Path(self.mktemp())
        path.write_text("hostname = \n")
        with self.assertRaises(ConfigError) as caught:
            load_config(path)
        self.assertIn("not valid TOML", str(caught.exception))
