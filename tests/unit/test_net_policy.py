"""Network policy: what validates (errors name the rule), what each check allows and refuses."""

from __future__ import annotations

import json
from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

import corral.net.policy as policy_mod
from corral.errors import InvalidRequestError
from corral.net.policy import (
    AddressGuard,
    CompiledPolicy,
    Decision,
    ForwardRule,
    NetworkPolicy,
    Rule,
    compile_policy,
    parse_policy,
    validate_policy,
)

CORRAL_SUBNET = ip_network("10.201.0.0/16")
TOO_BROAD = "is too broad (a wildcard needs at least two labels below it, and not a public suffix)"


def _guard() -> AddressGuard:
    return AddressGuard([CORRAL_SUBNET])


def _compile(data: dict[str, Any]) -> CompiledPolicy:
    return compile_policy(parse_policy(data), _guard())


def _allow(*rules: dict[str, Any], **extra: Any) -> CompiledPolicy:
    return _compile({"allow": list(rules), **extra})


def _error(data: object) -> str:
    with pytest.raises(InvalidRequestError) as info:
        compile_policy(parse_policy(data), _guard())
    return info.value.message


# --------------------------------------------------------------------------- validation


def test_defaults_are_deny_all() -> None:
    policy = NetworkPolicy()
    assert (policy.preset, policy.allow, policy.deny, policy.egress_mbit) == ("none", [], [], None)
    compiled = compile_policy(policy, _guard())
    assert compiled.check_name("pypi.org") == Decision(False, "default deny")
    assert compiled.check_ip("203.0.113.5", 443, "tcp") == Decision(False, "default deny")
    assert compiled.domain_ports() == frozenset()
    assert compiled.forward_rules() == []
    assert compiled.forward_denies() == []
    assert compiled.source is policy


@pytest.mark.parametrize(
    ("domain", "message"),
    [
        ("*.com", f"allow rule 2: '*.com' {TOO_BROAD}"),
        ("*", f"allow rule 2: '*' {TOO_BROAD}"),
        ("*.co.uk", f"allow rule 2: '*.co.uk' {TOO_BROAD}"),
        ("*.github.io", f"allow rule 2: '*.github.io' {TOO_BROAD}"),
        ("*.s3.amazonaws.com", f"allow rule 2: '*.s3.amazonaws.com' {TOO_BROAD}"),
        ("*.herokuapp.com.", f"allow rule 2: '*.herokuapp.com.' {TOO_BROAD}"),
        ("a.*.example.com", "allow rule 2: 'a.*.example.com': a wildcard must be the whole"),
        ("*example.com", "allow rule 2: '*example.com': a wildcard must be the whole"),
        ("**.example.com", "a wildcard must be the whole leftmost label"),
        ("1.2.3.4", "allow rule 2: '1.2.3.4' is an IP address; use cidr"),
        ("2001:db8::1", "allow rule 2: '2001:db8::1' is an IP address; use cidr"),
        ("[::1]", "is an IP address; use cidr"),
        ("127.1", "is an IP address; use cidr"),
        ("0x7f.0.0.1", "is an IP address; use cidr"),
        ("localhost", "allow rule 2: 'localhost' needs at least two labels"),
        ("", "allow rule 2: domain must not be empty"),
        (".", "allow rule 2: domain must not be empty"),
        ("a..example.com", "has an empty label"),
        ("-bad.example.com", "label '-bad'"),
        ("bad-.example.com", "label 'bad-'"),
        ("under_score.example.com", "label 'under_score'"),
        ("sp ace.example.com", "label 'sp ace'"),
        ("a" * 64 + ".example.com", "labels are 1-63"),
        (".".join(["a" * 60] * 5) + ".com", "longer than 253 characters"),
        ("ü" * 70 + ".de", "not a valid internationalised domain name"),
        ("nul\u0000.example.com", "label 'nul\\x00'"),
    ],
)
def test_bad_domains_name_the_rule(domain: str, message: str) -> None:
    assert message in _error({"allow": [{"domain": "ok.example.com"}, {"domain": domain}]})


@pytest.mark.parametrize(
    ("domain", "pattern"),
    [
        ("Example.COM.", "example.com"),
        ("bücher.de", "xn--bcher-kva.de"),
        ("*.Bücher.de", "*.xn--bcher-kva.de"),
        ("xn--bcher-kva.de", "xn--bcher-kva.de"),
        ("*.example.com", "*.example.com"),
        ("*.user.github.io", "*.user.github.io"),
        ("co.uk", "co.uk"),  # one exact name is never too broad
        ("a-b.c0.example", "a-b.c0.example"),
        ("a" * 63 + ".com", "a" * 63 + ".com"),
    ],
)
def test_good_domains_are_normalised(domain: str, pattern: str) -> None:
    compiled = _allow({"domain": domain})
    name = "x." + pattern[2:] if pattern.startswith("*.") else pattern
    assert compiled.check_name(name) == Decision(True, f"allow rule 1 ({pattern})")


def test_wildcard_needs_two_labels_not_public_suffix_both_ways() -> None:
    assert _allow({"domain": "*.example.com"}).check_name("a.example.com").allowed
    assert TOO_BROAD in _error({"allow": [{"domain": "*.com"}]})
    assert TOO_BROAD in _error({"allow": [{"domain": "*.com.au"}]})
    assert _allow({"domain": "*.shop.com.au"}).check_name("x.shop.com.au").allowed


