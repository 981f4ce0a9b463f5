"""How to reach the broker: the wire's part of both sides' settings.

Each side's settings class (pydantic-settings, prefix EDGETUNE_, loaded by common.settings)
takes these fields along with its own.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator

from broker.topics import Topics
from broker.transport import DEFAULT_MAX_PACKET_BYTES, MAX_PACKET_BYTES, MIN_PACKET_BYTES, BrokerAddress


class ConnectionSettings(BaseModel):
    broker_url: str = Field("mqtt://127.0.0.1:1883", description="mqtt://host:port or mqtts://host:port")
    fleet: str = Field("default", description="fleet name: the topic namespace")
    mqtt_username: str | None = None
    mqtt_password: SecretStr | None = None
    ca_file: str | None = Field(None, description="CA certificate for mqtts://")
    cert_file: str | None = Field(None, description="this client's certificate (PEM) for a broker that requires one "
                                  "(mutual TLS; a device's bundle from `edgetune provision device` has it)")
    key_file: str | None = Field(None, description="the private key of cert_file (PEM)")
    mqtt_protocol: int = Field(5, ge=4, le=5, description="5 (MQTT 5) or 4 (MQTT 3.1.1, for brokers without 5)")
    max_packet_bytes: int = Field(
        DEFAULT_MAX_PACKET_BYTES, ge=MIN_PACKET_BYTES, le=MAX_PACKET_BYTES,
        description="the broker's largest packet (mosquitto.conf max_packet_size; `python -m "
                    "broker.mosquitto_conf render --max-packet-bytes N` writes it): larger frames travel in "
                    "chunks, a larger retained message is refused")

    @field_validator("broker_url")
    @classmethod
    def _url(cls, v: str) -> str:
        BrokerAddress.parse(v)
        return v

    @field_validator("fleet")
    @classmethod
    def _fleet(cls, v: str) -> str:
        Topics(v)
        return v

    @model_validator(mode="after")
    def _client_cert(self):
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("cert_file and key_file go together: set both (EDGETUNE_CERT_FILE, EDGETUNE_KEY_FILE) "
                             "for a broker that requires client certificates, or neither")
        for name in ("cert_file", "key_file", "ca_file"):
            path = getattr(self, name)
            if path and not Path(path).is_file():
                raise ValueError(f"{name} {path} does not exist (EDGETUNE_{name.upper()}): give the file's path, "
                                 "e.g. from the device's bundle")
        if self.cert_file and not BrokerAddress.parse(self.broker_url).tls:
            raise ValueError(f"a client certificate needs TLS: broker_url {self.broker_url} is not mqtts://")
        return self

    def password(self) -> str | None:
        return self.mqtt_password.get_secret_value() if self.mqtt_password else None

    def transport(self, client_id: str, **options):
        """A persistent-session MqttTransport to this broker with these credentials, TLS, protocol
        and packet limit; `options` (will, on_state, ...) go to MqttTransport."""
        from broker.transport import MqttTransport

        return MqttTransport(client_id, self.broker_url, username=self.mqtt_username, password=self.password(),
                             ca_file=self.ca_file, cert_file=self.cert_file, key_file=self.key_file,
                             protocol=self.mqtt_protocol, max_packet_bytes=self.max_packet_bytes,
                             **{"persistent_session": True, **options})
