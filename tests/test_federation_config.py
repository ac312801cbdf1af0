"""ca.json's federatls-only ``federation`` and ``spiffe`` blocks: parsed into ``CAConfig``
with every field checked (one clear ``ConfigError`` naming the field for each bad one), and
ignored by the real step-ca 0.19, which still starts on a ca.json holding them."""

from __future__ import annotations

import json
import re
from datetime import timedelta
from typing import Any

import httpx
import pytest

from federatls._errors import ConfigError
from federatls.ca import CAConfig
from federatls.ca._federation import FederationConfig, PeerConfig

from harness import PKI, stepca_process

FP = "ab" * 32
STEP_PEER: dict[str, Any] = {
    "name": "kubernetes",
    "url": "https://127.0.0.1:9443",
    "fingerprint": FP,
    "names": ["*.k8s.internal", "spiffe://k8s.internal/*"],
    "refresh": "1m",
}
SPIFFE_PEER: dict[str, Any] = {
    "name": "spire",
    "profile": "https_spiffe",
    "url": "https://127.0.0.1:8443/bundle",
    "trustDomain": "spire.internal",
    "endpointSpiffeId": "spiffe://spire.internal/spire/server",
    "bundle": "spire-bundle.json",
    "names": ["spiffe://spire.internal/*"],
}
WEB_PEER: dict[str, Any] = {
    "name": "web",
    "profile": "https_web",
    "url": "https://127.0.0.1:8444/bundle",
    "trustDomain": "web.internal",
    "names": ["spiffe://web.internal/*"],
}


def _load(pki: PKI, **blocks: Any) -> CAConfig:
    data = json.loads(pki.config.read_text())
    data.update(blocks)
    return CAConfig.from_json(data, pki.config)


def test_the_blocks_are_parsed_into_the_config(pki: PKI) -> None:
    """All three profiles' fields land in ``PeerConfig``s (a relative bundle path taken from
    ca.json's directory, a fingerprint in lower case without separators, the block's
    refresh as default), the spiffe block's trust domain in ``spiffe_trust_domain``. Twin:
    without the blocks, no peers, the 5 minute default and no trust domain."""
    bare = _load(pki)
    assert bare.federation == FederationConfig(timedelta(minutes=5), ())
    assert bare.spiffe_trust_domain is None
    upper = {**STEP_PEER, "fingerprint": ":".join(FP.upper()[i : i + 2] for i in range(0, 64, 2))}
    config = _load(
        pki,
        federation={"refresh": "30s", "peers": [upper, SPIFFE_PEER, WEB_PEER]},
        spiffe={"trustDomain": "cloud.internal"},
    )
    assert config.spiffe_trust_domain == "cloud.internal"
    fed = config.federation
    assert fed.refresh == timedelta(seconds=30)
    step, spire, web = fed.peers
    assert step == PeerConfig(
        name="kubernetes",
        profile="step",
        url="https://127.0.0.1:9443",
        names=("*.k8s.internal", "spiffe://k8s.internal/*"),
        refresh=timedelta(minutes=1),
        fingerprint=FP,
    )
    assert spire.profile == "https_spiffe"
    assert spire.bundle == pki.config.parent / "spire-bundle.json"
    assert (spire.trust_domain, spire.endpoint_spiffe_id, spire.refresh) == (
        "spire.internal",
        "spiffe://spire.internal/spire/server",
        None,
    )
    assert (web.profile, web.trust_domain, web.bundle, web.fingerprint) == (
        "https_web",
        "web.internal",
        None,
        None,
    )
    assert fed.interval(step) == timedelta(minutes=1)
    assert fed.interval(web) == timedelta(seconds=30)
    assert fed.interval(web, timedelta(seconds=7)) == timedelta(seconds=7)


def _peer(base: dict[str, Any], **change: Any) -> dict[str, Any]:
    out = {**base, **change}
    return {k: v for k, v in out.items() if v is not None}