@pytest.mark.parametrize(
    ("cidr", "message"),
    [
        ("10.0.0.0/33", "allow rule 1: cidr '10.0.0.0/33' is not a network"),
        ("2001:db8::/129", "cidr '2001:db8::/129' is not a network"),
        ("300.1.1.0/24", "is not a network"),
        ("example.com", "is not a network"),
        ("10.0.0.0/8/8", "is not a network"),
        ("", "is not a network"),
        (" 10.0.0.0/8", "is not a network"),
        ("fe80::1%eth0", "is not a network"),
        ("010.0.0.0/8", "is not a network"),
        (
            "169.254.169.254",
            "allow rule 1: 169.254.169.254/32 is never reachable: link-local, including the cloud"
            " metadata address 169.254.169.254",
        ),
        ("127.0.0.0/16", "127.0.0.0/16 is never reachable: loopback"),
        ("::1", "::1/128 is never reachable: loopback"),
        ("::ffff:127.0.0.1", "127.0.0.1/32 is never reachable: loopback"),
        ("64:ff9b::a9fe:a9fe/128", "is never reachable: link-local"),
        ("224.0.0.251", "is never reachable: multicast"),
        ("10.201.3.0/24", "10.201.3.0/24 is never reachable: corral's own network"),
        ("100.100.100.200", "Alibaba Cloud metadata"),
        ("fd00:ec2::254", "AWS metadata"),
    ],
)
def test_bad_cidrs_name_the_rule(cidr: str, message: str) -> None:
    assert message in _error({"allow": [{"cidr": cidr}]})


def test_cidr_overlapping_never_networks_is_fine() -> None:
    # Broad rules are allowed; they simply never open never-networks.
    for cidr in ("0.0.0.0/0", "::/0", "169.0.0.0/8", "10.0.0.0/8", "fc00::/7", "100.64.0.0/10"):
        _allow({"cidr": cidr})
    # Deny rules may name never-networks (they only add refusals).
    _compile({"deny": [{"cidr": "169.254.169.254"}]})


def test_corral_subnet_is_only_never_with_the_server_guard() -> None:
    policy = parse_policy({"allow": [{"cidr": "10.201.3.0/24"}]})
    validate_policy(policy)  # no guard: only the built-in never-networks apply
    compile_policy(policy, AddressGuard())
    with pytest.raises(InvalidRequestError, match=r"allow rule 1: 10\.201\.3\.0/24 is never"):
        compile_policy(policy, _guard())


@pytest.mark.parametrize(
    ("ports", "message"),
    [
        ([], "allow rule 1: ports must not be empty"),
        ([0], "allow rule 1: port 0 is outside 1-65535"),
        ([65536], "port 65536 is outside 1-65535"),
        (["10-70000"], "port '10-70000' is outside 1-65535"),
        (["0-10"], "port '0-10' is outside"),
        (["8100-8000"], "allow rule 1: port range '8100-8000' runs backwards"),
        (["80-"], "port '80-' is not a port number or a range"),
        (["http"], "port 'http' is not a port number"),
        ([" 80"], "is not a port number"),
        (["1-2-3"], "is not a port number"),
        ([1.5], "allow rule 1: ports item 1: must be a port number or a range"),
        ([True], "allow rule 1: ports item 1: must be a port number or a range"),
        ([None], "ports item 1"),
        (list(range(1, 258)), "at most 256 ports entries (got 257)"),
        ("443", "allow rule 1: ports: Input should be a valid list"),
    ],
)
def test_bad_ports_name_the_rule(ports: object, message: str) -> None:
    assert message in _error({"allow": [{"domain": "example.com", "ports": ports}]})


def test_good_ports() -> None:
    compiled = _allow({"domain": "example.com", "ports": [443, "8000-8100", "22", "9000-9000"]})
    assert compiled.domain_ports() == frozenset({22, 443, 9000, *range(8000, 8101)})
    assert compiled.check_name("example.com", 8050).allowed
    assert not compiled.check_name("example.com", 8101).allowed
    _allow({"domain": "example.com", "ports": list(range(1, 257))})  # exactly the limit


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ({}, "allow rule 1: give exactly one of domain or cidr"),
        ({"domain": "a.example", "cidr": "203.0.113.0/24"}, "give exactly one of domain or cidr"),
        (
            {"domain": "a.example", "protocol": "udp"},
            "domain rules carry tcp only; udp needs a cidr",
        ),
        ({"domain": "a.example", "protocol": "icmp"}, "icmp needs a cidr rule"),
        ({"cidr": "203.0.113.0/24", "protocol": "icmp", "ports": [1]}, "icmp has no ports"),
        ({"cidr": "203.0.113.0/24", "protocol": "sctp"}, "allow rule 1: protocol: Input should be"),
        ({"domain": "a.example", "extra": 1}, "allow rule 1: unknown field 'extra'"),
        ({"domain": 5}, "allow rule 1: domain: Input should be a valid string"),
        ({"cidr": ["10.0.0.0/8"]}, "allow rule 1: cidr: Input should be a valid string"),
    ],
)
def test_bad_rule_shapes_name_the_rule(rule: dict[str, Any], message: str) -> None:
    assert message in _error({"allow": [rule]})


