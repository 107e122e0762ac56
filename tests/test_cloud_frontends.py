"""Kubernetes ingress-nginx and cloud load balancers: their client-certificate headers, built from each
vendor's documented format around a certificate this controller issued, sent by a trusted peer to a
real controller. None of these services runs here: the formats come from the pages named below.
"""
from __future__ import annotations

import base64
from typing import Any
from urllib.parse import quote

from cryptography.hazmat.primitives.serialization import Encoding
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from .e2e.harness import whoami
from .helpers import ca_pem, https_port, new_leaf, request_json, start_controller

FRONT_END = "127.0.0.3"   # the load balancer's address (a trusted proxy)
OUTSIDER = "127.0.0.9"    # anyone else


def _pem(issued: Any) -> str:
    return issued.cert.public_bytes(Encoding.PEM).decode()


def _der_b64(issued: Any) -> str:
    return base64.b64encode(issued.cert.public_bytes(Encoding.DER)).decode()


# name: (network settings, header name, value from the issued certificate and its CA bundle, page)
VENDORS: dict[str, tuple[dict[str, Any], str, Any, str]] = {
    # ingress-nginx passes $ssl_client_escaped_cert as ssl-client-cert, $ssl_client_verify as ssl-client-verify
    "ingress-nginx": ({"forwarded_client_cert_pem_header": "ssl-client-cert",
                       "forwarded_client_verify_header": "ssl-client-verify"}, "ssl-client-cert",
                      lambda issued, bundle: quote(_pem(issued), safe="-_.~"),
                      "https://kubernetes.github.io/ingress-nginx/user-guide/nginx-configuration/annotations/"
                      "#client-certificate-authentication"),
    # AWS ALB verify mode: "URL-encoded PEM format of the leaf certificate, with +=/ as safe characters"
    "aws-alb-verify": ({"forwarded_client_cert_pem_header": "X-Amzn-Mtls-Clientcert-Leaf"},
                       "X-Amzn-Mtls-Clientcert-Leaf", lambda issued, bundle: quote(_pem(issued), safe="+=/"),
                       "https://docs.aws.amazon.com/elasticloadbalancing/latest/application/mutual-authentication.html"),
    # AWS ALB passthrough mode: the whole chain presented by the client, leaf first, same encoding
    "aws-alb-passthrough": ({"forwarded_client_cert_pem_header": "X-Amzn-Mtls-Clientcert"}, "X-Amzn-Mtls-Clientcert",
                            lambda issued, bundle: quote(_pem(issued) + bundle.decode(), safe="+=/"),
                            "https://docs.aws.amazon.com/elasticloadbalancing/latest/application/"
                            "mutual-authentication.html"),
    # Google Cloud Application Load Balancer: a custom request header set to {client_cert_leaf} (RFC 9440)
    "gcp": ({"forwarded_client_cert_pem_header": "X-Client-Cert-Leaf"}, "X-Client-Cert-Leaf",
            lambda issued, bundle: f":{_der_b64(issued)}:",
            "https://cloud.google.com/load-balancing/docs/https/custom-headers-global#mtls-variables"),
    # Azure Application Gateway: a rewrite rule setting a header to {var_client_certificate} ("PEM format");
    # how its line breaks travel is not documented: accepted as spaces, as here, and in the other tests below
    "azure": ({"forwarded_client_cert_pem_header": "X-Client-Certificate"}, "X-Client-Certificate",
              lambda issued, bundle: " ".join(_pem(issued).split("\n")).strip(),
              "https://learn.microsoft.com/azure/application-gateway/rewrite-http-headers-url#mutual-authentication-server-variables"),
    # Cloudflare: a Transform Rule setting Client-Cert to cf.tls_client_auth.cert_rfc9440
    "cloudflare-rfc9440": ({"forwarded_client_cert_pem_header": "Client-Cert"}, "Client-Cert",
                           lambda issued, bundle: f":{_der_b64(issued)}:",
                           "https://developers.cloudflare.com/ssl/client-certificates/forward-a-client-certificate/"),
    # Cloudflare's older forwarding (first request of each connection only): base64 DER
    "cloudflare-der": ({"forwarded_client_cert_pem_header": "Cf-Client-Cert-Der-Base64"}, "Cf-Client-Cert-Der-Base64",
                       lambda issued, bundle: _der_b64(issued),
                       "https://developers.cloudflare.com/ssl/client-certificates/forward-a-client-certificate/"),
}


def _whoami(c: Any, source: str, headers: dict[str, str]) -> Any:
    return whoami(https_port(c), ca_pem(c), source, headers=headers)


class CloudFrontEndTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def test_each_vendor_format_gives_the_identity_through_a_trusted_front_end_only(self):
        c = yield start_controller(self, trusted_proxies=[FRONT_END])
        issued, _key, service = yield new_leaf(c)
        for vendor, (settings, header, encode, page) in VENDORS.items():
            blank = {"forwarded_client_cert_pem_header": "", "forwarded_client_verify_header": ""}
            status, body = yield request_json(c, "PUT", "/api/v1/settings/network", dict(blank, **settings))
            self.assertEqual(status, 200, (vendor, body))
            headers = {header: encode(issued, ca_pem(c))}
            if "forwarded_client_verify_header" in settings:
                headers[settings["forwarded_client_verify_header"]] = "SUCCESS"
            answer = yield _whoami(c, FRONT_END, headers)
            self.assertEqual((answer["identity_source"], (answer["identity"] or {}).get("service_id")),
                             ("proxy-cert", service.id), f"{vendor}: format from {page}: {answer}")
            # the same header from anyone else is removed unread
            answer = yield _whoami(c, OUTSIDER, headers)
            self.assertIsNone(answer["identity"], vendor)
            self.assertIn("not a trusted proxy", answer["rejected"] or "", vendor)

    @inlineCallbacks
    def test_vendor_header_families_are_stripped_even_when_not_configured(self):
        c = yield start_controller(self)
        issued, _key, _service = yield new_leaf(c)
        headers = {"X-Amzn-Mtls-Clientcert-Serial-Number": format(issued.serial, "x"),
                   "Cf-Client-Cert-Sha256": "00" * 32, "ssl-client-subject-dn": "CN=x"}
        answer = yield _whoami(c, OUTSIDER, headers)
        self.assertIn("not a trusted proxy", answer["rejected"] or "", "an untrusted sender is named")
        self.assertEqual(c.metrics.headers_removed.labels("aws-alb")._value.get(), 1)
        self.assertEqual(c.metrics.headers_removed.labels("cloudflare")._value.get(), 1)

    @inlineCallbacks
    def test_pem_line_breaks_however_a_gateway_rewrites_them(self):
        c = yield start_controller(self, trusted_proxies=[FRONT_END],
                                   forwarded_client_cert_pem_header="X-Client-Certificate")
        issued, _key, service = yield new_leaf(c)
        pem = _pem(issued)
        body = "".join(pem.strip().split("\n")[1:-1])
        forms = {"tabs": pem.strip().replace("\n", "\t"),
                 "no breaks": f"-----BEGIN CERTIFICATE-----{body}-----END CERTIFICATE-----",
                 "url-escaped": quote(pem, safe="")}
        for name, value in forms.items():
            answer = yield _whoami(c, FRONT_END, {"X-Client-Certificate": value})
            self.assertEqual((answer["identity"] or {}).get("service_id"), service.id, f"{name}: {answer}")
