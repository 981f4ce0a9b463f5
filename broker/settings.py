"""How to reach the broker: the wire's part of both sides' settings.

Each side's settings class (pydantic-settings, prefix EDGETUNE_, loaded by common.settings)
takes these fields along with its own.
"""

from __future__ import annotations

from pydantic import BaseModel, Field, SecretStr, field_validator

from broker.topics import Topics
from broker.transport import DEFAULT_MAX_PACKET_BYTES, MAX_PACKET_BYTES, MIN_PACKET_BYTES, BrokerAddress


class ConnectionSettings(BaseModel):
    broker_url: str = Field("mqtt://127.0.0.1:1883", description="mqtt://host:port or mqtts://host:port")
    fleet: str = Field("default", description="fleet name: the topic namespace")
    mqtt_username: str | None = None
    mqtt_password: SecretStr | None = None
    ca_file: str | None = Field(None, description="CA certificate for mqtts://")
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

    def password(self) -> str | None:
        return self.mqtt_password.get_secret_value() if self.mqtt_password else None

    def transport(self, client_id: str, **options):
        """A persistent-session MqttTransport to this broker with these credentials, TLS, protocol
        and packet limit; `options` (will, on_state, ...) go to MqttTransport."""
        from broker.transport import MqttTransport

        return MqttTransport(client_id, self.broker_url, username=self.mqtt_username, password=self.password(),
                             ca_file=self.ca_file, protocol=self.mqtt_protocol, max_packet_bytes=self.max_packet_bytes,
                             **{"persistent_session": True, **options})