def test_domain_rules_accept_tcp_and_any() -> None:
    for protocol in ("tcp", "any"):
        assert _allow({"domain": "a.example", "protocol": protocol}).check_name("a.example").allowed


def test_deny_rules_are_named_as_deny() -> None:
    assert "deny rule 1: '*.com' is too broad" in _error({"deny": [{"domain": "*.com"}]})
    assert "deny rule 2: cidr 'nope'" in _error(
        {"deny": [{"cidr": "1.2.3.0/24"}, {"cidr": "nope"}]}
    )


def test_every_problem_is_reported() -> None:
    message = _error({"allow": [{"domain": "*.com"}, {"domain": "ok.example"}, {"cidr": "x"}]})
    assert "allow rule 1:" in message
    assert "allow rule 3:" in message
    assert "allow rule 2" not in message


def test_rule_count_limit() -> None:
    rules = [{"domain": f"h{i}.example.com"} for i in range(64)]
    _allow(*rules)
    assert "allow: at most 64 rules (got 65)" in _error(
        {"allow": [*rules, {"domain": "x.example.com"}]}
    )
    assert "deny: at most 64 rules (got 65)" in _error(
        {"deny": [*rules, {"domain": "x.example.com"}]}
    )


def test_top_level_errors() -> None:
    assert _error([1]) == "a network policy must be an object"
    assert _error({"preset": "everything"}).startswith("preset: Input should be")
    assert _error({"bogus": True}) == "unknown field 'bogus'"
    assert _error({"allow": "pypi.org"}).startswith("allow: Input should be a valid list")
    assert "allow rule 1: Input should be" in _error({"allow": ["pypi.org"]})
    assert "egress_mbit" in _error({"egress_mbit": 0})
    assert "egress_mbit" in _error({"egress_mbit": -3})
    assert "egress_mbit" in _error('{"egress_mbit": Infinity}')
    assert parse_policy({"egress_mbit": 2.5}).egress_mbit == 2.5


def test_parse_policy_accepts_json_and_models() -> None:
    text = json.dumps({"preset": "registries", "allow": [{"domain": "example.com"}]})
    from_json = parse_policy(text)
    assert from_json == parse_policy(json.loads(text))
    assert parse_policy(from_json) is from_json
    assert from_json.allow == [Rule(domain="example.com")]


def test_validation_errors_never_leak_as_pydantic() -> None:
    # The model itself refuses (FastAPI reports it) and the message still names the rule ...
    with pytest.raises(ValidationError, match=r"allow rule 1: '\*\.com' is too broad"):
        NetworkPolicy(allow=[Rule(domain="*.com")])
    # ... while the functions corral calls raise only InvalidRequestError.
    bad = NetworkPolicy.model_construct(allow=[Rule(domain="*.com")], deny=[])
    with pytest.raises(InvalidRequestError, match=r"allow rule 1: '\*\.com' is too broad"):
        validate_policy(bad)
    with pytest.raises(InvalidRequestError, match=r"allow rule 1: '\*\.com' is too broad"):
        compile_policy(bad, _guard())
    with pytest.raises(InvalidRequestError, match=r"allow rule 1: '\*\.com' is too broad"):
        parse_policy(bad)
    with pytest.raises(InvalidRequestError):
        parse_policy({"allow": [{"domain": "*.com"}]})
    with pytest.raises(InvalidRequestError):
        parse_policy("{not json")


def test_models_are_frozen() -> None:
    policy = parse_policy({"allow": [{"domain": "example.com"}]})
    with pytest.raises(ValidationError):
        policy.preset = "public"
    with pytest.raises(ValidationError):
        policy.allow[0].domain = "evil.example"


# --------------------------------------------------------------------------- names


def test_exact_domain_allows_only_itself() -> None:
    compiled = _allow({"domain": "pypi.org"})
    assert compiled.check_name("pypi.org") == Decision(True, "allow rule 1 (pypi.org)")
    assert compiled.check_name("PyPI.org.", 443) == Decision(True, "allow rule 1 (pypi.org)")
    assert compiled.check_name("files.pypi.org") == Decision(False, "default deny")
    assert compiled.check_name("pypi.org.evil.example") == Decision(False, "default deny")
    assert compiled.check_name("evilpypi.org") == Decision(False, "default deny")


def test_wildcard_depth() -> None:
    compiled = _allow({"domain": "*.example.com"})
    assert compiled.check_name("a.example.com") == Decision(True, "allow rule 1 (*.example.com)")
    assert compiled.check_name("a.b.example.com").allowed
    assert compiled.check_name("secret-data.a.b.example.com", 443).allowed
    assert not compiled.check_name("example.com").allowed
    assert not compiled.check_name("badexample.com").allowed
    assert not compiled.check_name("example.com.evil.test").allowed
    assert not compiled.check_name("a.example.co").allowed


def test_name_ports() -> None:
    compiled = _allow({"domain": "example.com", "ports": [443]})
    assert compiled.check_name("example.com").allowed  # on some port: DNS answers
    assert compiled.check_name("example.com", 443).allowed
    assert compiled.check_name("example.com", 80) == Decision(False, "default deny")
    assert compiled.check_name("example.com", 0) == Decision(False, "default deny")


