"""`edgetune provision`: a fleet's CA, signing key, device bundles and broker entries.

    edgetune provision init FLEET_DIR --fleet NAME --broker-url mqtts://HOST:8883 [--host NAME ...]
    edgetune provision device FLEET_DIR NAME [NAME ...]     a bundle per device: FLEET_DIR/devices/NAME/
    edgetune provision revoke FLEET_DIR NAME [--reload PID] the device is out (passwd, CRL); SIGHUP the broker
    edgetune provision renew FLEET_DIR [NAME ...] [--within DAYS]
    edgetune provision rotate-key FLEET_DIR [--finish]
    edgetune provision list FLEET_DIR

What each file is, and how revocation, renewal and key rotation work: edgetune/provision.py.
Registered on the main app in edgetune/cli.py. Errors exit 2 with one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from common.cli import EXIT_INPUT, exit_codes, new_app

provision_app = new_app("Provision a fleet: its CA and signing key, device bundles (mutual TLS, signed models), "
                        "and the broker's entries.")

_DIR = typer.Argument(..., help="the fleet folder (keep it off the devices: it holds the CA and signing keys)")
_DAYS = typer.Option(825, min=1, help="days a certificate is valid")


def _errors():
    from broker.signing import KeyFileError
    from edgetune.provision import ProvisionError

    return exit_codes({ProvisionError: EXIT_INPUT, KeyFileError: EXIT_INPUT, ValueError: EXIT_INPUT})


@provision_app.command()
def init(
    fleet_dir: Path = _DIR,
    fleet: str = typer.Option(..., help="the fleet's name (its topic namespace)"),
    broker_url: str = typer.Option(..., help="mqtts://HOST:PORT, as devices reach the broker"),
    host: Optional[List[str]] = typer.Option(None, help="more names or IP addresses of the broker (repeat)"),
    days: int = _DAYS,
    broker_files: str = typer.Option("/etc/mosquitto/edgetune", help="where broker/ goes on the broker host"),
    plain_port: int = typer.Option(1883, help="the broker's loopback-only plain listener"),
    install_dir: str = typer.Option("/etc/edgetune", help="where a bundle goes on a device (and the aggregator)"),
    persistence: str = typer.Option("/var/lib/mosquitto/", help="the broker's persistence folder (retained "
                                    "messages, sessions)"),
) -> None:
    """Make a fleet folder: CA, signing key, the broker's certificate and files, the aggregator's bundle."""
    from edgetune.provision import init_fleet

    with _errors():
        f = init_fleet(fleet_dir, fleet, broker_url, list(host or []), days=days, broker_files=broker_files,
                       plain_port=plain_port, install_dir=install_dir,
                       persistence=persistence.rstrip("/") + "/")
    typer.echo(f"fleet {f.name} in {fleet_dir}: CA, signing key, broker/ (copy to {broker_files} on the broker host "
               f"and start mosquitto -c {broker_files}/mosquitto.conf), aggregator/ (its bundle: copy to {install_dir})")


@provision_app.command()
def device(fleet_dir: Path = _DIR, names: List[str] = typer.Argument(..., help="device names (their agent ids)"),
           days: int = _DAYS) -> None:
    """Issue a bundle per device, and add them to the broker's password file."""
    from edgetune.provision import Fleet

    with _errors():
        f = Fleet.open(fleet_dir)
        folders = f.add_devices(names, days)
    for folder in folders:
        typer.echo(f"bundle: {folder} (copy to {f.data['install_dir']} on the device; the unit reads agent.env)")
    typer.echo(f"broker: copy {fleet_dir / 'broker' / 'passwd'} to the broker host and reload it "
               "(systemctl reload mosquitto, or kill -HUP)")


@provision_app.command()
def revoke(fleet_dir: Path = _DIR, name: str = typer.Argument(...),
           reload: Optional[int] = typer.Option(None, help="send SIGHUP to this Mosquitto pid (the broker runs here)")) -> None:
    """Revoke a device: out of the password file and into the CRL; a broker reload disconnects it."""
    from edgetune.provision import Fleet, reload_broker

    with _errors():
        f = Fleet.open(fleet_dir)
        f.revoke(name)
        if reload is not None:
            reload_broker(reload)
    typer.echo(f"revoked {name}" + (f"; broker {reload} reloaded" if reload is not None else
               f": copy {fleet_dir / 'broker'}/{{passwd,crl.pem}} to the broker host and reload it "
               "(systemctl reload mosquitto, or kill -HUP)"))


@provision_app.command()
def renew(fleet_dir: Path = _DIR, names: Optional[List[str]] = typer.Argument(None),
          within: Optional[int] = typer.Option(None, min=0, help="every device whose certificate expires within DAYS"),
          days: int = _DAYS) -> None:
    """New certificates (and keys) for devices, into their bundles; their passwords stay."""
    from edgetune.provision import Fleet

    with _errors():
        f = Fleet.open(fleet_dir)
        todo = list(names or []) + (f.expiring(within) if within is not None else [])
        if not todo:
            typer.echo("nothing to renew")
            return
        for name in dict.fromkeys(todo):
            typer.echo(f"renewed {name}: copy {f.renew(name, days)}/client.{{crt,key}} to the device, restart its agent")


@provision_app.command("rotate-key")
def rotate_key(fleet_dir: Path = _DIR,
               finish: bool = typer.Option(False, help="end the rotation: trust only the new key")) -> None:
    """Rotate the fleet's signing key (both public keys are trusted until --finish)."""
    from edgetune.provision import Fleet

    with _errors():
        Fleet.open(fleet_dir).rotate_key(finish)
    typer.echo(f"{fleet_dir / 'fleet-keys.pem'}: push it to every device (EDGETUNE_FLEET_KEYS)" +
               ("" if finish else f"; then give the aggregator {fleet_dir / 'signing.key'}; when every device has "
                                  "the new keys, `rotate-key --finish`"))


@provision_app.command("list")
def list_cmd(fleet_dir: Path = _DIR) -> None:
    """The fleet's devices: certificate serial, expiry, revoked or not."""
    from edgetune.provision import Fleet

    with _errors():
        f = Fleet.open(fleet_dir)
    for name, d in sorted(f.data["devices"].items()):
        typer.echo(f"{name:24} serial {d['serial'][:16]}  expires {d['expires'][:10]}  "
                   + (f"REVOKED {d['revoked'][:10]}" if d.get("revoked") else "active"))