BAD_BLOCKS: list[tuple[dict[str, Any], str]] = [
    ({"federation": []}, "federation must be an object"),
    ({"federation": {"peers": [], "refesh": "1m"}}, "federation: unknown fields ['refesh']"),
    ({"federation": {"refresh": "500ms"}}, "federation.refresh must be at least 1s"),
    ({"federation": {"refresh": 60}}, "federation.refresh must be a duration string"),
    ({"federation": {"refresh": "5 minutes"}}, "federation.refresh:"),
    ({"federation": {"peers": {}}}, "federation.peers must be a list"),
    ({"federation": {"peers": ["x"]}}, "peers[0] must be an object"),
    ({"federation": {"peers": [STEP_PEER, STEP_PEER]}}, "'kubernetes' is listed twice"),
    ({"federation": {"peers": [_peer(STEP_PEER, name=None)]}}, "peers[0].name must be"),
    ({"federation": {"peers": [_peer(STEP_PEER, name="a b")]}}, "peers[0].name must be"),
    ({"federation": {"peers": [_peer(STEP_PEER, profile="x")]}}, "profile must be one of"),
    ({"federation": {"peers": [_peer(STEP_PEER, url=None)]}}, "url must be an https:// URL"),
    ({"federation": {"peers": [_peer(STEP_PEER, url="http://h:1")]}}, "must be an https://"),
    ({"federation": {"peers": [_peer(STEP_PEER, url="https://h:0")]}}, "must be an https://"),
    ({"federation": {"peers": [_peer(STEP_PEER, url="https://h:99999")]}}, "is not a URL"),
    ({"federation": {"peers": [_peer(STEP_PEER, url="https://h:1/roots")]}}, "(no path)"),
    ({"federation": {"peers": [_peer(STEP_PEER, url="https://u@h:1")]}}, "no user name"),
    # Spellings urlsplit takes quietly: "/roots" would land in an empty fragment or query.
    ({"federation": {"peers": [_peer(STEP_PEER, url="https://h:1#")]}}, "no fragment"),
    ({"federation": {"peers": [_peer(STEP_PEER, url="https://h:1?")]}}, "(no path)"),
    ({"federation": {"peers": [_peer(WEB_PEER, url="https://h:1/b#")]}}, "no fragment"),
    ({"federation": {"peers": [_peer(STEP_PEER, url="https://h x:1")]}}, "no spaces or control"),
    ({"federation": {"peers": [_peer(STEP_PEER, url="https://h:1\n")]}}, "no spaces or control"),
    ({"federation": {"peers": [_peer(WEB_PEER, url="https://h:1/\x1b[2J")]}}, "control"),
    ({"federation": {"peers": [_peer(STEP_PEER, fingerprint=None)]}}, "fingerprint must be"),
    ({"federation": {"peers": [_peer(STEP_PEER, fingerprint="abc")]}}, "fingerprint must be"),
    ({"federation": {"peers": [_peer(STEP_PEER, names=None)]}}, "names must be a non-empty"),
    ({"federation": {"peers": [_peer(STEP_PEER, names=[])]}}, "names must be a non-empty"),
    ({"federation": {"peers": [_peer(STEP_PEER, names=[3])]}}, "names must be a non-empty"),
    ({"federation": {"peers": [_peer(STEP_PEER, names=["a.*.b"])]}}, "names: name pattern"),
    ({"federation": {"peers": [_peer(STEP_PEER, refresh="0s")]}}, "refresh must be at least"),
    ({"federation": {"peers": [_peer(STEP_PEER, trustDomain="t")]}}, "['trustDomain'] for"),
    ({"federation": {"peers": [_peer(STEP_PEER, fingerprnt=FP)]}}, "unknown fields ['fingerp"),
    ({"federation": {"peers": [_peer(WEB_PEER, fingerprint=FP)]}}, "['fingerprint'] for"),
    ({"federation": {"peers": [_peer(WEB_PEER, bundle="b.json")]}}, "['bundle'] for profile"),
    ({"federation": {"peers": [_peer(WEB_PEER, trustDomain=None)]}}, "trustDomain must be a"),
    ({"federation": {"peers": [_peer(WEB_PEER, trustDomain="spiffe://w")]}}, "trustDomain must"),
    ({"federation": {"peers": [_peer(WEB_PEER, trustDomain="Web.Internal")]}}, "trustDomain"),
    ({"federation": {"peers": [_peer(SPIFFE_PEER, bundle=None)]}}, "bundle must be the path"),
    ({"federation": {"peers": [_peer(SPIFFE_PEER, endpointSpiffeId=None)]}}, "endpointSpiffe"),
    (
        {"federation": {"peers": [_peer(SPIFFE_PEER, endpointSpiffeId="https://s/x")]}},
        "must start with spiffe://",
    ),
    (
        {"federation": {"peers": [_peer(SPIFFE_PEER, endpointSpiffeId="spiffe://s")]}},
        "it must have a path",
    ),
    (
        {"federation": {"peers": [_peer(SPIFFE_PEER, endpointSpiffeId="spiffe://S/x")]}},
        "its trust domain must be",
    ),
    ({"spiffe": "cloud.internal"}, "spiffe must be an object"),
    ({"spiffe": {"trustdomain": "x"}}, "spiffe: unknown fields ['trustdomain']"),
    ({"spiffe": {}}, "spiffe.trustDomain must be a SPIFFE trust domain name"),
    ({"spiffe": {"trustDomain": "spiffe://cloud.internal"}}, "spiffe.trustDomain must be"),
    ({"spiffe": {"trustDomain": "x" * 256}}, "spiffe.trustDomain must be"),
]