def test_unicode_and_bad_names_in_checks() -> None:
    compiled = _allow({"domain": "bücher.de"})
    assert compiled.check_name("xn--bcher-kva.de").allowed
    assert compiled.check_name("BÜCHER.de").allowed
    assert not compiled.check_name("").allowed
    assert not compiled.check_name(".").allowed
    assert not compiled.check_name("a b.de").allowed
    assert not compiled.check_name("x" * 300 + ".de").allowed


def test_ip_literal_never_matches_a_domain_rule() -> None:
    compiled = _compile({"preset": "public", "allow": [{"cidr": "203.0.113.0/24"}]})
    for literal in ("203.0.113.5", "2001:db8::1", "127.1", "[::1]"):
        decision = compiled.check_name(literal, 443)
        assert not decision.allowed
        assert "IP address" in decision.reason
    assert compiled.check_name("example.com", 443).allowed


def test_deny_name_overrides_allow() -> None:
    compiled = _compile(
        {
            "allow": [{"domain": "*.example.com"}],
            "deny": [{"domain": "secret.example.com"}, {"domain": "*.internal.example.com"}],
        }
    )
    assert compiled.check_name("www.example.com").allowed
    assert compiled.check_name("secret.example.com") == Decision(
        False, "deny rule 1 (secret.example.com)"
    )
    assert (
        compiled.check_name("secret.example.com", 443).reason == "deny rule 1 (secret.example.com)"
    )
    assert compiled.check_name("db.internal.example.com").reason == (
        "deny rule 2 (*.internal.example.com)"
    )
    # A deny wildcard does not cover its own apex.
    assert compiled.check_name("internal.example.com").allowed


def test_deny_on_some_ports_leaves_the_others() -> None:
    compiled = _compile(
        {
            "allow": [{"domain": "example.com", "ports": [80, 443]}],
            "deny": [{"domain": "example.com", "ports": [80]}],
        }
    )
    assert compiled.check_name("example.com", 443).allowed
    assert compiled.check_name("example.com", 80) == Decision(False, "deny rule 1 (example.com)")
    assert compiled.check_name("example.com").allowed  # 443 is left

    all_denied = _compile(
        {
            "allow": [{"domain": "example.com", "ports": [80, 443]}],
            "deny": [
                {"domain": "example.com", "ports": ["1-100"]},
                {"domain": "example.com", "ports": [443]},
            ],
        }
    )
    assert all_denied.check_name("example.com") == Decision(False, "deny rule 1 (example.com)")

    public = _compile({"preset": "public", "deny": [{"domain": "example.com", "ports": [22]}]})
    assert public.check_name("example.com").allowed
    assert not public.check_name("example.com", 22).allowed
    public_all = _compile({"preset": "public", "deny": [{"domain": "example.com"}]})
    assert public_all.check_name("example.com") == Decision(False, "deny rule 1 (example.com)")
    assert public_all.check_name("other.example").allowed


def test_first_matching_allow_rule_is_reported() -> None:
    compiled = _allow({"domain": "a.example.com", "ports": [22]}, {"domain": "*.example.com"})
    assert compiled.check_name("a.example.com", 22).reason == "allow rule 1 (a.example.com)"
    assert compiled.check_name("a.example.com", 443).reason == "allow rule 2 (*.example.com)"


# --------------------------------------------------------------------------- presets


def test_preset_none_adds_nothing() -> None:
    compiled = _compile({"preset": "none"})
    assert not compiled.check_name("pypi.org").allowed
    assert not compiled.check_ip("203.0.113.5", 443, "tcp").allowed


def test_preset_registries() -> None:
    compiled = _compile({"preset": "registries"})
    for name in (
        "pypi.org",
        "files.pythonhosted.org",
        "registry.npmjs.org",
        "deb.debian.org",
        "security.debian.org",
        "ftp.debian.org",
        "github.com",
        "api.github.com",
        "codeload.github.com",
        "raw.githubusercontent.com",
        "objects.githubusercontent.com",
    ):
        assert compiled.check_name(name, 443).allowed, name
        assert compiled.check_name(name, 80).allowed, name
        assert not compiled.check_name(name, 22).allowed, name
    assert compiled.check_name("github.com", 443) == Decision(
        True, "preset registries (github.com)"
    )
    assert compiled.check_name("api.github.com").reason == "preset registries (*.github.com)"
    for name in ("example.com", "githubusercontent.com", "evil-github.com", "pypi.org.evil.test"):
        assert not compiled.check_name(name).allowed, name
    assert compiled.domain_ports() == frozenset({80, 443})
    # Registries open names, never addresses.
    assert not compiled.check_ip("203.0.113.5", 443, "tcp").allowed


def test_allow_rule_is_reported_before_preset() -> None:
    compiled = _compile({"preset": "registries", "allow": [{"domain": "pypi.org"}]})
    assert compiled.check_name("pypi.org", 443).reason == "allow rule 1 (pypi.org)"
    assert compiled.check_name("pypi.org", 8080).reason == "allow rule 1 (pypi.org)"
    assert compiled.domain_ports() is None


