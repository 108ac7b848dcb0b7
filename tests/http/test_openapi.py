"""The OpenAPI document (H-): valid OpenAPI 3.1, served at /v1/openapi.json, naming
exactly the routes the Gateway serves, and a schemathesis run that finds no 500."""

import json
import re

import treq
from openapi_spec_validator import validate
from twisted.internet import reactor
from twisted.trial import unittest

from mailgw.http.openapi import DOCUMENT
from tests.dns_server import LocalDNS
from tests.fuzz_http import fuzz_config, prepare, run_schemathesis
from tests.harness import fresh_database, gateway_config, start_gateway

# Routes the document describes that other branches of this wave serve; none now.
SERVED_ELSEWHERE: set[tuple[str, str]] = set()
_METHODS = {"get", "put", "post", "delete", "patch"}
# A werkzeug rule's variable, `<name>` or `<converter(args):name>`.
_RULE_VARIABLE = re.compile(r"<(?:[^:<>]+:)?([^<>:]+)>")


def documented(document: dict) -> set[tuple[str, str]]:
    return {(path, method) for path, item in document["paths"].items()
            for method in item if method in _METHODS}


def served(root) -> set[tuple[str, str]]:
    """(path, method) of every route of every Klein app the root mounts, from the apps'
    own url maps, paths written as OpenAPI writes them."""
    routes = set()
    for app_resource in [*root.apps.values(), root.default]:
        # The tracking app's resource serves its hottest routes before routing the rest.
        klein = getattr(app_resource, "routed", app_resource)
        for rule in klein._app.url_map.iter_rules():
            path = _RULE_VARIABLE.sub(r"{\1}", rule.rule)
            routes.update((path, method.lower()) for method in rule.methods
                          if method.lower() in _METHODS)
    return routes


class DocumentTests(unittest.TestCase):
    def test_valid_openapi_3_1(self):
        document = json.loads(DOCUMENT.read_text())
        self.assertEqual(document["openapi"], "3.1.0")
        validate(document)

    async def test_served_and_naming_exactly_the_routes_served(self):
        gateway = await start_gateway(self, gateway_config(self, fresh_database()))
        response = await treq.get(
            f"http://127.0.0.1:{gateway.port_for('http.listener')}/v1/openapi.json",
            persistent=False)
        document = await response.json()
        self.assertEqual(document, json.loads(DOCUMENT.read_text()))
        routes = served(gateway.http_root)
        self.assertEqual(routes & SERVED_ELSEWHERE, set(), "merged: empty SERVED_ELSEWHERE")
        self.assertEqual(documented(document) - SERVED_ELSEWHERE, routes)


class FuzzTests(unittest.TestCase):
    timeout = 300

    async def test_schemathesis_finds_no_500(self):
        """A smaller run than `make fuzz-http`: a few cases per operation and phase."""
        dns = LocalDNS()
        _, dns_port = dns.start(reactor)
        self.addCleanup(dns.stop)
        gateway = await start_gateway(self, fuzz_config(self.mktemp(), fresh_database(),
                                                        dns_port))
        key = await prepare(gateway.stores)
        status, output = await run_schemathesis(reactor, gateway.port_for("http.listener"),
                                                key, max_examples=3, seed=1)
        self.assertEqual(status, 0, output[-3000:])
        self.assertRegex(output, r"\d{3,} generated, \d{3,} passed")