def test_a_bundle_url_keeps_its_query(pki: PKI) -> None:
    """A SPIFFE peer's bundle URL may carry a query (only the step profile's base URL may
    not), so the fragment and query checks refuse no real endpoint. Twin: the empty ``#``
    and ``?`` spellings in ``BAD_BLOCKS``."""
    web = _peer(WEB_PEER, url="https://127.0.0.1:8444/bundle?td=web.internal")
    config = _load(pki, federation={"peers": [web]})
    assert config.federation.peers[0].url == "https://127.0.0.1:8444/bundle?td=web.internal"


@pytest.mark.parametrize(("blocks", "fragment"), BAD_BLOCKS)
def test_each_bad_field_is_one_clear_config_error(
    pki: PKI, blocks: dict[str, Any], fragment: str
) -> None:
    """A wrong, missing or misspelt field stops the CA with one line naming the file and the
    field, instead of a peer silently followed without its pin or rules. Twin:
    ``test_the_blocks_are_parsed_into_the_config``."""
    with pytest.raises(ConfigError, match=re.escape(fragment)) as refused:
        _load(pki, **blocks)
    assert "\n" not in str(refused.value)
    assert str(refused.value).startswith(str(pki.config))


def test_stepca_starts_on_a_ca_json_holding_the_blocks(stepca_bin: str, pki: PKI) -> None:
    """The real step-ca 0.19 ignores the federatls-only blocks: it starts and serves /roots
    on a ca.json that holds them (which the federatls CA parses, above). Twin: the federatls
    parser refuses the same file once a field is wrong (``BAD_BLOCKS``)."""
    pki.edit(
        lambda d: d.update(
            federation={"refresh": "1m", "peers": [STEP_PEER, SPIFFE_PEER, WEB_PEER]},
            spiffe={"trustDomain": "cloud.internal"},
        )
    )
    assert len(CAConfig.load(pki.config).federation.peers) == 3
    with stepca_process(stepca_bin, pki):
        answer = httpx.get(pki.url + "/roots", verify=False, timeout=10)  # noqa: S501
        assert answer.status_code in (200, 201)
        assert len(answer.json()["crts"]) == 1