def test_deny_overrides_presets() -> None:
    compiled = _compile({"preset": "registries", "deny": [{"domain": "*.githubusercontent.com"}]})
    assert compiled.check_name("github.com").allowed
    assert compiled.check_name("raw.githubusercontent.com", 443) == Decision(
        False, "deny rule 1 (*.githubusercontent.com)"
    )


def test_preset_public() -> None:
    compiled = _compile({"preset": "public"})
    assert compiled.check_name("anything.example", 1234) == Decision(True, "preset public")
    assert compiled.check_ip("203.0.113.5", 25, "tcp") == Decision(True, "preset public")
    assert compiled.check_ip("2001:db8::5", 443, "tcp").allowed
    # TCP only: UDP and ICMP still need a cidr rule.
    assert compiled.check_ip("203.0.113.5", 53, "udp") == Decision(False, "default deny")
    assert not compiled.check_ip("203.0.113.5", None, "icmp").allowed
    assert compiled.forward_rules() == []
    assert compiled.domain_ports() is None
    # Never and private space stays shut.
    assert not compiled.check_ip("127.0.0.1", 80, "tcp").allowed
    assert not compiled.check_ip("169.254.169.254", 80, "tcp").allowed
    assert not compiled.check_ip("10.0.0.5", 80, "tcp").allowed
    assert not compiled.check_ip("100.64.1.1", 80, "tcp").allowed
    assert not compiled.check_ip("fd12::1", 80, "tcp").allowed
    assert not compiled.check_ip("10.201.0.7", 80, "tcp").allowed
    assert not compiled.check_resolved("evil.test", "10.0.0.5").allowed


def test_preset_data_is_valid_and_has_reasons() -> None:
    raw = json.loads(
        (Path(policy_mod.__file__).parent.parent / "resources/network.json").read_text()
    )
    for section in ("never", "private", "embedded_ipv4", "public_on_purpose", "public_suffixes"):
        assert raw[section], section
        assert all(entry.get("reason") for entry in raw[section]), section
    for name, preset in raw["presets"].items():
        assert preset["reason"], name
        assert all(d["reason"] for d in preset.get("domains", [])), name
    assert raw["wildcard"]["reason"]
    assert set(raw["presets"]) == {"none", "registries", "public"}
    # Every suffix is itself a valid name, so the check compares like with like.
    for group in raw["public_suffixes"]:
        for suffix in group["suffixes"]:
            assert suffix == suffix.lower() and suffix.count(".") >= 1, suffix
            assert TOO_BROAD in _error({"allow": [{"domain": f"*.{suffix}"}]}), suffix


# --------------------------------------------------------------------------- addresses


@pytest.mark.parametrize(
    ("ip", "what"),
    [
        ("0.0.0.0", "'this network'"),
        ("0.1.2.3", "'this network'"),
        ("127.0.0.1", "loopback"),
        ("127.255.0.9", "loopback"),
        ("169.254.169.254", "link-local, including the cloud metadata address 169.254.169.254"),
        ("169.254.1.1", "link-local"),
        ("224.0.0.251", "multicast"),
        ("239.1.1.1", "multicast"),
        ("255.255.255.255", "broadcast"),
        ("240.0.0.1", "reserved"),
        ("::", "unspecified"),
        ("::1", "loopback"),
        ("fe80::1", "link-local"),
        ("ff02::1", "multicast"),
        ("fd00:ec2::254", "AWS metadata"),
        ("100.100.100.200", "Alibaba Cloud metadata"),
        ("10.201.0.1", "corral's own network"),
        # IPv6 forms that carry an IPv4 address.
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:169.254.169.254", "link-local"),
        ("::127.0.0.1", "loopback (IPv4-compatible form)"),
        ("64:ff9b::7f00:1", "loopback (NAT64 form)"),
        ("64:ff9b::a9fe:a9fe", "169.254.169.254 (NAT64 form)"),
        (
            "2002:a9fe:a9fe::1",
            "link-local, including the cloud metadata address 169.254.169.254 (6to4 form)",
        ),
        ("2002:7f00:1::", "loopback (6to4 form)"),
        ("64:ff9b::ac9:1", "host's services) (NAT64 form)"),
    ],
)
def test_guard_never(ip: str, what: str) -> None:
    guard = _guard()
    reason = guard.never(ip)
    assert reason is not None and what in reason and "is never reachable" in reason
    assert guard.never(ip_address(ip)) == reason


@pytest.mark.parametrize(
    ("ip", "network"),
    [
        ("10.0.0.5", "10.0.0.0/8"),
        ("172.16.0.1", "172.16.0.0/12"),
        ("172.31.255.254", "172.16.0.0/12"),
        ("192.168.1.1", "192.168.0.0/16"),
        ("100.64.0.1", "100.64.0.0/10"),
        ("100.127.255.1", "100.64.0.0/10"),
        ("198.18.0.1", "198.18.0.0/15"),
        ("198.19.255.1", "198.18.0.0/15"),
        ("192.0.0.8", "192.0.0.0/24"),
        ("fd12:3456::1", "fc00::/7"),
        ("fc00::1", "fc00::/7"),
        ("fec0::1", "fec0::/10"),
        ("64:ff9b:1::a00:1", "64:ff9b:1::/48"),
        ("::ffff:10.0.0.5", "10.0.0.0/8"),
        ("64:ff9b::a00:5", "64:ff9b::a00:0/104"),
        ("2002:c0a8:101::1", "2002:c0a8::/32"),
        ("::192.168.1.1", "::c0a8:0/112"),
    ],
)
def test_guard_private(ip: str, network: str) -> None:
    guard = _guard()
    assert guard.never(ip) is None
    reason = guard.private(ip)
    assert reason is not None
    assert reason.endswith(f"needs an allow rule naming {network}")


