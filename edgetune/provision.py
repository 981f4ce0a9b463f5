"""Provisioning a fleet: its CA and signing key, per-device bundles, the broker's entries.

A fleet folder (made by `edgetune provision init`, kept by the operator, never on a device):

    fleet.json            the fleet's name, broker URL, hosts, and every device issued (serial,
                          expiry, password hash, revoked or not)
    ca.crt ca.key         the fleet's CA: it signs the broker's and every device's certificate, and the CRL
    signing.key           the fleet's Ed25519 signing key (the aggregator's EDGETUNE_SIGNING_KEY)
    fleet-keys.pem        the public keys agents trust (EDGETUNE_FLEET_KEYS; two during a rotation)
    broker/               what the broker host needs: mosquitto.conf (mutual TLS on the TLS listener),
                          passwd, acl, crl.pem, certs/{ca.crt,server.crt,server.key}
    aggregator/           the aggregator's bundle (client certificate, password, signing key, env file)
    devices/<name>/       one bundle per device: ca.crt, client.crt, client.key, fleet-keys.pem,
                          agent.env (every EDGETUNE_ setting it needs) and edgetune-agent.service

Trust has two parts. A device connects over mutual TLS (its certificate, signed by the fleet's
CA, or the TLS handshake fails) and logs in with its agent id and password (the ACL keeps it in
its own topics). `revoke` takes both away: it drops the device from passwd and adds its
certificate to crl.pem; on SIGHUP Mosquitto re-reads passwd, the ACL and the TLS files (the CRL
too: seen with 2.0.11, tests/test_provision.py) and checks every connected client's login again,
so a revoked device is disconnected at once and refused at the TLS handshake when it comes
back, without a restart. (Either part alone keeps it out: a Mosquitto that reads the CRL only at
start still refuses the login.) What devices receive from the aggregator is signed
(broker.signing): a device trusts only frames signed with a key in its fleet-keys.pem.

Renewing: `renew NAME` (or `renew --within DAYS` for every device expiring soon) issues a new
certificate and key into the device's bundle with the same password; copy client.crt and
client.key to the device (config management, or the device's own update channel) and restart its
agent: renewal is the one step that still travels outside MQTT (a device's private key is made
here, by the fleet's CA host). Rotating the signing key needs nothing on the devices: `rotate-key`
makes the next key and puts both public keys in fleet-keys.pem (the aggregator's bundle too);
the aggregator, still signing with the current key, publishes both on the keys topic
(EDGETUNE_FLEET_KEYS) and every agent adopts them (broker.signing). `rotate-key --finish` makes the
next key the aggregator's signing.key and fleet-keys.pem the next key alone: the aggregator's
next start publishes it, signed with it, and agents drop the old key.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import os
import secrets
import signal
from dataclasses import dataclass
from pathlib import Path

from broker.messages import AGENT_ID_PATTERN
from broker.mosquitto_conf import TlsFiles, render_acl, render_mosquitto_conf, secure_options
from broker.signing import Signer
from broker.transport import BrokerAddress
from edgetune.dev_tls import _crypto, _write, issue, new_ca, pem_cert, pem_key

FLEET_FILE = "fleet.json"
AGGREGATOR = "aggregator"
PBKDF2_ITERATIONS = 101  # mosquitto_passwd's default for its $7$ (PBKDF2-SHA512) hashes


class ProvisionError(ValueError):
    """A provisioning request that cannot be done; the message says why and what to do."""


def mosquitto_password_hash(password: str, salt: bytes | None = None) -> str:
    """A Mosquitto 2.x password file hash ($7$: PBKDF2-SHA512), as `mosquitto_passwd` writes it."""
    salt = salt or secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, PBKDF2_ITERATIONS)
    return f"$7${PBKDF2_ITERATIONS}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


@dataclass
class Fleet:
    """A fleet folder: its registry (fleet.json) and its files."""

    root: Path
    data: dict

    # -- the folder -------------------------------------------------------------------------
    @classmethod
    def open(cls, root: str | Path) -> "Fleet":
        root = Path(root)
        try:
            return cls(root, json.loads((root / FLEET_FILE).read_text()))
        except FileNotFoundError:
            raise ProvisionError(f"{root} is not a fleet folder (no {FLEET_FILE}): make one with "
                                 "`edgetune provision init`") from None

    def save(self) -> None:
        _write(self.root / FLEET_FILE, (json.dumps(self.data, indent=1) + "\n").encode(), 0o600)

    @property
    def name(self) -> str:
        return self.data["fleet"]

    def _ca(self):
        x509, _, serialization, _, _, _ = _crypto()
        cert = x509.load_pem_x509_certificate((self.root / "ca.crt").read_bytes())
        key = serialization.load_pem_private_key((self.root / "ca.key").read_bytes(), password=None)
        return cert, key

    # -- certificates, passwords and the broker's files ---------------------------------------
    def _issue_client(self, name: str, folder: Path, days: int) -> dict:
        ca_cert, ca_key = self._ca()
        key, cert = issue(ca_cert, ca_key, name, days=days)
        folder.mkdir(parents=True, exist_ok=True)
        _write(folder / "ca.crt", pem_cert(ca_cert), 0o644)
        _write(folder / "client.crt", pem_cert(cert), 0o644)
        _write(folder / "client.key", pem_key(key), 0o600)
        return {"serial": format(cert.serial_number, "x"), "expires": cert.not_valid_after_utc.isoformat()}

    def write_broker(self) -> None:
        """broker/: passwd (every member not revoked), acl, crl.pem and mosquitto.conf."""
        b = self.root / "broker"
        (b / "certs").mkdir(parents=True, exist_ok=True)
        members = {AGGREGATOR: self.data["aggregator"], **self.data["devices"]}
        lines = [f"{n}:{m['password_hash']}" for n, m in sorted(members.items()) if not m.get("revoked")]
        tmp = b / "passwd.tmp"
        _write(tmp, ("\n".join(lines) + "\n").encode(), 0o600)
        os.replace(tmp, b / "passwd")  # atomic: a reload never reads half a file
        _write(b / "acl", render_acl(AGGREGATOR, self.name).encode(), 0o600)
        self._write_crl(b / "crl.pem")
        files = self.data["broker_files"]
        tls = TlsFiles(f"{files}/certs/ca.crt", f"{files}/certs/server.crt", f"{files}/certs/server.key",
                       require_certificate=True, crlfile=f"{files}/crl.pem")
        addr = BrokerAddress.parse(self.data["broker_url"])
        conf = render_mosquitto_conf(secure_options(
            self.data.get("plain_port", 1883), addr.port, files=files, certs=tls,
            persistence_location=self.data.get("persistence", "/var/lib/mosquitto/")))
        _write(b / "mosquitto.conf", conf.encode(), 0o644)

    def _write_crl(self, path: Path) -> None:
        x509, hashes, _, _, _, _ = _crypto()
        ca_cert, ca_key = self._ca()
        now = dt.datetime.now(dt.timezone.utc)
        builder = (x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject)
                   .last_update(now - dt.timedelta(hours=1)).next_update(now + dt.timedelta(days=365)))
        for serial, when in self.data.get("revoked_serials", {}).items():
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(int(serial, 16))
                .revocation_date(dt.datetime.fromisoformat(when)).build())
        _write(path, builder.sign(ca_key, hashes.SHA256()).public_bytes(_crypto()[2].Encoding.PEM), 0o644)

    def _member(self, name: str, folder: Path, days: int, extra_env: dict[str, str]) -> dict:
        """Issue `name` a certificate and a password into `folder`, with its env file."""
        password = secrets.token_urlsafe(24)
        entry = {**self._issue_client(name, folder, days), "password_hash": mosquitto_password_hash(password),
                 "issued": dt.datetime.now(dt.timezone.utc).isoformat(), "revoked": None}
        d = self.data
        env = {"EDGETUNE_BROKER_URL": d["broker_url"], "EDGETUNE_FLEET": d["fleet"], "EDGETUNE_MQTT_USERNAME": name,
               "EDGETUNE_MQTT_PASSWORD": password, **extra_env}
        _write(folder / ("aggregator.env" if name == AGGREGATOR else "agent.env"),
               "".join(f"{k}={v}\n" for k, v in env.items()).encode(), 0o600)
        return entry

    # -- what the CLI offers ------------------------------------------------------------------
    def add_devices(self, names: list[str], days: int) -> list[Path]:
        import re

        install_dir = self.data["install_dir"]
        for name in names:
            if not re.match(AGENT_ID_PATTERN, name) or name == AGGREGATOR:
                raise ProvisionError(f"{name!r} cannot be a device name: it is its agent id and MQTT username "
                                     f"(letters, digits, '_', '.', '-'; not {AGGREGATOR!r})")
            if name in self.data["devices"] and not self.data["devices"][name].get("revoked"):
                raise ProvisionError(f"device {name} already has a bundle (devices/{name}/): `renew` it, or "
                                     "`revoke` it first")
        folders = []
        for name in names:
            folder = self.root / "devices" / name
            self.data["devices"][name] = self._member(name, folder, days, {
                "EDGETUNE_AGENT_ID": name, "EDGETUNE_CA_FILE": f"{install_dir}/ca.crt",
                "EDGETUNE_CERT_FILE": f"{install_dir}/client.crt", "EDGETUNE_KEY_FILE": f"{install_dir}/client.key",
                "EDGETUNE_FLEET_KEYS": f"{install_dir}/fleet-keys.pem", "EDGETUNE_AFTER_RUN": "stay"})
            _write(folder / "fleet-keys.pem", (self.root / "fleet-keys.pem").read_bytes(), 0o644)
            unit = _agent_unit()
            if unit is not None:
                _write(folder / "edgetune-agent.service", unit, 0o644)
            folders.append(folder)
        self.save()
        self.write_broker()
        return folders

    def revoke(self, name: str) -> None:
        dev = self.data["devices"].get(name)
        if dev is None:
            raise ProvisionError(f"no device {name} in this fleet ({', '.join(sorted(self.data['devices'])) or 'none'})")
        if dev.get("revoked"):
            raise ProvisionError(f"device {name} was already revoked on {dev['revoked']}")
        now = dt.datetime.now(dt.timezone.utc).isoformat()
        dev["revoked"] = now
        self.data.setdefault("revoked_serials", {})[dev["serial"]] = now
        self.save()
        self.write_broker()

    def renew(self, name: str, days: int) -> Path:
        dev = self.data["devices"].get(name)
        if dev is None or dev.get("revoked"):
            raise ProvisionError(f"device {name} has no live bundle to renew: `edgetune provision device {name}`")
        folder = self.root / "devices" / name
        dev.update(self._issue_client(name, folder, days))
        self.save()
        return folder

    def expiring(self, within_days: int) -> list[str]:
        limit = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=within_days)
        return sorted(n for n, d in self.data["devices"].items()
                      if not d.get("revoked") and dt.datetime.fromisoformat(d["expires"]) <= limit)

    def rotate_key(self, finish: bool = False) -> None:
        """Start a rotation: a next signing key, trusted beside the current one (fleet-keys.pem holds
        both; the aggregator still signs with the current key and publishes both, so every agent
        takes the next key over the wire). Finish it: the aggregator signs with the next key and
        publishes it alone, so agents drop the old one."""
        keys, nxt = self.root / "fleet-keys.pem", self.root / "signing.key.next"
        current = Signer.from_file(self.root / "signing.key")
        if finish:
            if not nxt.exists():
                raise ProvisionError("no rotation is under way: start one with `edgetune provision rotate-key`")
            new = Signer.from_file(nxt)
            os.replace(self.root / "signing.key", self.root / "signing.key.retired")
            os.replace(nxt, self.root / "signing.key")
            _write(keys, new.public_pem(), 0o644)
        else:
            if nxt.exists():
                raise ProvisionError("a rotation is under way: finish it first with "
                                     "`edgetune provision rotate-key --finish`")
            new = Signer.generate()
            _write(nxt, new.private_pem(), 0o600)
            _write(keys, current.public_pem() + new.public_pem(), 0o644)
        _write(self.root / AGGREGATOR / "signing.key", (self.root / "signing.key").read_bytes(), 0o600)
        self._copy_keys()

    def _copy_keys(self) -> None:
        """fleet-keys.pem into the aggregator's bundle (what it publishes) and every live device's
        (for devices provisioned or reset later: running agents take the keys over the wire)."""
        data = (self.root / "fleet-keys.pem").read_bytes()
        _write(self.root / AGGREGATOR / "fleet-keys.pem", data, 0o644)
        for name, d in self.data["devices"].items():
            if not d.get("revoked"):
                _write(self.root / "devices" / name / "fleet-keys.pem", data, 0o644)


def _agent_unit() -> bytes | None:
    """The systemd unit shipped with the package (edgetune/files/), for the bundles."""
    from importlib.resources import files

    unit = files("edgetune") / "files" / "edgetune-agent.service"
    return unit.read_bytes() if unit.is_file() else None


def init_fleet(root: str | Path, fleet: str, broker_url: str, hosts: list[str], *, days: int = 825,
               broker_files: str = "/etc/mosquitto/edgetune", plain_port: int = 1883,
               persistence: str = "/var/lib/mosquitto/", install_dir: str = "/etc/edgetune") -> Fleet:
    """A new fleet folder: CA, signing key, the broker's certificate and files, the aggregator's bundle."""
    from broker.topics import Topics

    root = Path(root)
    if (root / FLEET_FILE).exists():
        raise ProvisionError(f"{root} already holds a fleet ({FLEET_FILE}): provision devices into it, or pick "
                             "another folder")
    Topics(fleet)  # a valid fleet name
    addr = BrokerAddress.parse(broker_url)
    if not addr.tls:
        raise ProvisionError(f"a provisioned fleet's devices connect over TLS: give an mqtts:// broker URL, not "
                             f"{broker_url}")
    hosts = list(dict.fromkeys([*hosts, addr.host]))
    root.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = new_ca(f"EdgeTune fleet {fleet} CA", days=max(days, 3650))
    _write(root / "ca.crt", pem_cert(ca_cert), 0o644)
    _write(root / "ca.key", pem_key(ca_key), 0o600)
    signer = Signer.generate()
    _write(root / "signing.key", signer.private_pem(), 0o600)
    _write(root / "fleet-keys.pem", signer.public_pem(), 0o644)
    certs = root / "broker" / "certs"
    certs.mkdir(parents=True, exist_ok=True)
    key, cert = issue(ca_cert, ca_key, hosts[0], days=days, hosts=hosts)
    _write(certs / "ca.crt", pem_cert(ca_cert), 0o644)
    _write(certs / "server.crt", pem_cert(cert), 0o644)
    _write(certs / "server.key", pem_key(key), 0o600)
    f = Fleet(root, {"fleet": fleet, "broker_url": broker_url, "hosts": hosts, "broker_files": broker_files,
                     "plain_port": plain_port, "persistence": persistence, "install_dir": install_dir,
                     "devices": {}, "revoked_serials": {}})
    agg = root / AGGREGATOR
    f.data["aggregator"] = f._member(AGGREGATOR, agg, days, {
        "EDGETUNE_CA_FILE": f"{install_dir}/ca.crt", "EDGETUNE_CERT_FILE": f"{install_dir}/client.crt",
        "EDGETUNE_KEY_FILE": f"{install_dir}/client.key", "EDGETUNE_SIGNING_KEY": f"{install_dir}/signing.key",
        "EDGETUNE_FLEET_KEYS": f"{install_dir}/fleet-keys.pem"})
    _write(agg / "signing.key", signer.private_pem(), 0o600)
    _write(agg / "fleet-keys.pem", signer.public_pem(), 0o644)
    f.save()
    f.write_broker()
    return f


def reload_broker(pid: int) -> None:
    """Tell Mosquitto to re-read its password file and ACL (SIGHUP)."""
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        raise ProvisionError(f"no process {pid}: give Mosquitto's pid (`pidof mosquitto`), or run "
                             "`systemctl reload mosquitto` on the broker host") from None
