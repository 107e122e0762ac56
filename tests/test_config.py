"""Config validation: every misconfiguration of SPEC §1 is refused with a clear message."""
from __future__ import annotations

import ipaddress
from pathlib import Path

from twisted.trial.unittest import TestCase

from uptrakitd.config import ConfigError, NetworkSettings, build_settings, parse_network


class BuildSettingsTests(TestCase):
    def write(self, text: str) -> str:
        path = Path(self.mktemp())
        path.write_text(text)
        return str(path)

    def assertRefused(self, field: str, flags: dict, config: str | None = None, fragment: str = "") -> None:
        with self.assertRaises(ConfigError) as cm:
            build_settings(flags, config)
        self.assertEqual(cm.exception.field, field)
        self.assertIn(fragment, str(cm.exception))
        self.assertNotIn("\n", str(cm.exception))

    def test_a_database_password_on_the_command_line_is_refused(self) -> None:
        """Issue 32, item 12: a password in --database reaches /proc/PID/cmdline; the config file may hold one."""
        kek = self.write("x")
        for url in ("postgresql://u:s3cret@db/x", "postgresql://u@db/x?password=s3cret"):
            self.assertRefused("database", {"database": url, "ca_key_encryption_key_file": kek},
                               fragment="carries a password")
        in_file = build_settings({"ca_key_encryption_key_file": kek},
                                 self.write('database = "postgresql://u:s3cret@db/x"\n'))
        self.assertEqual(in_file.database, "postgresql://u:s3cret@db/x")
        passfile = build_settings({"database": "postgresql://u@db/x?passfile=/etc/uptrakitd/pgpass",
                                   "ca_key_encryption_key_file": kek})
        self.assertIn("passfile", passfile.database)

    def test_defaults(self) -> None:
        s = build_settings({})
        self.assertEqual(s.data_dir, Path("./uptrakit-data"))
        self.assertEqual(s.https_listen, r"tcp:8443:interface=\:\:")
        self.assertEqual(s.network.trusted_proxies, ())
        self.assertEqual(s.network.real_ip_header, "X-Forwarded-For")
        self.assertEqual(s.trust_domain, "uptrakit.local")
        self.assertEqual(s.log_format, "text")
        self.assertIsNone(s.pki_listen_endpoint())

    def test_bad_cidr(self) -> None:
        self.assertRefused("trusted_proxies", {"trusted_proxies": ["10.0.0.0/33"]}, fragment="10.0.0.0/33")
        self.assertRefused("trusted_proxies", {"trusted_proxies": ["proxy.example"]})

    def test_bare_ip_is_host_network_and_mapped_v6_folds(self) -> None:
        s = build_settings({"trusted_proxies": ["10.1.2.3", "2001:db8::1", "::ffff:192.0.2.0/120"]})
        self.assertEqual(s.network.trusted_proxies, (ipaddress.ip_network("10.1.2.3/32"),
                                                     ipaddress.ip_network("2001:db8::1/128"),
                                                     ipaddress.ip_network("192.0.2.0/24")))

    def test_bad_url_scheme(self) -> None:
        self.assertRefused("pki_addr", {"pki_addr": "ftp://pki.example"}, fragment="http:// or https://")
        self.assertRefused("pki_addr", {"pki_addr": "pki.example"})
        for bad in ("http://pki.example/a\tb", "http://pki.example/a\r\nX: y", "http://pki.example/a b",
                    "http://pki.example/\x1b"):   # urlsplit drops tabs and newlines without a word
            self.assertRefused("pki_addr", {"pki_addr": bad}, fragment="spaces or control characters")

    def test_pki_addr_trailing_slash_dropped(self) -> None:
        self.assertEqual(build_settings({"pki_addr": "http://pki.example:8080/"}).network.pki_addr,
                         "http://pki.example:8080")

    def test_pki_http_requires_pki_addr(self) -> None:
        self.assertRefused("pki_http", {"pki_http": "listener"}, fragment="requires --pki-addr")

    def test_pki_http_values(self) -> None:
        self.assertRefused("pki_http", {"pki_http": "yes", "pki_addr": "http://x"})

    def test_pki_listen_derived_from_pki_addr(self) -> None:
        s = build_settings({"pki_http": "listener", "pki_addr": "http://127.0.0.1:8080"})
        self.assertEqual(s.pki_listen_endpoint(), "tcp:8080:interface=127.0.0.1")

    def test_only_one_of_ca_cert_and_key(self) -> None:
        self.assertRefused("ca_cert", {"ca_cert": "/etc/hostname"}, fragment="together")
        self.assertRefused("ca_cert", {"ca_key": "/etc/hostname"}, fragment="together")

    def test_unreadable_ca_files(self) -> None:
        self.assertRefused("ca_cert", {"ca_cert": "/nonexistent/ca.pem", "ca_key": "/etc/hostname"},
                           fragment="cannot read")

    def test_bad_log_format_and_trust_domain_and_san(self) -> None:
        self.assertRefused("log_format", {"log_format": "xml"})
        self.assertRefused("trust_domain", {"trust_domain": "not a domain"})
        self.assertRefused("san", {"san": ["bad name!"]})
        self.assertRefused("ocsp_signer", {"ocsp_signer": "responder"}, fragment="ca, delegated")
        self.assertRefused("rotation_renewal_rate", {"rotation_renewal_rate": "0"})
        self.assertEqual(build_settings({}).rotation_renewal_rate, 100)
        self.assertEqual(build_settings({}).ocsp_signer, "ca")
        self.assertRefused("ocsp_nonce_rate", {"ocsp_nonce_rate": "-1"})
        self.assertEqual(build_settings({}).ocsp_nonce_rate, 100)
        self.assertEqual(build_settings({}, self.write('[pki]\nocsp_nonce_rate = 0\n')).ocsp_nonce_rate, 0)
        self.assertEqual(build_settings({}, self.write('[pki]\nocsp_signer = "delegated"\n')).ocsp_signer, "delegated")

    def test_bad_header_name(self) -> None:
        self.assertRefused("real_ip_header", {"real_ip_header": "X Forwarded"})

    def test_config_file_keys_and_flag_precedence(self) -> None:
        path = self.write('data_dir = "/tmp/x"\nlog_format = "json"\n[network]\ntrusted_proxies = ["10.0.0.0/8"]\n'
                          'real_ip_header = "X-Real-IP"\n[pki]\ntrust_domain = "example.org"\n')
        s = build_settings({"real_ip_header": "Forwarded"}, path)
        self.assertEqual(s.data_dir, Path("/tmp/x"))
        self.assertEqual(s.log_format, "json")
        self.assertEqual(s.trust_domain, "example.org")
        self.assertEqual(s.network.real_ip_header, "Forwarded")  # flag beats file
        self.assertEqual(s.network.trusted_proxies, (ipaddress.ip_network("10.0.0.0/8"),))
        self.assertEqual(s.network_given, frozenset({"trusted_proxies", "real_ip_header"}))

    def test_config_file_errors(self) -> None:
        self.assertRefused("config", {}, self.write("this is = = not toml"), fragment="not valid TOML")
        self.assertRefused("config", {}, "/nonexistent/uptrakit.toml", fragment="cannot read")
        self.assertRefused("data_dri", {}, self.write('data_dri = "x"\n'), fragment="unknown key")
        self.assertRefused("network.trusted_proxy", {}, self.write('[network]\ntrusted_proxy = []\n'))