@pytest.mark.parametrize(
    "ip",
    [
        "8.8.8.8",
        "1.1.1.1",
        "172.32.0.1",
        "100.128.0.1",
        "198.20.0.1",
        "169.255.0.1",
        "192.0.2.1",  # TEST-NETs are the tests' fake internet on purpose
        "198.51.100.7",
        "203.0.113.5",
        "2001:db8::1",
        "2606:4700::1111",
        "::ffff:8.8.8.8",
        "64:ff9b::808:808",
        "2002:808:808::1",
        "11.0.0.1",
    ],
)
def test_guard_public(ip: str) -> None:
    guard = _guard()
    assert guard.never(ip) is None
    assert guard.private(ip) is None


def test_guard_garbage_is_refused() -> None:
    guard = AddressGuard()
    assert guard.never("not-an-ip") == "'not-an-ip' is not an IP address"
    assert guard.private("999.1.1.1") is not None


def test_guard_networks_include_ipv6_images() -> None:
    guard = _guard()
    never = set(guard.never_networks)
    assert {ip_network("169.254.0.0/16"), ip_network("10.201.0.0/16")} <= never
    assert ip_network("::ffff:a9fe:0/112") in never
    assert ip_network("64:ff9b::a9fe:0/112") in never
    assert ip_network("2002:a9fe::/32") in never
    assert ip_network("64:ff9b::ac9:0/112") in never  # 10.201.0.0/16 through NAT64
    private = set(guard.private_networks)
    assert {ip_network("10.0.0.0/8"), ip_network("fc00::/7")} <= private
    assert ip_network("64:ff9b::a00:0/104") in private
    assert ip_network("10.201.0.0/16") not in set(AddressGuard().never_networks)


def test_extra_never_accepts_mapped_ipv6() -> None:
    guard = AddressGuard([ip_network("::ffff:10.9.0.0/112")])
    assert guard.never("10.9.1.1") is not None
    assert guard.never("10.8.1.1") is None


# --------------------------------------------------------------------------- check_ip


def test_cidr_allow_both_ways() -> None:
    compiled = _allow({"cidr": "203.0.113.0/24", "ports": [443], "protocol": "tcp"})
    assert compiled.check_ip("203.0.113.5", 443, "tcp") == Decision(
        True, "allow rule 1 (203.0.113.0/24)"
    )
    assert compiled.check_ip("::ffff:203.0.113.5", 443, "tcp").allowed
    assert compiled.check_ip("203.0.113.5", 80, "tcp") == Decision(False, "default deny")
    assert not compiled.check_ip("203.0.113.5", 443, "udp").allowed
    assert not compiled.check_ip("203.0.114.5", 443, "tcp").allowed
    assert not compiled.check_ip("2001:db8::1", 443, "tcp").allowed
    assert compiled.check_ip("nonsense", 443, "tcp") == Decision(
        False, "'nonsense' is not an IP address"
    )


def test_cidr_protocols() -> None:
    compiled = _allow(
        {"cidr": "198.51.100.0/24", "protocol": "udp", "ports": [53, "5000-5010"]},
        {"cidr": "192.0.2.0/24", "protocol": "icmp"},
        {"cidr": "2001:db8::/32"},
    )
    assert compiled.check_ip("198.51.100.1", 53, "udp").allowed
    assert compiled.check_ip("198.51.100.1", 5005, "udp").allowed
    assert not compiled.check_ip("198.51.100.1", 53, "tcp").allowed
    assert not compiled.check_ip("198.51.100.1", None, "icmp").allowed
    assert compiled.check_ip("192.0.2.9", None, "icmp").allowed
    assert not compiled.check_ip("192.0.2.9", 53, "udp").allowed
    for protocol in ("tcp", "udp", "icmp"):
        assert compiled.check_ip("2001:db8::7", None if protocol == "icmp" else 9, protocol).allowed


def test_cidr_mapped_rule_is_ipv4() -> None:
    compiled = _allow({"cidr": "::ffff:203.0.113.0/120"})
    assert compiled.check_ip("203.0.113.5", 1, "tcp").allowed
    assert compiled.forward_rules()[0].network == ip_network("203.0.113.0/24")


def test_never_beats_every_rule() -> None:
    compiled = _compile({"preset": "public", "allow": [{"cidr": "0.0.0.0/0"}, {"cidr": "::/0"}]})
    for ip in (
        "127.0.0.1",
        "169.254.169.254",
        "::ffff:169.254.169.254",
        "64:ff9b::a9fe:a9fe",
        "2002:a9fe:a9fe::",
        "::1",
        "fe80::1",
        "10.201.0.1",
        "224.0.0.1",
    ):
        for protocol in ("tcp", "udp"):
            decision = compiled.check_ip(ip, 80, protocol)
            assert not decision.allowed and "never reachable" in decision.reason, (ip, protocol)
    assert compiled.check_ip("8.8.8.8", 53, "udp") == Decision(True, "allow rule 1 (0.0.0.0/0)")


