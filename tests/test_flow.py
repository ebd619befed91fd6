"""The flow spec: what the user typed is validated before anything touches the kernel."""

import ipaddress

import pytest

from nftrace.errors import InputError
from nftrace.flow import one_address, parse_flow


def test_host_addresses_become_host_prefixes():
    flow = parse_flow("10.0.0.5", "10.0.0.9", "tcp", dport=22)
    assert flow.src == ipaddress.ip_network("10.0.0.5/32")
    assert flow.ip_version == 4 and flow.nft_family == "ip"
    assert flow.describe() == "10.0.0.5 → 10.0.0.9:22 tcp"


def test_prefixes_and_ipv6_are_accepted():
    flow = parse_flow("fd00::/64", "fd00:1::9", "icmpv6")
    assert flow.ip_version == 6 and flow.nft_family == "ip6"
    assert flow.to_json()["src"] == "fd00::/64"


@pytest.mark.parametrize(
    "args, message",
    [
        (("10.0.0.300", "10.0.0.9"), "--from: '10.0.0.300' is not an IP address"),
        (("10.0.0.5", "banana"), "--to: 'banana' is not an IP address"),
        (("10.0.0.5/33", "10.0.0.9"), "--from: '10.0.0.5/33'"),
        (("10.0.0.5/24", "10.0.0.9"), "has host bits set"),
        (("10.0.0.5", "fd00::1"), "is IPv4 but --to fd00::1 is IPv6"),
        (("10.0.0.5", "10.0.0.9", "gre"), "--proto: 'gre' is not one of"),
        (("fd00::1", "fd00::2", "icmp"), "--proto icmp is IPv4"),
        (("10.0.0.5", "10.0.0.9", "icmpv6"), "--proto icmpv6 is IPv6"),
        (("10.0.0.5", "10.0.0.9", "tcp", None, 0), "--dport: port 0 is out of range 1-65535"),
        (("10.0.0.5", "10.0.0.9", "tcp", 65536), "--sport: port 65536 is out of range 1-65535"),
        (("10.0.0.5", "10.0.0.9", "icmp", None, 22), "--sport/--dport need --proto tcp, udp or sctp"),
        (("10.0.0.5", "10.0.0.9", None, None, 22), "--sport/--dport need --proto tcp, udp or sctp"),
        (("10.0.0.5", "10.0.0.9", None, None, None, "a" * 16), "--iif: 'aaaaaaaaaaaaaaaa' is not a valid interface"),
        (("10.0.0.5", "10.0.0.9", None, None, None, None, "bad/name"), "--oif: 'bad/name' is not a valid interface"),
    ],
)
def test_bad_input_is_refused_with_the_option_named(args, message):
    with pytest.raises(InputError) as err:
        parse_flow(*args)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_matches_uses_prefixes_protocol_and_ports():
    flow = parse_flow("10.0.0.0/24", "10.0.1.9", "tcp", dport=22)
    src, dst = ipaddress.ip_address("10.0.0.77"), ipaddress.ip_address("10.0.1.9")
    assert flow.matches(src, dst, 6, 40000, 22)
    assert not flow.matches(src, dst, 17, 40000, 22)
    assert not flow.matches(src, dst, 6, 40000, 23)
    assert not flow.matches(ipaddress.ip_address("10.0.2.1"), dst, 6, 40000, 22)
    assert not flow.matches(None, dst, 6, 40000, 22)


def test_one_address_is_a_flow_end_that_names_one_host():
    assert str(one_address(ipaddress.ip_network("10.0.0.5/32"))) == "10.0.0.5"
    assert str(one_address(ipaddress.ip_network("fd00::1/128"))) == "fd00::1"
    assert one_address(ipaddress.ip_network("10.0.0.0/24")) is None
    assert one_address(None) is None