class ShippedFilesTests(TestCase):
    def test_sample_config_is_valid(self):
        sample = Path(__file__).resolve().parent.parent / "etc" / "uptrakit.toml"
        s = build_settings({}, str(sample))
        self.assertEqual(s.data_dir, Path("/var/lib/uptrakitd"))
        self.assertEqual(s.san, ("controller.example.org",))
        self.assertEqual(s.network.real_ip_header, "X-Forwarded-For")


class NetworkSettingsTests(TestCase):
    def test_update_validates_everything_first(self) -> None:
        base = NetworkSettings()
        with self.assertRaises(ConfigError) as cm:
            base.updated({"real_ip_header": "X-Real-IP", "trusted_proxies": ["nope"]})
        self.assertEqual(cm.exception.field, "trusted_proxies")
        self.assertEqual(base.real_ip_header, "X-Forwarded-For")

    def test_empty_string_clears_optional_header(self) -> None:
        s = NetworkSettings().updated({"forwarded_client_cert_pem_header": "X-SSL-Client-Cert"})
        self.assertEqual(s.updated({"forwarded_client_cert_pem_header": ""}).forwarded_client_cert_pem_header, None)

    def test_trusts_everything(self) -> None:
        self.assertTrue(NetworkSettings().updated({"trusted_proxies": ["0.0.0.0/0"]}).trusts_everything())
        self.assertFalse(NetworkSettings().updated({"trusted_proxies": ["10.0.0.0/8"]}).trusts_everything())

    def test_parse_network_rejects_garbage(self) -> None:
        for bad in ["", " ", "1.2.3.4/", "::ffff:zz", "256.1.1.1"]:
            self.assertRaises(ConfigError, parse_network, bad)