def test_broad_rule_does_not_open_private_space() -> None:
    compiled = _allow({"cidr": "0.0.0.0/0"}, {"cidr": "::/0"})
    assert compiled.check_ip("10.0.0.5", 80, "tcp") == Decision(
        False, "private address 10.0.0.5 needs an allow rule naming 10.0.0.0/8"
    )
    assert not compiled.check_ip("100.64.0.1", 80, "udp").allowed
    assert not compiled.check_ip("fd00::1", 80, "tcp").allowed
    assert not compiled.check_ip("64:ff9b::a00:5", 80, "tcp").allowed
    assert compiled.check_ip("203.0.113.5", 80, "tcp").allowed
    forward = compiled.forward_rules()
    assert forward == [
        ForwardRule(IPv4Network("0.0.0.0/0"), "any", None, True),
        ForwardRule(IPv6Network("::/0"), "any", None, True),
    ]


def test_rule_naming_private_space_opens_it() -> None:
    compiled = _allow(
        {"cidr": "10.1.2.0/24", "ports": [5432]},
        {"cidr": "fd00:1::/64", "protocol": "udp"},
        {"cidr": "100.64.0.0/10"},
    )
    assert compiled.check_ip("10.1.2.3", 5432, "tcp") == Decision(
        True, "allow rule 1 (10.1.2.0/24)"
    )
    assert compiled.check_ip("::ffff:10.1.2.3", 5432, "tcp").allowed
    assert not compiled.check_ip("10.1.2.3", 22, "tcp").allowed
    assert not compiled.check_ip("10.1.3.3", 5432, "tcp").allowed
    assert compiled.check_ip("fd00:1::9", 53, "udp").allowed
    assert not compiled.check_ip("fd00:1::9", 53, "tcp").allowed
    assert compiled.check_ip("100.64.5.5", 1, "tcp").allowed
    # The metadata service inside CGNAT space stays shut even so.
    assert not compiled.check_ip("100.100.100.200", 80, "tcp").allowed
    assert [r.except_private for r in compiled.forward_rules()] == [False, False, False]


def test_except_private() -> None:
    compiled = _allow(
        {"cidr": "10.0.0.0/7", "protocol": "udp"},  # 10/8 and 11/8: broader than 10/8
        {"cidr": "203.0.113.0/24", "protocol": "icmp"},  # no private space at all
        {"cidr": "10.0.0.0/8", "protocol": "any", "ports": ["1-100"]},
        {"cidr": "198.51.100.0/24", "protocol": "tcp"},  # TCP only: never forwarded
    )
    assert compiled.forward_rules() == [
        ForwardRule(IPv4Network("10.0.0.0/7"), "udp", None, True),
        ForwardRule(IPv4Network("203.0.113.0/24"), "icmp", None, False),
        ForwardRule(IPv4Network("10.0.0.0/8"), "any", ((1, 100),), False),
    ]
    assert not compiled.check_ip("10.0.0.5", 500, "udp").allowed
    assert compiled.check_ip("11.0.0.5", 500, "udp").allowed


def test_deny_cidr_overrides_allow() -> None:
    compiled = _compile(
        {
            "preset": "public",
            "allow": [{"cidr": "10.0.0.0/8"}, {"cidr": "198.51.100.0/24"}],
            "deny": [
                {"cidr": "10.9.0.0/16"},
                {"cidr": "198.51.100.7", "protocol": "udp", "ports": [53]},
                {"cidr": "203.0.113.0/24", "protocol": "tcp"},
            ],
        }
    )
    assert compiled.check_ip("10.1.0.1", 80, "tcp").allowed
    assert compiled.check_ip("10.9.0.1", 80, "tcp") == Decision(False, "deny rule 1 (10.9.0.0/16)")
    assert compiled.check_ip("198.51.100.7", 53, "udp") == Decision(
        False, "deny rule 2 (198.51.100.7/32)"
    )
    assert compiled.check_ip("198.51.100.7", 54, "udp").allowed
    assert compiled.check_ip("198.51.100.7", 53, "tcp").allowed
    assert compiled.check_ip("203.0.113.9", 443, "tcp") == Decision(
        False, "deny rule 3 (203.0.113.0/24)"
    )
    # The embedded IPv4 address of a NAT64/6to4 form is checked against deny rules too.
    assert (
        compiled.check_ip("64:ff9b::cb00:7109", 443, "tcp").reason == "deny rule 3 (203.0.113.0/24)"
    )
    assert (
        compiled.check_ip("2002:cb00:7109::1", 443, "tcp").reason == "deny rule 3 (203.0.113.0/24)"
    )
    assert compiled.check_ip("64:ff9b::808:808", 443, "tcp").allowed
    # TCP-only denies are the proxy's business; non-TCP denies go to nft.
    assert compiled.forward_denies() == [
        ForwardRule(IPv4Network("10.9.0.0/16"), "any", None, False),
        ForwardRule(IPv4Network("198.51.100.7/32"), "udp", ((53, 53),), False),
    ]


# --------------------------------------------------------------------------- check_resolved


def test_check_resolved_public_address() -> None:
    compiled = _allow({"domain": "example.com"})
    assert compiled.check_resolved("example.com", "203.0.113.5") == Decision(
        True, "public address 203.0.113.5"
    )
    assert compiled.check_resolved("example.com", ip_address("2001:db8::5")).allowed


@pytest.mark.parametrize(
    ("ip", "what"),
    [
        ("127.0.0.1", "loopback"),
        ("169.254.169.254", "cloud metadata address"),
        ("::ffff:127.0.0.1", "loopback"),
        ("64:ff9b::a9fe:a9fe", "link-local"),
        ("::1", "loopback"),
        ("0.0.0.0", "'this network'"),
        ("10.201.0.1", "corral's own network"),
    ],
)
def test_check_resolved_refuses_rebinding_to_never(ip: str, what: str) -> None:
    compiled = _allow({"domain": "example.com"}, {"cidr": "0.0.0.0/0"}, {"cidr": "10.0.0.0/8"})
    decision = compiled.check_resolved("example.com", ip)
    assert not decision.allowed
    assert what in decision.reason and "never reachable" in decision.reason


def test_check_resolved_private_needs_a_rule_naming_it() -> None:
    plain = _allow({"domain": "example.com"}, {"cidr": "0.0.0.0/0"})
    assert plain.check_resolved("example.com", "10.0.0.5") == Decision(
        False, "private address 10.0.0.5 needs an allow rule naming 10.0.0.0/8"
    )
    assert not plain.check_resolved("example.com", "::ffff:192.168.0.1").allowed
    assert not plain.check_resolved("example.com", "fd00::1").allowed

    named = _allow(
        {"domain": "db.corp.example"},
        {"cidr": "10.1.0.0/16", "ports": [5432]},
        {"cidr": "192.168.0.0/16", "protocol": "udp"},
    )
    assert named.check_resolved("db.corp.example", "10.1.2.3") == Decision(
        True, "allow rule 2 (10.1.0.0/16)"
    )
    assert named.check_resolved("db.corp.example", "10.1.2.3", 5432).allowed
    assert not named.check_resolved("db.corp.example", "10.1.2.3", 443).allowed
    assert not named.check_resolved("db.corp.example", "10.2.0.1").allowed
    # A UDP-only rule does not open TCP to a name.
    assert not named.check_resolved("db.corp.example", "192.168.0.1").allowed


def test_check_resolved_deny_cidr() -> None:
    compiled = _compile(
        {
            "preset": "public",
            "deny": [
                {"cidr": "203.0.113.0/24"},
                {"cidr": "198.51.100.0/24", "ports": [25]},
                {"cidr": "192.0.2.0/24", "protocol": "udp"},
            ],
        }
    )
    assert compiled.check_resolved("x.example", "203.0.113.5") == Decision(
        False, "deny rule 1 (203.0.113.0/24)"
    )
    assert not compiled.check_resolved("x.example", "64:ff9b::cb00:7105").allowed
    # Port-limited deny: on some port the address is still usable, on that port it is not.
    assert compiled.check_resolved("x.example", "198.51.100.1").allowed
    assert compiled.check_resolved("x.example", "198.51.100.1", 443).allowed
    assert compiled.check_resolved("x.example", "198.51.100.1", 25) == Decision(
        False, "deny rule 2 (198.51.100.0/24)"
    )
    assert compiled.check_resolved("x.example", "192.0.2.1", 443).allowed  # udp deny only
    assert not compiled.check_resolved("x.example", "garbage").allowed


# --------------------------------------------------------------------------- domain ports


def test_domain_ports() -> None:
    assert _allow(
        {"domain": "a.example", "ports": [443]}, {"cidr": "203.0.113.0/24"}
    ).domain_ports() == (frozenset({443}))
    assert _allow({"domain": "a.example"}).domain_ports() is None
    assert _allow({"domain": "a.example", "ports": ["1-65535"]}).domain_ports() is None
    assert _compile(
        {"preset": "registries", "allow": [{"domain": "a.example", "ports": [8443]}]}
    ).domain_ports() == frozenset({80, 443, 8443})
    # Deny rules do not add ports.
    assert (
        _compile({"deny": [{"domain": "a.example", "ports": [22]}]}).domain_ports() == frozenset()
    )


def test_resource_loads_lazily(monkeypatch: pytest.MonkeyPatch) -> None:
    # Importing the module does no work: loading happens on first use, and a broken file
    # surfaces as a host failure with the file named.
    from corral.errors import RuntimeFailure

    policy_mod._data.cache_clear()
    policy_mod._default_guard.cache_clear()
    policy_mod._preset_rules.cache_clear()
    monkeypatch.setattr(policy_mod, "_RESOURCE", Path("/nonexistent/network.json"))
    try:
        with pytest.raises(RuntimeFailure, match=r"network\.json"):
            AddressGuard()
    finally:
        monkeypatch.undo()
        policy_mod._data.cache_clear()
    assert AddressGuard().never("127.0.0.1") is not None
